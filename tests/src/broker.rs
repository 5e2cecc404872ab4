//! An in-process broker on 127.0.0.1:0 and raw protocol clients for it.

use std::time::{Duration, SystemTime};

use credstream_broker::auth::{Role, TokenKey};
use credstream_broker::server::{self, BrokerConfig, RunningBroker};
use credstream_proto::connect::{BrokerAddress, CallCredentials};
use credstream_proto::convert::timestamp;
use credstream_proto::v1::admin_service_client::AdminServiceClient;
use credstream_proto::v1::agent_service_client::AgentServiceClient;
use credstream_proto::v1::publisher_service_client::PublisherServiceClient;
use credstream_proto::v1::{
    AgentHello, AwsCredential, ClusterStatus, CredentialKind, CredentialUpdate, GcpCredential,
    GetClusterRequest, PublishRequest, PublishResponse, PublisherHello, SubscribeRequest,
    SubscribeResponse, credential_update, publish_request, subscribe_request,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// How long any wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// A broker running in this process.
pub struct TestBroker {
    /// The running server.
    pub broker: RunningBroker,
    /// Its token key.
    pub key: TokenKey,
}

impl TestBroker {
    /// Starts a broker with test defaults.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a broker after `configure` adjusted the defaults.
    pub async fn start_with(configure: impl FnOnce(&mut BrokerConfig)) -> Self {
        Self::start_with_key(TokenKey::generate(), configure).await
    }

    /// Starts a broker that verifies tokens with `key`: brokers sharing a
    /// key are shards of one deployment, and a token works on each.
    pub async fn start_with_key(key: TokenKey, configure: impl FnOnce(&mut BrokerConfig)) -> Self {
        let mut config = BrokerConfig::for_tests(key.clone());
        configure(&mut config);
        let broker = server::start(config).await.expect("broker starts");
        Self { broker, key }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.broker.url()
    }

    /// A 1-hour token.
    pub fn token(&self, role: Role, cluster: Option<&str>) -> String {
        self.key
            .issue(role, cluster, Duration::from_secs(3600))
            .expect("token")
    }

    /// The address a client or agent library uses for `cluster`.
    pub fn address(&self, role: Role, cluster: &str) -> BrokerAddress {
        BrokerAddress {
            url: self.url(),
            token: self.token(role, Some(cluster)),
            cluster_id: cluster.into(),
            ca_cert: None,
            client_identity: None,
            insecure: false,
            pins: Vec::new(),
        }
    }

    /// A lazily connecting channel.
    pub fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("url")
            .connect_lazy()
    }

    /// An admin client with an admin token.
    pub fn admin(&self) -> AdminServiceClient<InterceptedService<Channel, CallCredentials>> {
        let creds = CallCredentials::bearer(&self.token(Role::Admin, None)).expect("token");
        AdminServiceClient::with_interceptor(self.channel(), creds)
    }

    /// A raw publisher of `cluster` (a publisher token) that sent its hello
    /// declaring `kinds` and `env`.
    pub async fn publisher(
        &self,
        cluster: &str,
        kinds: &[CredentialKind],
        env: bool,
    ) -> RawPublisher {
        open_publisher(
            self.channel(),
            &self.token(Role::Publisher, Some(cluster)),
            Some(publisher_hello(cluster, kinds, env)),
        )
        .await
        .expect("publisher stream opens")
    }

    /// A raw agent `agent_id` of `cluster` (an agent token) that sent its
    /// hello; the snapshot is its first message.
    pub async fn agent(&self, cluster: &str, agent_id: &str) -> RawAgent {
        open_agent(
            self.channel(),
            &self.token(Role::Agent, Some(cluster)),
            cluster,
            agent_id,
        )
        .await
        .expect("agent stream opens")
    }

    /// `GetCluster` as admin.
    pub async fn status(&self, cluster: &str) -> Result<ClusterStatus, Status> {
        let response = self
            .admin()
            .get_cluster(GetClusterRequest {
                cluster_id: cluster.into(),
            })
            .await?;
        Ok(response.into_inner().cluster.expect("cluster"))
    }
}

/// An AWS credential update expiring in `ttl`, with recognisable secrets.
pub fn aws_update(tag: &str, ttl: Duration) -> CredentialUpdate {
    let mut aws = AwsCredential::default();
    aws.access_key_id = format!("ASIA{tag}");
    aws.secret_access_key = format!("SECRETKEY-{tag}");
    aws.session_token = format!("SESSIONTOKEN-{tag}");
    aws.principal_arn = "arn:aws:sts::123456789012:assumed-role/test/session".into();
    aws.account_id = "123456789012".into();
    aws.region = "eu-west-1".into();
    let now = SystemTime::now();
    CredentialUpdate {
        credential: Some(credential_update::Credential::Aws(aws)),
        issued_at: Some(timestamp(now)),
        expires_at: Some(timestamp(now + ttl)),
        ..Default::default()
    }
}

/// A GCP token update expiring in `ttl`.
pub fn gcp_update(tag: &str, ttl: Duration) -> CredentialUpdate {
    let mut gcp = GcpCredential::default();
    gcp.access_token = format!("ya29.GCPTOKEN-{tag}");
    gcp.token_type = "Bearer".into();
    gcp.scopes = vec!["https://www.googleapis.com/auth/cloud-platform".into()];
    gcp.project_id = "test-project".into();
    gcp.principal_email = "worker@test-project.iam.gserviceaccount.com".into();
    let now = SystemTime::now();
    CredentialUpdate {
        credential: Some(credential_update::Credential::Gcp(gcp)),
        issued_at: Some(timestamp(now)),
        expires_at: Some(timestamp(now + ttl)),
        ..Default::default()
    }
}

