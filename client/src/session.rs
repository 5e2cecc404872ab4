//! The publish session: one `Publish` stream to the broker for one cluster,
//! kept open across broker restarts.
//!
//! A [`PublishSession`] sends the hello (declaring the kinds its minters
//! produce and whether it has a private env), re-sends its whole private env
//! on every connect (a restarted broker has lost it), and answers each
//! `RefreshRequest` by running the matching [`Minter`] and sending the
//! credential — or a `RefreshError` with the reason. It mints only when asked:
//! the broker knows when a credential is due, and asks again for whatever it
//! lacks when the session reconnects, so minting while disconnected would only
//! spend identity-provider calls on a credential nobody can receive.
//!
//! One mint per kind at a time, for the newest request: a request that
//! arrives while a mint of its kind is running replaces the one that mint
//! will answer (the older is superseded, and the broker would drop an
//! answer to it), so a backlog of requests read at once — a publisher
//! resumed after SIGSTOP, say — costs one identity-provider call per kind.
//! The session answers the broker's heartbeats at once, so the broker can
//! tell a stopped publisher from a slow mint. A mint error the minter knows
//! is permanent ([`crate::mint::MintError::is_permanent`]) is reported as
//! such; the broker then stops asking for that kind until the session
//! reconnects ([`PublishSession::stopped_kinds`]).
//!
//! Reconnects use exponential backoff with full jitter. Statuses that no
//! retry can fix (bad token, wrong cluster, taken over) end the session with
//! a [`SessionError`].
//!
//! ```no_run
//! # async fn example(minter: std::sync::Arc<dyn credstream_client::mint::Minter>) -> Result<(), Box<dyn std::error::Error>> {
//! use credstream_client::session::PublishSession;
//! use credstream_proto::connect::BrokerAddress;
//!
//! let address = BrokerAddress {
//!     url: "http://127.0.0.1:50051".into(),
//!     token: std::env::var("CREDSTREAM_TOKEN")?,
//!     cluster_id: "dev".into(),
//!     ca_cert: None,
//!     client_identity: None,
//!     insecure: false,
//!     pins: Vec::new(),
//! };
//! let session = PublishSession::builder(address).minter(minter).start()?;
//! session.send_private_envs([("AUTH_TOKEN_FOR_CUSTOM_DATABASE", "s3cret")]).await?;
//! session.shutdown().await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use credstream_proto::connect::{BrokerAddress, ConnectError};
use credstream_proto::convert::system_time;
use credstream_proto::rules::backoff::Backoff;
use credstream_proto::rules::retry::{self, Final};
use credstream_proto::v1::publisher_service_client::PublisherServiceClient;
use credstream_proto::v1::{
    AccessEnd, CredentialKind, CredentialUpdate, EnvVar, HeartbeatAck, PrivateEnv, PublishRequest,
    PublisherHello, RefreshError, RefreshReason, RefreshRequest, Revoke, UpdateAck,
    credential_update::Credential, publish_request, publish_response,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use zeroize::Zeroizing;

use crate::mint::Minter;
use crate::seal::Sealer;

/// Why a session ended for good.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The broker address or token is unusable.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The broker refused the token (`UNAUTHENTICATED`).
    #[error(
        "the broker rejected the token: {0}; issue a new publisher token (`credstream-broker token --role publisher --cluster …`)"
    )]
    Unauthenticated(String),
    /// The token is valid but not for this cluster or role.
    #[error("the token may not publish to this cluster: {0}")]
    PermissionDenied(String),
    /// Another publisher took over the cluster.
    #[error("another publisher took over the cluster: {0}")]
    TakenOver(String),
    /// The broker rejected something the session sent.
    #[error("the broker rejected a message: {0}")]
    Rejected(String),
    /// A private env var was refused before sending (the session stays up).
    #[error("invalid private env: {0}")]
    InvalidEnv(String),
    /// The session task is gone.
    #[error("the publish session has ended")]
    Closed,
}

