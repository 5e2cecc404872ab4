//! The agent assembled: one [`AgentConfig`] in, a running [`Agent`] out.
//!
//! [`Agent::start`] builds what `credstream-agent run` and `exec` share, in
//! this order, so that a bad setting fails before anything is served: the
//! broker address (URL and plaintext rule), the seal key, the state file
//! and the store's gate, the local authorization token and its 0600 token file, the router
//! bound on loopback, the env file writer; then it spawns the listener, the
//! [`subscription`] and the env file writer, every one
//! selecting on one shutdown signal.
//!
//! The handle then offers what a front end needs: [`Agent::store`] and
//! [`Agent::endpoints`] to read and point processes at; [`Agent::failure`],
//! which resolves when a task that should live as long as the agent ends
//! (a rejected token, an env file that cannot be written); and
//! [`Agent::stop`], which signals shutdown, drains for at most
//! [`DRAIN_TIMEOUT`] (the env file is removed on the way out) and logs the
//! per-version served counts. [`Agent::run_until`] and [`Agent::exec`] are
//! the `run` and `exec` subcommands' loops; [`run`] is [`Agent::start`] then
//! [`Agent::run_until`], in the manner of mini-redis's `server::run`.
//! Dropping a handle without [`Agent::stop`] also signals every task to stop
//! (without waiting for them).
//!
//! The library never reads flags, the environment or signals and never
//! re-executes the process: those are the binary's (`src/main.rs`, with
//! [`hardening`](crate::hardening)), so a test or another front end can run
//! an agent inside its own process and runtime.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use credstream_proto::connect::{BrokerAddress, ClientIdentity, ConnectError};
use credstream_proto::seal::SealKey;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinError, JoinHandle};
use zeroize::Zeroizing;

use crate::env_file::{EnvFile, EnvFileError};
use crate::exec::{self, ExecConfig, ExecError, ForwardedSignal, Waited};
use crate::http::{
    self, AuthToken, DRAIN_TIMEOUT, LocalEndpoints, LocalServer, ServeError, TokenFile,
};
use crate::seal::{Gate, KeyFileError};
use crate::sequences::{StateFile, StateFileError};
use crate::store::CredentialStore;
use crate::subscription::{self, SubscriptionConfig, SubscriptionError};

/// Everything an agent needs, as plain data (the binary builds it from its
/// flags; see `credstream-agent run --help` for each one's meaning).
#[derive(Clone)]
#[non_exhaustive]
pub struct AgentConfig {
    /// The broker's URL (`https://HOST:PORT`, or `http://` to loopback).
    pub broker: String,
    /// The cluster to serve credentials of.
    pub cluster: String,
    /// This agent's id, unique within the cluster (e.g. the host name).
    pub agent_id: String,
    /// The agent token. Secret: never logged, and redacted in `Debug`.
    pub token: Zeroizing<String>,
    /// The loopback address for the local endpoints; port 0 picks a free
    /// one (the default `127.0.0.1:0`).
    pub listen: SocketAddr,
    /// Also keep an env file here (mode 0600, replaced atomically on every
    /// change, removed at stop).
    pub env_file: Option<PathBuf>,
    /// Whether to emulate the GCE metadata server (on by default).
    pub gce_metadata: bool,
    /// The cluster's seal key: with one, only sealed updates are accepted;
    /// without, sealed ones are refused.
    pub seal_key: Option<SealKeySource>,
    /// Keep the highest sealed sequences accepted in this file (mode 0600),
    /// so that a restarted agent refuses the older sealed items the running
    /// one would have ([`crate::sequences`]). Needs `seal_key`.
    pub state_file: Option<PathBuf>,
    /// Local connections kept open at once (default
    /// [`http::MAX_CONNECTIONS`]; see [`max_connections_for`]).
    pub max_connections: usize,
    /// A PEM CA bundle to trust for the broker instead of the system roots.
    pub ca_cert: Option<PathBuf>,
    /// The client certificate for a broker that requires mutual TLS.
    pub client_identity: Option<ClientIdentity>,
    /// Allow the token in plaintext (`http://`) to a non-loopback broker.
    pub insecure: bool,
    /// Pinned broker keys (a join string's): when set, the broker is
    /// accepted by its key instead of a CA and host name.
    pub pins: Vec<credstream_proto::join::SpkiPin>,
}