fn bearer(token: &str) -> CallCredentials {
    CallCredentials::bearer(token).expect("ascii token")
}

/// A publisher speaking the raw protocol.
#[derive(Debug)]
pub struct RawPublisher {
    /// Send side.
    pub tx: mpsc::Sender<PublishRequest>,
    /// Receive side (welcome first).
    pub rx: Streaming<PublishResponse>,
}

/// Opens a Publish stream with `token` and sends `first` (usually a hello).
pub async fn open_publisher(
    channel: Channel,
    token: &str,
    first: Option<publish_request::Message>,
) -> Result<RawPublisher, Status> {
    let (tx, rx) = mpsc::channel(64);
    if let Some(first) = first {
        tx.send(PublishRequest {
            message: Some(first),
        })
        .await
        .expect("queue");
    }
    let mut client = PublisherServiceClient::with_interceptor(channel, bearer(token))
        .max_decoding_message_size(4 << 20)
        .max_encoding_message_size(4 << 20);
    let response = client.publish(ReceiverStream::new(rx)).await?;
    Ok(RawPublisher {
        tx,
        rx: response.into_inner(),
    })
}

/// The hello for `cluster` declaring `kinds`.
pub fn publisher_hello(
    cluster: &str,
    kinds: &[CredentialKind],
    env: bool,
) -> publish_request::Message {
    publish_request::Message::Hello(PublisherHello {
        cluster_id: cluster.into(),
        kinds: kinds.iter().map(|k| *k as i32).collect(),
        private_env: env,
        publisher_name: "test".into(),
        ..Default::default()
    })
}

impl RawPublisher {
    /// Sends one message.
    pub async fn send(&self, message: publish_request::Message) {
        self.tx
            .send(PublishRequest {
                message: Some(message),
            })
            .await
            .expect("stream open");
    }

    /// The next message, or the status that ended the stream.
    pub async fn next(&mut self) -> Result<Option<PublishResponse>, Status> {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("publisher stream stalled")
    }

    /// Reads past any messages to the status that ends the stream; fails if
    /// the stream ends without one.
    pub async fn ended_with(&mut self) -> Status {
        loop {
            match self.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the publish stream ended without a status"),
                Err(status) => return status,
            }
        }
    }

    /// Reads until the welcome.
    pub async fn welcome(&mut self) -> credstream_proto::v1::PublisherWelcome {
        self.until(|m| match &m.message {
            Some(credstream_proto::v1::publish_response::Message::Welcome(w)) => Some(w.clone()),
            _ => None,
        })
        .await
    }

    /// Reads until `accept` returns a value; fails on stream end or timeout.
    pub async fn until<T>(&mut self, mut accept: impl FnMut(&PublishResponse) -> Option<T>) -> T {
        loop {
            let message = self.next().await.expect("stream ok").expect("stream open");
            if let Some(value) = accept(&message) {
                return value;
            }
        }
    }
}

/// An agent speaking the raw protocol.
#[derive(Debug)]
pub struct RawAgent {
    /// Send side (acks, hints).
    pub tx: mpsc::Sender<SubscribeRequest>,
    /// Receive side (snapshot first).
    pub rx: Streaming<SubscribeResponse>,
}

/// Opens a Subscribe stream as `agent_id` of `cluster`.
pub async fn open_agent(
    channel: Channel,
    token: &str,
    cluster: &str,
    agent_id: &str,
) -> Result<RawAgent, Status> {
    open_agent_with(
        channel,
        token,
        Some(subscribe_request::Message::Hello(AgentHello {
            cluster_id: cluster.into(),
            agent_id: agent_id.into(),
            accepts_token_renewal: false,
        })),
    )
    .await
}

/// Opens a Subscribe stream as `agent_id` of `cluster` whose hello declares
/// that it keeps token renewals (`accepts_token_renewal`), as
/// credstream-agent does.
pub async fn open_renewing_agent(
    channel: Channel,
    token: &str,
    cluster: &str,
    agent_id: &str,
) -> Result<RawAgent, Status> {
    open_agent_with(
        channel,
        token,
        Some(subscribe_request::Message::Hello(AgentHello {
            cluster_id: cluster.into(),
            agent_id: agent_id.into(),
            accepts_token_renewal: true,
        })),
    )
    .await
}

/// Opens a Subscribe stream sending `first` first.
pub async fn open_agent_with(
    channel: Channel,
    token: &str,
    first: Option<subscribe_request::Message>,
) -> Result<RawAgent, Status> {
    let (tx, rx) = mpsc::channel(64);
    if let Some(first) = first {
        tx.send(SubscribeRequest {
            message: Some(first),
        })
        .await
        .expect("queue");
    }
    let mut client = AgentServiceClient::with_interceptor(channel, bearer(token));
    let response = client.subscribe(ReceiverStream::new(rx)).await?;
    Ok(RawAgent {
        tx,
        rx: response.into_inner(),
    })
}

impl RawAgent {
    /// The next message, or the status that ended the stream.
    pub async fn next(&mut self) -> Result<Option<SubscribeResponse>, Status> {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("agent stream stalled")
    }

    /// The next message, which must be there.
    pub async fn expect(&mut self) -> credstream_proto::v1::subscribe_response::Message {
        self.next()
            .await
            .expect("stream ok")
            .expect("stream open")
            .message
            .expect("a message")
    }

    /// Reads past any messages to the status that ends the stream; fails if
    /// the stream ends without one.
    pub async fn ended_with(&mut self) -> Status {
        loop {
            match self.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the subscribe stream ended without a status"),
                Err(status) => return status,
            }
        }
    }

    /// Sends one message.
    pub async fn send(&self, message: subscribe_request::Message) {
        self.tx
            .send(SubscribeRequest {
                message: Some(message),
            })
            .await
            .expect("stream open");
    }
}