/// Something that happened in the session, for the CLI's event lines and
/// for tests.
#[derive(Clone, Debug)]
pub enum SessionEvent {
    /// The stream is open and the broker welcomed the session.
    Connected {
        /// Agents subscribed at that moment.
        agents: u32,
    },
    /// The broker asked for a new credential.
    RefreshRequested {
        /// The kind.
        kind: CredentialKind,
        /// Why.
        reason: RefreshReason,
    },
    /// A credential was minted and sent.
    Minted {
        /// The kind.
        kind: CredentialKind,
        /// The AWS ARN or GCP principal, when known.
        principal: String,
        /// When it expires.
        expires_at: Option<SystemTime>,
    },
    /// Minting failed; the broker was told and will retry, unless the
    /// failure was permanent ([`PublishSession::stopped_kinds`] then holds
    /// the kind).
    MintFailed {
        /// The kind.
        kind: CredentialKind,
        /// Why (no secrets).
        message: String,
    },
    /// How many agents hold the latest version.
    Delivered(UpdateAck),
    /// The stream broke; the session reconnects after `retry_in`.
    Disconnected {
        /// The reason.
        reason: String,
        /// When the next attempt is made.
        retry_in: Duration,
    },
}

enum Command {
    Env(PrivateEnv, oneshot::Sender<()>),
    // Boxed: a credential update is much larger than the other commands.
    Credential(Box<CredentialUpdate>, oneshot::Sender<()>),
    Revoke(Revoke, oneshot::Sender<()>),
    Shutdown,
}

/// Builds a [`PublishSession`].
pub struct SessionBuilder {
    address: BrokerAddress,
    minters: Vec<Arc<dyn Minter>>,
    env: BTreeMap<String, Zeroizing<String>>,
    declare_env: bool,
    publisher_name: String,
    revoke_on_exit: bool,
    sealer: Option<Arc<Sealer>>,
}

impl SessionBuilder {
    /// Seals every credential and private env change with `key` (sealed
    /// delivery, `docs/sealing.md`): the broker relays what it cannot read,
    /// and agents holding the key accept nothing else. The private env is
    /// then sent whole on every change, since the broker cannot merge it.
    pub fn seal(mut self, key: credstream_proto::seal::SealKey) -> Self {
        self.sealer = Some(Arc::new(Sealer::new(key)));
        self
    }

    /// Adds a minter; its kind is declared in the hello.
    pub fn minter(mut self, minter: Arc<dyn Minter>) -> Self {
        self.minters.push(minter);
        self
    }

    /// Sets the initial private env (and declares one, so that agents'
    /// `exec` waits for it).
    pub fn private_env<K: Into<String>, V: Into<String>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.declare_env = true;
        for (name, value) in vars {
            self.env.insert(name.into(), Zeroizing::new(value.into()));
        }
        self
    }

    /// A display name for the broker's status (`user@host`).
    pub fn publisher_name(mut self, name: impl Into<String>) -> Self {
        self.publisher_name = name.into();
        self
    }

    /// Revoke everything at [`PublishSession::shutdown`].
    pub fn revoke_on_exit(mut self, revoke: bool) -> Self {
        self.revoke_on_exit = revoke;
        self
    }

    /// Starts the session in the background.
    pub fn start(self) -> Result<PublishSession, SessionError> {
        let channel = self.address.channel()?;
        let credentials = self.address.interceptor()?;
        let client = PublisherServiceClient::with_interceptor(channel, credentials.clone())
            .max_decoding_message_size(1024 * 1024);
        let (commands, command_rx) = mpsc::channel(64);
        // Subscribed before the runner starts, so that the first caller of
        // `events` sees the session's first events (the runner can connect
        // before the caller gets to subscribe).
        let (events, first_events) = broadcast::channel(256);
        let (acks, _) = watch::channel(UpdateAck::default());
        let (stopped, _) = watch::channel(Vec::new());
        let (access_ends, _) = watch::channel(AccessEnds::new());
        let revoke_on_exit = self.revoke_on_exit;
        let runner = Runner {
            cluster_id: self.address.cluster_id.clone(),
            client,
            credentials,
            minters: self.minters,
            env: self.env,
            declare_env: self.declare_env,
            publisher_name: self.publisher_name,
            events: events.clone(),
            acks: acks.clone(),
            stopped: stopped.clone(),
            sealer: self.sealer,
            access_ends: access_ends.clone(),
        };
        let task = tokio::spawn(runner.run(command_rx));
        Ok(PublishSession {
            commands,
            events,
            first_events: std::sync::Mutex::new(Some(first_events)),
            acks,
            task,
            revoke_on_exit,
            stopped,
            access_ends,
        })
    }
}

