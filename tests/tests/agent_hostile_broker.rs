//! A real `credstream-agent run` against a hostile broker (issue 34,
//! finding 6): a gRPC `AgentService` of the test's own that sends a
//! credential, then a message over the agent's 1 MiB limit, and on the
//! reconnect refuses the agent's token for good.
//!
//! The agent must treat the oversized message as a refusal (logged,
//! counted, reconnect), not as the end of `run`; and when the broker then
//! ends the subscription for good, it must keep serving the unexpired
//! credential it holds and say why on `/readyz` and in its log, rather than
//! exit (a restarted agent would have forgotten what it refused).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use credstream_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use credstream_proto::v1::{
    ClusterInfo, ClusterSnapshot, CredentialKind, EnvVar, PrivateEnv, SubscribeRequest,
    SubscribeResponse, subscribe_response::Message,
};
use credstream_tests::broker::aws_update;
use credstream_tests::processes::write_file;
use credstream_tests::sealed_agent::AgentProcess;
use futures::Stream;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};

type Downstream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

/// The hostile broker: the first Subscribe gets a snapshot with a live AWS
/// credential, then an oversized private env, and stays open; every later
/// one is refused with `UNAUTHENTICATED` (final for an agent).
#[derive(Clone)]
struct HostileBroker {
    calls: Arc<AtomicUsize>,
    /// The lifetime of the credential in the snapshot.
    ttl: Duration,
}

fn response(message: Message) -> Result<SubscribeResponse, Status> {
    Ok(SubscribeResponse {
        message: Some(message),
    })
}

#[tonic::async_trait]
impl AgentService for HostileBroker {
    type SubscribeStream = Downstream;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if call > 0 {
            return Err(Status::unauthenticated("the agent token was revoked"));
        }
        let mut from_agent = request.into_inner();
        let _hello = from_agent.message().await?;
        let mut credential = aws_update("HELD", self.ttl);
        credential.version = 2;
        let snapshot = ClusterSnapshot {
            info: Some(ClusterInfo {
                kinds: vec![CredentialKind::Aws as i32],
                private_env: false,
                publisher_connected: true,
                version: 1,
            }),
            credentials: vec![credential],
            version: 2,
            ..Default::default()
        };
        let mut huge = EnvVar::default();
        huge.name = "HUGE".into();
        huge.value = "x".repeat(2 << 20);
        let oversized = PrivateEnv {
            set: vec![huge],
            replace_all: true,
            version: 3,
            ..Default::default()
        };
        let messages = vec![
            response(Message::Snapshot(snapshot)),
            response(Message::PrivateEnv(oversized)),
        ];
        // Then stay open, as a broker with nothing more to say does.
        let stream =
            futures::StreamExt::chain(futures::stream::iter(messages), futures::stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }
}

impl HostileBroker {
    /// Serves on a loopback port until the task is aborted; returns its URL.
    async fn start(&self) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let service = AgentServiceServer::new(self.clone());
        let server = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        (url, server)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_and_a_final_error_leave_the_agent_serving_what_it_holds() {
    let broker = HostileBroker {
        calls: Arc::default(),
        ttl: Duration::from_secs(3600),
    };
    let (url, server) = broker.start().await;

    let dir = tempfile::tempdir().unwrap();
    let token = write_file(dir.path(), "agent.token", "any-token");
    let mut agent = AgentProcess::spawn(&url, "dev", "w1", &token, None, dir.path());

    // The oversized message is refused, and reported as such.
    let refusal = agent
        .process
        .stderr_line(|l| l.contains("refused an update from the broker"))
        .await;
    assert!(
        refusal.contains("decoded message length too large"),
        "{refusal}"
    );
    // The agent reconnected rather than ending, and got a final status.
    let final_error = agent
        .process
        .stderr_line(|l| l.contains("serving the credentials held until they expire"))
        .await;
    assert!(
        final_error.contains("the agent token was revoked"),
        "{final_error}"
    );
    assert!(broker.calls.load(Ordering::SeqCst) >= 2);

    // Still running, still serving the credential it held, and saying why
    // nothing will be refreshed.
    assert!(!agent.process.has_exited(), "{}", agent.process.output());
    let (status, body) = agent.aws_credentials().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["AccessKeyId"], "ASIAHELD");
    let env = agent.ready_env().await;
    let addr = env["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let (status, body) = credstream_tests::http1::request(&addr, "GET", "/readyz", &[], "")
        .await
        .expect("GET /readyz");
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let warning = body["warning"].as_str().unwrap_or_default();
    assert!(
        warning.contains("ended for good") && warning.contains("the agent token was revoked"),
        "{body}"
    );
    assert!(!agent.process.output().contains("SECRETKEY-HELD"));
    server.abort();
}

/// Once the last credential it holds has expired, an agent whose
/// subscription ended for good has nothing left to serve and exits with
/// the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_final_error_the_agent_exits_once_what_it_holds_has_expired() {
    let broker = HostileBroker {
        calls: Arc::default(),
        // Long enough to outlast the refusal and the reconnect on a busy
        // machine; the test then waits for the exit, not for a time.
        ttl: Duration::from_secs(10),
    };
    let (url, server) = broker.start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = write_file(dir.path(), "agent.token", "any-token");
    let mut agent = AgentProcess::spawn(&url, "dev", "w1", &token, None, dir.path());
    agent
        .process
        .stderr_line(|l| l.contains("serving the credentials held until they expire"))
        .await;
    let status = agent.process.exit().await;
    assert!(!status.success(), "{}", agent.process.output());
    assert!(
        agent
            .process
            .stderr()
            .contains("credstream-agent: the subscription to the broker failed: the broker rejected the agent token"),
        "{}",
        agent.process.output()
    );
    server.abort();
}