impl AgentConfig {
    /// A config with the defaults: listen on `127.0.0.1:0`, GCE metadata
    /// emulation on, no env file, no seal key, [`http::MAX_CONNECTIONS`],
    /// the system's CA roots.
    pub fn new(
        broker: impl Into<String>,
        cluster: impl Into<String>,
        agent_id: impl Into<String>,
        token: Zeroizing<String>,
    ) -> Self {
        Self {
            broker: broker.into(),
            cluster: cluster.into(),
            agent_id: agent_id.into(),
            token,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            env_file: None,
            gce_metadata: true,
            seal_key: None,
            state_file: None,
            max_connections: http::MAX_CONNECTIONS,
            ca_cert: None,
            client_identity: None,
            insecure: false,
            pins: Vec::new(),
        }
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("broker", &self.broker)
            .field("cluster", &self.cluster)
            .field("agent_id", &self.agent_id)
            .field(
                "token",
                &format_args!("<redacted {} bytes>", self.token.len()),
            )
            .field("listen", &self.listen)
            .field("env_file", &self.env_file)
            .field("gce_metadata", &self.gce_metadata)
            .field("seal_key", &self.seal_key)
            .field("state_file", &self.state_file)
            .field("max_connections", &self.max_connections)
            .field("ca_cert", &self.ca_cert)
            .field("client_identity", &self.client_identity)
            .field("insecure", &self.insecure)
            .field("pins", &self.pins)
            .finish()
    }
}

/// Where the seal key comes from. `Debug` never shows the key.
#[derive(Clone, Debug)]
pub enum SealKeySource {
    /// A key file from `credstream seal-key --cluster ID` (read at start).
    File(PathBuf),
    /// A key already in memory; it must be for the agent's cluster.
    Key(SealKey),
}

/// Local connections to allow for a process whose descriptor limit is
/// `fd_limit` (from [`hardening::raise_fd_limit`](crate::hardening::raise_fd_limit)):
/// half of it, leaving the rest for everything else, between 16 and
/// [`http::MAX_CONNECTIONS`]; the maximum when the limit is unknown.
pub fn max_connections_for(fd_limit: Option<u64>) -> usize {
    fd_limit.map_or(http::MAX_CONNECTIONS, |limit| {
        usize::try_from(limit / 2)
            .unwrap_or(usize::MAX)
            .clamp(16, http::MAX_CONNECTIONS)
    })
}