/// A running publish session. See the module docs.
pub struct PublishSession {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<SessionEvent>,
    /// The receiver subscribed at start, until `events` hands it out.
    first_events: std::sync::Mutex<Option<broadcast::Receiver<SessionEvent>>>,
    acks: watch::Sender<UpdateAck>,
    task: JoinHandle<Result<(), SessionError>>,
    revoke_on_exit: bool,
    stopped: StoppedKinds,
    access_ends: watch::Sender<AccessEnds>,
}

/// Kinds whose last mint failed permanently on the current connection.
type StoppedKinds = watch::Sender<Vec<CredentialKind>>;

/// Per kind, when workers lose access unless the user logs in again, as the
/// last credential minted and sent says (`CredentialUpdate.access_end`).
pub type AccessEnds = BTreeMap<CredentialKind, AccessEnd>;

impl std::fmt::Debug for PublishSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishSession").finish_non_exhaustive()
    }
}

impl PublishSession {
    /// A builder for a session to `address`.
    pub fn builder(address: BrokerAddress) -> SessionBuilder {
        SessionBuilder {
            address,
            minters: Vec::new(),
            env: BTreeMap::new(),
            declare_env: false,
            publisher_name: default_publisher_name(),
            revoke_on_exit: false,
            sealer: None,
        }
    }

    /// Session events (connected, minted, delivered, …). The first call
    /// receives every event since [`SessionBuilder::start`], so none is
    /// lost to the session connecting before its caller subscribed (it
    /// keeps the last 256; an older one shows as `RecvError::Lagged`).
    /// Each later call receives the events from then on.
    pub fn events(&self) -> broadcast::Receiver<SessionEvent> {
        self.first_events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .unwrap_or_else(|| self.events.subscribe())
    }

    /// The latest delivery progress the broker reported.
    pub fn acks(&self) -> watch::Receiver<UpdateAck> {
        self.acks.subscribe()
    }

    /// Kinds whose last mint failed with an error retrying cannot fix
    /// (invalid configuration, access denied, no local credentials): the
    /// broker was told, and asks for them again only after the session
    /// reconnects. Updated before the matching
    /// [`SessionEvent::MintFailed`] is sent; cleared on every connect.
    pub fn stopped_kinds(&self) -> Vec<CredentialKind> {
        self.stopped.borrow().clone()
    }

    /// When workers will lose each kind of access unless the user logs in
    /// again: the `access_end` of the last credential of that kind minted
    /// and sent (a kind is absent while its minter can renew itself).
    /// Updated before the matching [`SessionEvent::Minted`] is sent.
    pub fn watch_access_ends(&self) -> watch::Receiver<AccessEnds> {
        self.access_ends.subscribe()
    }

    /// [`PublishSession::stopped_kinds`] as a receiver that does not borrow
    /// the session (the CLI reads it while it waits on the session).
    pub fn watch_stopped_kinds(&self) -> watch::Receiver<Vec<CredentialKind>> {
        self.stopped.subscribe()
    }

    async fn command(
        &self,
        make: impl FnOnce(oneshot::Sender<()>) -> Command,
    ) -> Result<(), SessionError> {
        let (done, queued) = oneshot::channel();
        self.commands
            .send(make(done))
            .await
            .map_err(|_| SessionError::Closed)?;
        queued.await.map_err(|_| SessionError::Closed)
    }

    /// Sets (merges) private env vars on every agent. Kept by the session
    /// and re-sent after a broker restart. Resolves once queued on the
    /// stream (or held for the next connection).
    pub async fn send_private_envs<K: Into<String>, V: Into<String>>(
        &self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<(), SessionError> {
        let set: Vec<EnvVar> = vars
            .into_iter()
            .map(|(name, value)| EnvVar {
                name: name.into(),
                value: value.into(),
            })
            .collect();
        // Checked here so that a bad variable is the caller's error, not a
        // broker rejection that would end the whole session.
        for var in &set {
            crate::env::validate_name(&var.name).map_err(SessionError::InvalidEnv)?;
            crate::env::validate_value(&var.name, &var.value).map_err(SessionError::InvalidEnv)?;
        }
        crate::env::check_limits(&set).map_err(|e| SessionError::InvalidEnv(e.to_string()))?;
        self.command(|done| {
            Command::Env(
                PrivateEnv {
                    set,
                    ..Default::default()
                },
                done,
            )
        })
        .await
    }

    /// Removes private env vars from every agent.
    pub async fn unset_private_envs<S: Into<String>>(
        &self,
        names: impl IntoIterator<Item = S>,
    ) -> Result<(), SessionError> {
        let unset: Vec<String> = names.into_iter().map(Into::into).collect();
        for name in &unset {
            crate::env::validate_name(name).map_err(SessionError::InvalidEnv)?;
        }
        self.command(|done| {
            Command::Env(
                PrivateEnv {
                    unset,
                    ..Default::default()
                },
                done,
            )
        })
        .await
    }

    /// Publishes a credential minted elsewhere (unprompted).
    pub async fn publish_credential(&self, update: CredentialUpdate) -> Result<(), SessionError> {
        self.command(|done| Command::Credential(Box::new(update), done))
            .await
    }

    /// Revokes credential kinds, or everything with `all` (the private env
    /// too); agents stop serving them at once.
    pub async fn revoke(&self, kinds: &[CredentialKind], all: bool) -> Result<(), SessionError> {
        let revoke = Revoke {
            kinds: kinds.iter().map(|k| *k as i32).collect(),
            all,
        };
        self.command(|done| Command::Revoke(revoke, done)).await
    }

    /// Ends the session (revoking first if configured) and returns how it
    /// ended.
    pub async fn shutdown(self) -> Result<(), SessionError> {
        if self.revoke_on_exit {
            let _ = self.revoke(&[], true).await;
        }
        let _ = self.commands.send(Command::Shutdown).await;
        self.task.await.map_err(|_| SessionError::Closed)?
    }

    /// Waits until the session ends on its own (a terminal error).
    pub async fn wait(&mut self) -> Result<(), SessionError> {
        (&mut self.task).await.map_err(|_| SessionError::Closed)?
    }

    /// True once the session has ended (a terminal error or shutdown), so
    /// that [`PublishSession::wait`] returns at once. For callers that
    /// cannot park a task on `wait` (the Python `Publisher`).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

fn default_publisher_name() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    let mut name = format!("{user}@{host}");
    name.truncate(128);
    name
}

type Client = PublisherServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        credstream_proto::connect::CallCredentials,
    >,
>;

struct Runner {
    cluster_id: String,
    client: Client,
    /// The client's token, shared with its interceptor: a `TokenRenewal`
    /// replaces it for every later call (reconnects included).
    credentials: credstream_proto::connect::CallCredentials,
    minters: Vec<Arc<dyn Minter>>,
    env: BTreeMap<String, Zeroizing<String>>,
    declare_env: bool,
    publisher_name: String,
    events: broadcast::Sender<SessionEvent>,
    acks: watch::Sender<UpdateAck>,
    stopped: StoppedKinds,
    access_ends: watch::Sender<AccessEnds>,
    sealer: Option<Arc<Sealer>>,
}

/// How one connection ended.
enum Ended {
    Shutdown,
    Retry(String),
    Fatal(SessionError),
}

fn classify(status: tonic::Status) -> Ended {
    let message = status.message().to_owned();
    match retry::final_reason(status.code()) {
        Some(Final::Unauthenticated) => Ended::Fatal(SessionError::Unauthenticated(message)),
        Some(Final::PermissionDenied) => Ended::Fatal(SessionError::PermissionDenied(message)),
        Some(Final::TakenOver) => Ended::Fatal(SessionError::TakenOver(message)),
        Some(Final::Rejected) => Ended::Fatal(SessionError::Rejected(message)),
        None => Ended::Retry(format!("{:?}: {message}", status.code())),
    }
}

/// How a stream that the broker welcomed ended. `UNAUTHENTICATED` there is
/// the broker ending a live stream whose token expired or whose signing key
/// was removed (docs/design.md §3): the session may hold a newer token (a
/// renewal) than the one the stream was opened with, so it reconnects with
/// backoff, and only a refusal of that new call is final.
fn classify_welcomed(status: tonic::Status) -> Ended {
    if status.code() == tonic::Code::Unauthenticated {
        return Ended::Retry(format!(
            "the broker ended the stream: {}; reconnecting with the newest token held",
            status.message()
        ));
    }
    classify(status)
}

/// Reconnects: 500 ms doubling to 30 s, full jitter.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// Full jitter: a random delay up to the exponential bound.
pub(crate) fn full_jitter(attempt: u32) -> Duration {
    RECONNECT.full_jitter(attempt)
}

/// A finished mint: its kind, and the credential or the error's message and
/// whether it is permanent.
type MintResult = (CredentialKind, Result<CredentialUpdate, (String, bool)>);

impl Runner {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) -> Result<(), SessionError> {
        let mut attempt = 0u32;
        // Commands that arrive while disconnected are applied to the local
        // env (re-sent on connect) or held until the next connection.
        let mut held: Vec<PublishRequest> = Vec::new();
        loop {
            match self
                .connection(&mut commands, &mut held, &mut attempt)
                .await
            {
                Ended::Shutdown => return Ok(()),
                Ended::Fatal(error) => return Err(error),
                Ended::Retry(reason) => {
                    let retry_in = full_jitter(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(cluster = %self.cluster_id, %reason, ?retry_in, "publish stream lost; reconnecting");
                    let _ = self
                        .events
                        .send(SessionEvent::Disconnected { reason, retry_in });
                    let sleep = tokio::time::sleep(retry_in);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            () = &mut sleep => break,
                            command = commands.recv() => match command {
                                None | Some(Command::Shutdown) => return Ok(()),
                                Some(command) => self.hold(command, &mut held),
                            }
                        }
                    }
                }
            }
        }
    }

    fn kinds(&self) -> Vec<i32> {
        self.minters.iter().map(|m| m.kind() as i32).collect()
    }

    fn full_env(&self) -> PrivateEnv {
        PrivateEnv {
            set: self
                .env
                .iter()
                .map(|(name, value)| EnvVar {
                    name: name.clone(),
                    value: value.as_str().to_owned(),
                })
                .collect(),
            unset: vec![],
            replace_all: true,
            ..Default::default()
        }
    }

    fn apply_env_locally(&mut self, change: &PrivateEnv) {
        for var in &change.set {
            self.env
                .insert(var.name.clone(), Zeroizing::new(var.value.clone()));
        }
        for name in &change.unset {
            self.env.remove(name);
        }
    }

    /// Applies a command while disconnected: env changes are folded into
    /// the local env (sent whole on connect); the rest waits.
    fn hold(&mut self, command: Command, held: &mut Vec<PublishRequest>) {
        match command {
            Command::Env(change, done) => {
                self.apply_env_locally(&change);
                let _ = done.send(());
            }
            Command::Credential(update, done) => {
                held.extend(self.credential_request(*update));
                let _ = done.send(());
            }
            Command::Revoke(revoke, done) => {
                held.push(request(publish_request::Message::Revoke(revoke)));
                let _ = done.send(());
            }
            Command::Shutdown => {}
        }
    }

    async fn connection(
        &mut self,
        commands: &mut mpsc::Receiver<Command>,
        held: &mut Vec<PublishRequest>,
        attempt: &mut u32,
    ) -> Ended {
        let (tx, rx) = mpsc::channel::<PublishRequest>(32);
        let hello = PublisherHello {
            cluster_id: self.cluster_id.clone(),
            kinds: self.kinds(),
            private_env: self.declare_env || !self.env.is_empty(),
            publisher_name: self.publisher_name.clone(),
            answers_heartbeats: true,
            accepts_token_renewal: true,
        };
        let _ = tx
            .send(request(publish_request::Message::Hello(hello)))
            .await;
        if (!self.env.is_empty() || self.declare_env)
            && let Some(env) = self.env_request(self.full_env())
        {
            let _ = tx.send(env).await;
        }
        for message in held.drain(..) {
            let _ = tx.send(message).await;
        }
        let mut inbound = match self.client.publish(ReceiverStream::new(rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => return classify(status),
        };
        let (minted_tx, mut minted) = mpsc::channel::<MintResult>(8);
        let mut welcomed = false;
        // Per kind, the newest request the running mint will answer.
        let mut answering: BTreeMap<i32, RefreshRequest> = BTreeMap::new();
        loop {
            tokio::select! {
                message = inbound.message() => {
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => return Ended::Retry("the broker closed the stream".into()),
                        Err(status) if welcomed => return classify_welcomed(status),
                        Err(status) => return classify(status),
                    };
                    match response.message {
                        Some(publish_response::Message::Welcome(welcome)) => {
                            welcomed = true;
                            *attempt = 0;
                            self.stopped.send_if_modified(|kinds| {
                                let changed = !kinds.is_empty();
                                kinds.clear();
                                changed
                            });
                            tracing::info!(cluster = %self.cluster_id, agents = welcome.agents_connected, "connected to the broker");
                            let _ = self.events.send(SessionEvent::Connected { agents: welcome.agents_connected });
                        }
                        Some(publish_response::Message::RefreshRequest(req)) => {
                            match answering.entry(req.kind) {
                                std::collections::btree_map::Entry::Occupied(mut running) => {
                                    tracing::debug!(cluster = %self.cluster_id, kind = req.kind().label(),
                                        superseded = %running.get().id, id = %req.id,
                                        "a newer request joins the running mint");
                                    running.insert(req);
                                }
                                std::collections::btree_map::Entry::Vacant(slot) => {
                                    self.start_mint(&req, minted_tx.clone());
                                    slot.insert(req);
                                }
                            }
                        }
                        Some(publish_response::Message::Heartbeat(heartbeat)) => {
                            let ack = request(publish_request::Message::HeartbeatAck(HeartbeatAck {
                                sequence: heartbeat.sequence,
                            }));
                            if tx.send(ack).await.is_err() {
                                return Ended::Retry("the stream closed while sending".into());
                            }
                        }
                        Some(publish_response::Message::UpdateAck(ack)) => {
                            self.acks.send_replace(ack);
                            let _ = self.events.send(SessionEvent::Delivered(ack));
                        }
                        Some(publish_response::Message::TokenRenewal(mut renewal)) => {
                            let token = std::mem::take(&mut renewal.token);
                            let token = Zeroizing::new(token);
                            let valid_until = renewal.expires_at.as_ref().and_then(system_time);
                            match self.credentials.renew(&token) {
                                Ok(()) => {
                                    tracing::info!(cluster = %self.cluster_id, "token renewed, valid until {}", until(valid_until));
                                }
                                Err(error) => {
                                    tracing::warn!(cluster = %self.cluster_id, %error, "the broker's token renewal is unusable; keeping the token held");
                                }
                            }
                        }
                        None => {}
                    }
                }
                Some((kind, result)) = minted.recv() => {
                    let Some(req) = answering.remove(&(kind as i32)) else { continue };
                    let message = self.minted(req, result);
                    if tx.send(message).await.is_err() {
                        return Ended::Retry("the stream closed while sending".into());
                    }
                }
                command = commands.recv() => {
                    let message = match command {
                        None | Some(Command::Shutdown) => return Ended::Shutdown,
                        Some(Command::Env(change, done)) => {
                            self.apply_env_locally(&change);
                            let _ = done.send(());
                            // Sealed: the whole env, since the broker cannot
                            // merge a change into what it cannot read.
                            let change = if self.sealer.is_some() { self.full_env() } else { change };
                            let Some(message) = self.env_request(change) else { continue };
                            message
                        }
                        Some(Command::Credential(update, done)) => {
                            let _ = done.send(());
                            let Some(message) = self.credential_request(*update) else { continue };
                            message
                        }
                        Some(Command::Revoke(revoke, done)) => {
                            let _ = done.send(());
                            request(publish_request::Message::Revoke(revoke))
                        }
                    };
                    if tx.send(message).await.is_err() {
                        return Ended::Retry("the stream closed while sending".into());
                    }
                }
            }
        }
    }

    /// A credential as sent: sealed when the session seals. `None` (logged)
    /// if sealing failed: a credential is never sent in clear instead.
    fn credential_request(&self, update: CredentialUpdate) -> Option<PublishRequest> {
        let update = match &self.sealer {
            None => update,
            Some(sealer) => match sealer.seal_credential(&update) {
                Ok(sealed) => sealed,
                Err(error) => {
                    tracing::error!(cluster = %self.cluster_id, kind = update.kind().label(), %error, "cannot seal the credential; not sent");
                    return None;
                }
            },
        };
        Some(request(publish_request::Message::Credential(update)))
    }

    /// A private env change as sent: when the session seals, `env` must be
    /// the whole env and is sealed. `None` (logged) if sealing failed.
    fn env_request(&self, env: PrivateEnv) -> Option<PublishRequest> {
        let env = match &self.sealer {
            None => env,
            Some(sealer) => match sealer.seal_env(&env) {
                Ok(sealed) => sealed,
                Err(error) => {
                    tracing::error!(cluster = %self.cluster_id, %error, "cannot seal the private env; not sent");
                    return None;
                }
            },
        };
        Some(request(publish_request::Message::PrivateEnv(env)))
    }

    fn start_mint(&self, req: &RefreshRequest, results: mpsc::Sender<MintResult>) {
        let kind = req.kind();
        let reason = req.reason();
        tracing::info!(cluster = %self.cluster_id, kind = kind.label(), ?reason, id = %req.id, "refresh requested");
        let _ = self
            .events
            .send(SessionEvent::RefreshRequested { kind, reason });
        let Some(minter) = self.minters.iter().find(|m| m.kind() == kind).cloned() else {
            let message = format!("this publisher has no {} minter", kind.label());
            tokio::spawn(async move {
                let _ = results.send((kind, Err((message, true)))).await;
            });
            return;
        };
        tokio::spawn(async move {
            let result = minter
                .mint()
                .await
                .map_err(|e| (e.to_string(), e.is_permanent()));
            let _ = results.send((kind, result)).await;
        });
    }

    fn minted(
        &self,
        req: RefreshRequest,
        result: Result<CredentialUpdate, (String, bool)>,
    ) -> PublishRequest {
        let kind = req.kind();
        match result {
            Ok(mut update) => {
                update.refresh_request_id = req.id;
                let principal = match &update.credential {
                    Some(Credential::Aws(aws)) => aws.principal_arn.clone(),
                    Some(Credential::Gcp(gcp)) => gcp.principal_email.clone(),
                    None => String::new(),
                };
                let expires_at = update.expires_at.as_ref().and_then(system_time);
                let access_end = update.access_end.clone();
                tracing::info!(cluster = %self.cluster_id, kind = kind.label(), %principal, "minted and sent");
                let refresh_request_id = update.refresh_request_id.clone();
                let Some(message) = self.credential_request(update) else {
                    return request(publish_request::Message::RefreshError(RefreshError {
                        refresh_request_id,
                        message: "the minted credential could not be sealed".into(),
                        permanent: false,
                    }));
                };
                self.access_ends.send_if_modified(|ends| match access_end {
                    Some(end) => ends.insert(kind, end.clone()).as_ref() != Some(&end),
                    None => ends.remove(&kind).is_some(),
                });
                let _ = self.events.send(SessionEvent::Minted {
                    kind,
                    principal,
                    expires_at,
                });
                message
            }
            Err((message, permanent)) => {
                tracing::warn!(cluster = %self.cluster_id, kind = kind.label(), error = %message, permanent, "minting failed");
                if permanent {
                    self.stopped.send_if_modified(|kinds| {
                        let new = !kinds.contains(&kind);
                        if new {
                            kinds.push(kind);
                        }
                        new
                    });
                }
                let _ = self.events.send(SessionEvent::MintFailed {
                    kind,
                    message: message.clone(),
                });
                request(publish_request::Message::RefreshError(RefreshError {
                    refresh_request_id: req.id,
                    message,
                    permanent,
                }))
            }
        }
    }
}

/// A renewal's expiry for a log line.
fn until(valid_until: Option<SystemTime>) -> String {
    valid_until.map_or_else(
        || "an unstated time".into(),
        |at| humantime::format_rfc3339_seconds(at).to_string(),
    )
}

fn request(message: publish_request::Message) -> PublishRequest {
    PublishRequest {
        message: Some(message),
    }
}