/// Why an agent did not start, or stopped before it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The broker URL does not parse, names plaintext to a remote host, or
    /// a certificate file is unusable: fix the broker address or the TLS
    /// options (the message says which).
    #[error(transparent)]
    Broker(#[from] ConnectError),
    /// The seal key file cannot be read or is not this cluster's: give the
    /// file `credstream seal-key --cluster ID` wrote for this cluster.
    #[error(transparent)]
    SealKeyFile(#[from] KeyFileError),
    /// The state file cannot be read, written or is not this agent's (the
    /// message says what to do).
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    /// A state file without a seal key: it keeps sealed sequences only.
    #[error(
        "--state-file keeps the sequences of sealed updates: give --seal-key-file too, or drop --state-file"
    )]
    StateFileWithoutKey,
    /// A seal key given in memory is another cluster's.
    #[error(
        "the seal key is for cluster {found}, not {expected}: use the key `credstream seal-key --cluster {expected}` prints"
    )]
    SealKeyCluster {
        /// The key's cluster.
        found: String,
        /// The agent's cluster.
        expected: String,
    },
    /// The private token directory could not be created under
    /// `$XDG_RUNTIME_DIR` or the temp dir: check that it exists, is
    /// writable and has space.
    #[error("cannot write the local authorization token file")]
    TokenFile(#[source] io::Error),
    /// The listen address is not loopback or cannot be bound: use
    /// `127.0.0.1:PORT` with a free port (or port 0).
    #[error(transparent)]
    Listen(#[from] ServeError),
    /// The env file's directory does not exist, or writing it failed.
    #[error(transparent)]
    EnvFile(#[from] EnvFileError),
    /// The broker ended the subscription for good (a rejected token, a
    /// token for another cluster); the message says what to do.
    #[error("the subscription to the broker failed")]
    Subscription(#[source] SubscriptionError),
    /// The subscription returned without an error before shutdown (a bug).
    #[error("the subscription ended")]
    SubscriptionEnded,
    /// The subscription task panicked or was cancelled (a bug).
    #[error("the subscription task failed")]
    SubscriptionTask(#[source] JoinError),
    /// The env file writer returned without an error before shutdown (a
    /// bug).
    #[error("the env file writer ended")]
    EnvFileEnded,
    /// The env file task panicked or was cancelled (a bug).
    #[error("the env file task failed")]
    EnvFileTask(#[source] JoinError),
    /// `exec`'s command could not be started or waited for, or the agent
    /// did not become ready in time (the message names what was missing).
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// Starts an agent with `config`, serves until `shutdown` resolves or a
/// task fails for good (see [`Agent::failure`]), then stops it
/// ([`Agent::stop`]).
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    Agent::start(config).await?.run_until(shutdown).await
}

/// A running agent (see the module documentation).
pub struct Agent {
    store: CredentialStore,
    endpoints: Arc<LocalEndpoints>,
    env_file_path: Option<PathBuf>,
    /// Dropping it (with the handle) also tells every task to stop.
    shutdown: watch::Sender<bool>,
    /// `None` once it ended (and its end was reported).
    subscription: Option<JoinHandle<Result<(), SubscriptionError>>>,
    server: JoinHandle<()>,
    /// `None` when there is no env file, or once the writer ended.
    env_file: Option<JoinHandle<Result<(), EnvFileError>>>,
    /// The env file writer's count of writes, for [`Agent::ready`].
    env_file_writes: Option<watch::Receiver<u64>>,
    /// Removes the token file when the agent goes.
    _token_file: TokenFile,
}

impl Agent {
    /// Checks `config`, binds the listener and starts serving (see the
    /// module documentation). Must be called inside a Tokio runtime.
    pub async fn start(config: AgentConfig) -> Result<Self, AgentError> {
        let address = BrokerAddress {
            url: config.broker,
            token: config.token.as_str().to_owned(),
            cluster_id: config.cluster.clone(),
            ca_cert: config.ca_cert,
            client_identity: config.client_identity,
            insecure: config.insecure,
            pins: config.pins,
        };
        // Fail on a bad URL or the plaintext rule now, before serving.
        address.check()?;

        let seal_key = match config.seal_key {
            None => None,
            Some(SealKeySource::File(path)) => {
                Some(crate::seal::read_key_file(&path, &config.cluster)?)
            }
            Some(SealKeySource::Key(key)) if key.cluster_id() != config.cluster => {
                return Err(AgentError::SealKeyCluster {
                    found: key.cluster_id().to_owned(),
                    expected: config.cluster,
                });
            }
            Some(SealKeySource::Key(key)) => Some(key),
        };
        if let Some(key) = &seal_key {
            tracing::info!(key_id = %key.key_id_hex(), "sealed delivery: only sealed updates are accepted");
        }
        let gate = match (seal_key, &config.state_file) {
            (key, None) => Gate::new(key),
            (None, Some(_)) => return Err(AgentError::StateFileWithoutKey),
            (Some(key), Some(path)) => {
                let (file, accepted) = StateFile::open(path, &config.cluster)?;
                tracing::info!(
                    path = %path.display(),
                    ?accepted,
                    "sealed sequences accepted before are kept in the state file"
                );
                Gate::with_state(key, file, accepted)
            }
        };
        let store = CredentialStore::with_gate(gate);
        let auth = AuthToken::generate();
        let token_file = TokenFile::create(&auth).map_err(AgentError::TokenFile)?;
        let router = http::router(store.clone(), auth.clone(), config.gce_metadata);
        let server = LocalServer::bind(config.listen, router)
            .await?
            .max_connections(config.max_connections);
        let endpoints = Arc::new(LocalEndpoints {
            addr: server.local_addr(),
            token: auth,
            token_file: Some(token_file.path().to_path_buf()),
            gce_metadata: config.gce_metadata,
        });
        let env_file = config
            .env_file
            .clone()
            .map(|path| EnvFile::new(path, store.clone(), endpoints.clone()))
            .transpose()?;
        tracing::info!(
            addr = %endpoints.addr,
            cluster = %config.cluster,
            agent = %config.agent_id,
            "serving local endpoints"
        );

        let (shutdown, _) = watch::channel(false);
        let server = tokio::spawn(server.serve(until(&shutdown)));
        let subscription = SubscriptionConfig::new(address, config.agent_id);
        let subscription = tokio::spawn(subscription::run(
            subscription,
            store.clone(),
            until(&shutdown),
        ));
        let env_file_writes = env_file.as_ref().map(EnvFile::writes);
        let env_file = env_file.map(|file| tokio::spawn(file.run(until(&shutdown))));
        Ok(Self {
            store,
            endpoints,
            env_file_path: config.env_file,
            shutdown,
            subscription: Some(subscription),
            server,
            env_file,
            env_file_writes,
            _token_file: token_file,
        })
    }

    /// Resolves once the agent is first ready to serve a process: the env
    /// file is written, when one is kept (a process started on that signal
    /// may read it: systemd's `EnvironmentFile=` does), else the store is
    /// ready (`/readyz`'s condition). Pending forever if the env file
    /// writer ends first: [`Agent::failure`] reports why. Owns what it
    /// needs, so it can run beside [`Agent::run_until`] (`run` sends
    /// systemd's `READY=1` on it, see [`crate::notify`]).
    pub fn ready(&self) -> impl Future<Output = ()> + Send + 'static {
        let writes = self.env_file_writes.clone();
        let mut changes = self.store.subscribe();
        async move {
            match writes {
                Some(mut writes) => {
                    if writes.wait_for(|count| *count > 0).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                // Readiness is gained only through a message from the
                // broker, so waking on store changes is enough.
                None => loop {
                    if changes
                        .borrow_and_update()
                        .readiness(SystemTime::now())
                        .is_ok()
                    {
                        return;
                    }
                    if changes.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                },
            }
        }
    }

    /// What the agent holds (shared with its tasks: a clone sees every
    /// change).
    pub fn store(&self) -> &CredentialStore {
        &self.store
    }

    /// Where the agent serves, and the variables that point a process there
    /// ([`LocalEndpoints::child_env`]).
    pub fn endpoints(&self) -> &Arc<LocalEndpoints> {
        &self.endpoints
    }

    /// The env file's path, when one is kept.
    pub fn env_file(&self) -> Option<&Path> {
        self.env_file_path.as_deref()
    }

    /// What `credstream-agent run` prints on stdout once serving: the
    /// address, the variables that carry no secret as `export` lines, and
    /// how to source the env file when one is kept.
    pub fn banner(&self) -> String {
        let mut banner = format!("listening on {}\n", self.endpoints.addr);
        for (name, value) in self.endpoints.public_exports() {
            banner.push_str(&format!("export {name}='{value}'\n"));
        }
        if let Some(path) = &self.env_file_path {
            let path = path.display();
            banner.push_str(&format!(
                "# all variables, once ready: set -a; . '{path}'; set +a\n"
            ));
        }
        banner
    }

    /// Resolves when a task that should run as long as the agent ends early:
    /// the subscription (a rejected token) or the env file writer (a write
    /// error). Pending forever once both are gone, so it can be polled again
    /// after a failure that the caller chose to outlive.
    pub async fn failure(&mut self) -> AgentError {
        enum Ended {
            Subscription(Result<Result<(), SubscriptionError>, JoinError>),
            EnvFile(Result<Result<(), EnvFileError>, JoinError>),
        }
        let ended = {
            let subscription = async {
                match &mut self.subscription {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            };
            let env_file = async {
                match &mut self.env_file {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ended = subscription => Ended::Subscription(ended),
                ended = env_file => Ended::EnvFile(ended),
            }
        };
        match ended {
            Ended::Subscription(ended) => {
                self.subscription = None;
                match ended {
                    Ok(Ok(())) => AgentError::SubscriptionEnded,
                    Ok(Err(error)) => AgentError::Subscription(error),
                    Err(join) => AgentError::SubscriptionTask(join),
                }
            }
            Ended::EnvFile(ended) => {
                self.env_file = None;
                match ended {
                    Ok(Ok(())) => AgentError::EnvFileEnded,
                    Ok(Err(error)) => AgentError::EnvFile(error),
                    Err(join) => AgentError::EnvFileTask(join),
                }
            }
        }
    }

    /// Signals every task to stop, waits at most [`DRAIN_TIMEOUT`] for them
    /// (the listener closes first; the env file is removed on the way out),
    /// then logs how many requests each version still held served.
    pub async fn stop(self) {
        self.shutdown.send_replace(true);
        let drain = async {
            let _ = self.server.await;
            if let Some(env_file) = self.env_file
                && let Ok(Err(error)) = env_file.await
            {
                tracing::warn!(%error, "cannot remove the env file");
            }
            if let Some(subscription) = self.subscription {
                subscription.abort();
            }
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
            tracing::warn!("shutdown did not finish in time");
        }
        self.store.served().log_all();
    }

    /// Serves until `shutdown` resolves (`Ok`) or a task fails for good
    /// (that error), then stops. A subscription that ended for good (a
    /// revoked token) does not stop the agent while it holds an unexpired
    /// credential: it logs why, says so on `/readyz`, and serves what it
    /// holds until the last of it expires, then returns the error (or
    /// earlier, with it, if `shutdown` resolves). Exiting at once would
    /// take credentials from running code that a restart cannot bring back.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        let result = tokio::select! {
            () = &mut shutdown => Ok(()),
            error = self.failure() => Err(error),
        };
        let result = match result {
            Err(error @ AgentError::Subscription(_)) => match self.outlive(&error) {
                Some(left) => {
                    tokio::select! {
                        () = &mut shutdown => {}
                        () = tokio::time::sleep(left) => {}
                    }
                    Err(error)
                }
                None => Err(error),
            },
            other => other,
        };
        self.stop().await;
        result
    }

    /// After the subscription ended for good with `error`: records it for
    /// `/readyz`, logs it, and returns how long what is held stays live
    /// (`None`: nothing is, so there is nothing to serve).
    fn outlive(&self, error: &AgentError) -> Option<Duration> {
        let why = chain(error);
        self.store.subscription_ended(why.clone());
        let now = SystemTime::now();
        let Some(until) = self.store.current().last_expiry(now) else {
            tracing::error!("{why}; nothing unexpired is held, stopping");
            return None;
        };
        tracing::error!(
            until = %humantime::format_rfc3339_seconds(until),
            "{why}; serving the credentials held until they expire, then stopping"
        );
        Some(until.duration_since(now).unwrap_or_default())
    }

    /// Runs `command` once the agent is ready and returns its exit code (see
    /// the [`exec` module](crate::exec)), then stops. Until the command starts, a
    /// failure (a rejected token) ends it with that error: waiting out the
    /// timeout would only hide it. Once the command runs, a failure is
    /// logged and the command keeps being served what the agent holds until
    /// it expires: stopping the user's work would not bring it back.
    pub async fn exec(
        mut self,
        command: &ExecConfig,
        signals: &mut mpsc::Receiver<ForwardedSignal>,
    ) -> Result<i32, AgentError> {
        let store = self.store.clone();
        let endpoints = self.endpoints.clone();
        let waited = tokio::select! {
            waited = exec::wait_ready(&store, command.wait_timeout, signals) => waited,
            error = self.failure() => {
                self.stop().await;
                return Err(error);
            }
        };
        let code = match waited {
            Ok(Waited::Ready(_)) => {
                let supervise = exec::supervise(command, &store, &endpoints, signals);
                tokio::pin!(supervise);
                loop {
                    tokio::select! {
                        code = &mut supervise => break code,
                        error = self.failure() => {
                            if matches!(error, AgentError::Subscription(_)) {
                                self.store.subscription_ended(chain(&error));
                            }
                            tracing::error!(
                                "{}; the command keeps running with the credentials held until they expire",
                                chain(&error)
                            );
                        }
                    }
                }
            }
            Ok(Waited::Signalled(signal)) => Ok(signal.exit_code()),
            Err(error) => Err(error),
        };
        self.stop().await;
        Ok(code?)
    }
}

/// A future that resolves once `true` is sent on `shutdown`, or once the
/// sender is dropped (the handle went away).
fn until(shutdown: &watch::Sender<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut receiver = shutdown.subscribe();
    async move {
        let _ = receiver.wait_for(|stop| *stop).await;
    }
}

/// `error` and its sources joined with ": ", as the binary prints errors;
/// the one rendering of an error chain in the agent's logs and statuses.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_the_token_length_only() {
        let config = AgentConfig::new(
            "http://127.0.0.1:1",
            "dev",
            "w1",
            Zeroizing::new("agent-token-secret".into()),
        );
        let debug = format!("{config:?}");
        assert!(!debug.contains("agent-token-secret"), "{debug}");
        assert!(debug.contains("<redacted 18 bytes>"), "{debug}");
    }

    #[test]
    fn connections_are_half_the_descriptors_within_bounds() {
        assert_eq!(max_connections_for(None), http::MAX_CONNECTIONS);
        assert_eq!(max_connections_for(Some(10)), 16);
        assert_eq!(max_connections_for(Some(256)), 128);
        assert_eq!(max_connections_for(Some(1 << 20)), http::MAX_CONNECTIONS);
    }

    #[test]
    fn errors_read_as_the_binary_prints_them() {
        let error = AgentError::TokenFile(io::Error::other("no space left"));
        assert_eq!(
            chain(&error),
            "cannot write the local authorization token file: no space left"
        );
    }

    #[tokio::test]
    async fn a_seal_key_for_another_cluster_is_refused_before_serving() {
        let mut config = AgentConfig::new(
            "http://127.0.0.1:1",
            "dev",
            "w1",
            Zeroizing::new("t".into()),
        );
        config.seal_key = Some(SealKeySource::Key(SealKey::generate("prod")));
        let Err(error) = Agent::start(config).await else {
            panic!("started with another cluster's key");
        };
        assert_eq!(
            error.to_string(),
            "the seal key is for cluster prod, not dev: use the key `credstream seal-key --cluster dev` prints"
        );
    }
}
