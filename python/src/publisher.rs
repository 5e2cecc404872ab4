//! The publisher behind `credstream.Publisher`: the same checks, minters and
//! [`PublishSession`] as `credstream publish`, run on a tokio runtime that
//! the publisher owns, so that it keeps answering the broker's refresh
//! requests after the notebook cell that created it has returned.
//!
//! Every method blocks the calling thread (the Python layer releases the
//! GIL around it) and returns a [`PublisherError`] whose message is the one
//! the CLI prints, `fix:` line included (with the CLI's flag names for
//! sealing turned into the keyword arguments: `seal=False`,
//! `seal_key_file=`).
//!
//! Sealing is the CLI's: [`seal_key::for_publish`] finds the
//! cluster's key (creating it on first use, in the same place `credstream
//! publish` and `credstream seal-key` use) and the session seals every
//! credential and env change with it. [`cluster_seal_key`] is the same
//! lookup for the Dask plugin, which carries the key to the workers'
//! agents.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use credstream_client::broker::{self, BrokerError, BrokerOptions};
use credstream_client::identity::{self, AwsAudit, IdentityOptions};
use credstream_client::seal_key;
use credstream_client::session::{PublishSession, SessionError, SessionEvent};
use credstream_proto::connect::{BrokerAddress, ClientIdentity, ConnectError};
use credstream_proto::convert::system_time;
use credstream_proto::seal::SealKey;
use credstream_proto::v1::{ClusterStatus, CredentialKind, EnvVar};
use tokio::runtime::Runtime;
use tokio::sync::broadcast::error::RecvError;
use zeroize::Zeroizing;

/// How long `close` waits for the broker to confirm a revocation (as the CLI).
const REVOKE_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// How often `wait_delivered` asks the broker how far a version spread.
const DELIVERY_POLL: Duration = Duration::from_millis(100);
/// How long a private env change may take to reach the broker before the
/// next change is sent anyway (it is still sent, in order).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the caller did wrong or what went wrong, for the Python exception
/// class; the message says the same thing in words, with the fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The broker rejected the token (`UNAUTHENTICATED`).
    Authentication,
    /// The token is valid but not for this cluster or role.
    Permission,
    /// The broker cannot be reached.
    Unreachable,
    /// TLS with the broker failed, or plaintext was refused.
    Tls,
    /// No local credentials for anything asked for, and no env.
    NoCredentials,
    /// A bad option: a token file that cannot be read, a bad URL, a bad env
    /// variable, a duration out of range.
    Config,
    /// Another publisher took over the cluster.
    TakenOver,
    /// The publisher was closed, or its session ended.
    Closed,
    /// `wait_delivered` ran out of time.
    Timeout,
    /// Anything else the broker or a minter said.
    Other,
}

/// A failure, with the CLI's words.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct PublisherError {
    /// For the exception class.
    pub kind: ErrorKind,
    /// What happened and the fix. Never a secret.
    pub message: String,
}

impl PublisherError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The CLI's error, with its words (`fix:` line included: the library
    /// is the one place the fixes are written), classified by its variant.
    fn from_cli(error: BrokerError) -> Self {
        Self {
            kind: ErrorKind::of(&error),
            message: format!("{:#}", anyhow::Error::from(error)),
        }
    }
}

impl ErrorKind {
    /// The exception class for each way the broker cannot be used.
    fn of(error: &BrokerError) -> Self {
        match error {
            BrokerError::TokenRejected { .. } => Self::Authentication,
            BrokerError::WrongCluster { .. } => Self::Permission,
            BrokerError::Unreachable { .. } => Self::Unreachable,
            BrokerError::NotTls { .. }
            | BrokerError::ClientCertificateRefused { .. }
            | BrokerError::Tls { .. }
            | BrokerError::NotHttp2 { .. }
            // Refused plaintext, and a TLS configuration that does not load
            // (the only transport setting that can fail before connecting).
            | BrokerError::Address(ConnectError::PlaintextToRemote { .. })
            | BrokerError::Address(ConnectError::Transport { .. }) => Self::Tls,
            BrokerError::Token(_)
            | BrokerError::Address(_)
            | BrokerError::JoinFile { .. }
            | BrokerError::Join(_) => Self::Config,
            BrokerError::Answered { .. } => Self::Other,
        }
    }
}

/// `credstream publish`'s options, by their Python names.
#[derive(Clone, Default)]
pub struct PublisherOptions {
    /// `--broker`.
    pub broker: String,
    /// `--cluster`.
    pub cluster: String,
    /// `--token`.
    pub token: Option<String>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// `--ca-cert`.
    pub ca_cert: Option<PathBuf>,
    /// `--tls-client-cert`.
    pub tls_client_cert: Option<PathBuf>,
    /// `--tls-client-key`.
    pub tls_client_key: Option<PathBuf>,
    /// `--insecure`.
    pub insecure: bool,
    /// What to mint from: `aws`, `gcp` (not `--no-aws`, `--no-gcp`) and
    /// the `--aws-*` and `--gcp-scopes` flags, as the CLI's.
    pub identity: IdentityOptions,
    /// `--env KEY=VALUE`, in order.
    pub env: Vec<(String, String)>,
    /// `--env-file F`.
    pub env_files: Vec<PathBuf>,
    /// `--revoke-on-exit`: revoke at `close`.
    pub revoke_on_close: bool,
    /// `--no-seal`: publish unsealed (Python's `seal=False`). Off by
    /// default, as in the CLI: every update is sealed.
    pub no_seal: bool,
    /// `--seal-key-file`: the cluster's seal key file (created if missing);
    /// default: the per-cluster file in the user's config directory.
    pub seal_key_file: Option<PathBuf>,
    /// Python's `seal_key="session"`: seal with a key made for this
    /// publisher alone ([`SealKey::generate`]), held in memory and never
    /// written anywhere, instead of the cluster's key file. Agents get it
    /// from [`Publisher::session_seal_key`] (the Dask plugin carries it);
    /// the next session of the same cluster has another key, which the
    /// agents of this one refuse. No CLI flag: `credstream publish` keeps
    /// the file, which agents started with `--seal-key-file` read.
    pub session_seal_key: bool,
    /// `--aws-source-identity`.
    pub aws_source_identity: Option<String>,
    /// `--aws-tag KEY=VALUE`, in order.
    pub aws_tags: Vec<(String, String)>,
}

impl std::fmt::Debug for PublisherOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublisherOptions")
            .field("broker", &self.broker)
            .field("cluster", &self.cluster)
            .field("env", &format_args!("<{} variables>", self.env.len()))
            .finish_non_exhaustive()
    }
}

/// What the session said, kept for `status`.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// True between a welcome and the next disconnect.
    pub connected: bool,
    /// Why the stream was last lost, while disconnected.
    pub disconnected: Option<String>,
    /// The last failed mint per kind, cleared by the next success.
    pub mint_failed: BTreeMap<&'static str, String>,
}

/// One credential in [`Status`].
#[derive(Clone, Debug, PartialEq)]
pub struct CredentialInfo {
    /// `aws` or `gcp`.
    pub kind: &'static str,
    /// ARN or e-mail.
    pub principal: String,
    /// Account or project.
    pub account: String,
    /// The version it was published at.
    pub version: u64,
    /// Unix seconds.
    pub issued_at: Option<f64>,
    /// Unix seconds.
    pub expires_at: Option<f64>,
    /// Sealed for the cluster's agents: the broker cannot read it.
    pub sealed: bool,
}

/// One agent in [`Status`].
#[derive(Clone, Debug, PartialEq)]
pub struct AgentInfo {
    /// Its id.
    pub agent_id: String,
    /// The highest version it acknowledged.
    pub acked_version: u64,
    /// Unix seconds.
    pub connected_at: Option<f64>,
}

/// What `status()` returns: metadata only, never a secret value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Status {
    /// The cluster id.
    pub cluster: String,
    /// The broker URL.
    pub broker: String,
    /// This publisher's stream is open.
    pub connected: bool,
    /// The cluster's latest version at the broker.
    pub version: u64,
    /// Live credentials at the broker.
    pub credentials: Vec<CredentialInfo>,
    /// The private env's names (values are never returned).
    pub env_names: Vec<String>,
    /// The private env's version at the broker.
    pub env_version: u64,
    /// The private env at the broker is sealed (then `env_names` is empty:
    /// the broker cannot read them). `None` when it holds no env.
    pub env_sealed: Option<bool>,
    /// Whether the cluster is sealed, as the broker reports it: `Some(true)`
    /// when every credential and the env it holds are sealed,
    /// `Some(false)` when any is in clear, `None` while it holds none.
    pub sealed: Option<bool>,
    /// Connected agents.
    pub agents: Vec<AgentInfo>,
    /// Agents holding `version`.
    pub agents_current: u32,
    /// The last refresh error the broker recorded.
    pub last_refresh_error: String,
    /// The last failed mint per kind, from this publisher.
    pub mint_errors: Vec<(String, String)>,
    /// Why the stream is down, while it is.
    pub disconnected: Option<String>,
    /// How the session ended, once it has.
    pub ended: Option<String>,
}

struct Running {
    session: PublishSession,
    /// The private env version at the broker before the last change was
    /// sent; `wait_delivered` waits for a newer one.
    env_above: Option<u64>,
    /// The env as the broker should now hold it (to tell a change that
    /// changes nothing, which gets no new version).
    env: BTreeMap<String, Zeroizing<String>>,
}

/// A running publisher. See the module docs.
pub struct Publisher {
    runtime: Option<Runtime>,
    address: BrokerAddress,
    running: Mutex<Option<Running>>,
    ended: Mutex<Option<PublisherError>>,
    observed: Arc<Mutex<Observed>>,
    kinds: Vec<CredentialKind>,
    identity_lines: Vec<String>,
    revoke_on_close: bool,
    seal: SealInfo,
    /// With [`PublisherOptions::session_seal_key`]: the key (zeroized on
    /// drop; its `Debug` shows the id only).
    session_key: Option<SealKey>,
}

/// How a publisher seals: what `credstream publish` prints about it, the
/// key's id and its file. No key material.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SealInfo {
    /// The CLI's line: "sealing every credential … (key ID in PATH)", or
    /// "not sealing (seal=False): …".
    pub line: String,
    /// The key id (16 hex digits); `None` when not sealing.
    pub key_id: Option<String>,
    /// The key file; `None` when not sealing.
    pub key_file: Option<PathBuf>,
}

/// A cluster's seal key as the Dask plugin carries it to the workers: the
/// key file's line (the secret), its id and its file. Debug shows no key.
pub struct ClusterSealKey {
    /// `credstream-seal-v1:<cluster>:<base64>`, for the agent's
    /// `--seal-key-file`.
    pub line: Zeroizing<String>,
    /// The key id (16 hex digits).
    pub key_id: String,
    /// The file it was read from (or created in).
    pub key_file: PathBuf,
}

impl std::fmt::Debug for ClusterSealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSealKey")
            .field("key_id", &self.key_id)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

/// The CLI's words for the seal options, as the Python keyword arguments.
fn python_seal_words(message: &str) -> String {
    message
        .replace("--no-seal", "seal=False")
        .replace("--seal-key-file", "seal_key_file=")
}

/// A seal key that cannot be used: the CLI's message (file, reason, fix),
/// in Python's words.
fn seal_key_error(error: &anyhow::Error) -> PublisherError {
    PublisherError::new(ErrorKind::Config, python_seal_words(&format!("{error:#}")))
}

/// The seal key of `cluster` exactly as `credstream publish` (and
/// `Publisher`) finds it: `file`, else the per-cluster file in the user's
/// config directory; read, or created (0600, in a 0700 directory) if there
/// is none. A file readable by others, for another cluster or not a key is
/// a [`ErrorKind::Config`] error, and is left as it was.
pub fn cluster_seal_key(
    cluster: &str,
    file: Option<&Path>,
) -> Result<ClusterSealKey, PublisherError> {
    let key_file = seal_key::key_path(cluster, file).map_err(|e| seal_key_error(&e.into()))?;
    let (key, _) = seal_key::for_publish(cluster, Some(&key_file), false)
        .map_err(|e| seal_key_error(&e.into()))?
        .ok_or_else(|| PublisherError::new(ErrorKind::Other, "no seal key"))?;
    Ok(ClusterSealKey {
        line: key.encode(),
        key_id: key.key_id_hex(),
        key_file,
    })
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("broker", &self.address.url)
            .field("cluster", &self.address.cluster_id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix(at: &prost_types::Timestamp) -> Option<f64> {
    system_time(at)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
}

impl Publisher {
    /// Checks the broker (URL, TLS, token) and the local identities as
    /// `credstream publish` does, then starts the session in the
    /// background.
    pub fn start(options: PublisherOptions) -> Result<Self, PublisherError> {
        if options.no_seal && options.seal_key_file.is_some() {
            return Err(PublisherError::new(
                ErrorKind::Config,
                "seal=False and seal_key_file go against each other: give one or neither",
            ));
        }
        if options.session_seal_key && (options.no_seal || options.seal_key_file.is_some()) {
            return Err(PublisherError::new(
                ErrorKind::Config,
                "seal_key=\"session\" goes against seal=False and seal_key_file: a session key is made in memory for this publisher; give one of them",
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("credstream-publisher")
            .enable_all()
            .build()
            .map_err(|e| {
                PublisherError::new(
                    ErrorKind::Other,
                    format!("cannot start the async runtime: {e}"),
                )
            })?;
        let broker_options = BrokerOptions {
            url: options.broker.clone(),
            cluster: options.cluster.clone(),
            token: options.token.clone(),
            token_file: options.token_file.clone(),
            ca_cert: options.ca_cert.clone(),
            client_identity: match (&options.tls_client_cert, &options.tls_client_key) {
                (Some(cert), Some(key)) => Some(ClientIdentity {
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                (None, None) => None,
                _ => {
                    return Err(PublisherError::new(
                        ErrorKind::Config,
                        "tls_client_cert and tls_client_key go together: give both or neither",
                    ));
                }
            },
            insecure: options.insecure,
            join: None,
        };
        let address = broker_options.address().map_err(PublisherError::from_cli)?;
        let assignments: Vec<EnvVar> = options
            .env
            .iter()
            .map(|(name, value)| EnvVar {
                name: name.clone(),
                value: value.clone(),
            })
            .collect();
        let env = credstream_client::env::collect(&options.env_files, &assignments)
            .map_err(|e| PublisherError::new(ErrorKind::Config, e.to_string()))?;
        if !options.identity.aws && !options.identity.gcp && env.is_empty() {
            return Err(PublisherError::new(
                ErrorKind::NoCredentials,
                "nothing to publish: aws=False and gcp=False were given, and no env or env_files",
            ));
        }
        let audit = AwsAudit {
            cluster: Some(address.cluster_id.clone()),
            source_identity: options.aws_source_identity.clone(),
            tags: options.aws_tags.clone(),
        };
        let observed = Arc::new(Mutex::new(Observed::default()));
        let started = runtime.block_on(async {
            let minters = options
                .identity
                .minters_for(&audit)
                .await
                .map_err(|e| PublisherError::new(ErrorKind::Config, format!("{e:#}")))?;
            let (usable, checked) =
                tokio::join!(identity::usable(minters), preflight(&address));
            let held = checked?;
            if usable.minters.is_empty() && env.is_empty() {
                let mut message = String::from(
                    "nothing to publish: no local credentials were found for the kinds asked for, and no env was given",
                );
                for line in &usable.lines {
                    message.push_str("\n  ");
                    message.push_str(line);
                }
                return Err(PublisherError::new(ErrorKind::NoCredentials, message));
            }
            let kinds: Vec<CredentialKind> = usable.minters.iter().map(|m| m.kind()).collect();
            let mut builder = PublishSession::builder(address.clone())
                .revoke_on_exit(options.revoke_on_close);
            // As `credstream publish`: after the broker and identity checks,
            // before anything is sent; a key that cannot be used stops here.
            let mut session_key = None;
            let seal = if options.session_seal_key {
                let key = SealKey::generate(&address.cluster_id);
                let info = SealInfo {
                    line: format!(
                        "sealing every credential and env change for cluster {} with a key made for this session (key {}, in memory only, never in a file); agents need it: CredstreamPlugin.from_publisher(pub, ...) carries it to the Dask workers",
                        address.cluster_id,
                        key.key_id_hex()
                    ),
                    key_id: Some(key.key_id_hex()),
                    key_file: None,
                };
                session_key = Some(key.clone());
                builder = builder.seal(key);
                info
            } else {
                match seal_key::for_publish(
                &address.cluster_id,
                options.seal_key_file.as_deref(),
                options.no_seal,
            )
            .map_err(|e| seal_key_error(&e.into()))?
            {
                Some((key, line)) => {
                    let info = SealInfo {
                        line,
                        key_id: Some(key.key_id_hex()),
                        key_file: Some(
                            seal_key::key_path(
                                &address.cluster_id,
                                options.seal_key_file.as_deref(),
                            )
                            .map_err(|e| seal_key_error(&e.into()))?,
                        ),
                    };
                    builder = builder.seal(key);
                    info
                }
                None => SealInfo {
                    line: "not sealing (seal=False): the broker can read every credential and env value it relays".into(),
                    key_id: None,
                    key_file: None,
                },
                }
            };
            for minter in usable.minters {
                builder = builder.minter(minter);
            }
            if !env.is_empty() {
                builder =
                    builder.private_env(env.iter().map(|v| (v.name.clone(), v.value.clone())));
            }
            let session = builder
                .start()
                .map_err(|e| session_error(&address, e))?;
            tokio::spawn(watch_events(session.events(), observed.clone()));
            Ok::<_, PublisherError>((session, kinds, usable.lines, held, seal, session_key))
        });
        let (session, kinds, identity_lines, held, seal, session_key) = match started {
            Ok(started) => started,
            Err(error) => {
                runtime.shutdown_background();
                return Err(error);
            }
        };
        let env: BTreeMap<String, Zeroizing<String>> = env
            .iter()
            .map(|var| (var.name.clone(), Zeroizing::new(var.value.clone())))
            .collect();
        Ok(Self {
            runtime: Some(runtime),
            address,
            running: Mutex::new(Some(Running {
                session,
                env_above: initial_env_above(&env, held.as_ref(), seal.key_id.is_some()),
                env,
            })),
            ended: Mutex::new(None),
            observed,
            kinds,
            identity_lines,
            revoke_on_close: options.revoke_on_close,
            seal,
            session_key,
        })
    }

    /// Whether and how this publisher seals (no key material).
    pub fn seal_info(&self) -> &SealInfo {
        &self.seal
    }

    /// The session's seal key line (`credstream-seal-v1:<cluster>:<base64>`,
    /// secret) for the Dask plugin to carry to the workers' agents; `None`
    /// unless [`PublisherOptions::session_seal_key`].
    pub fn session_seal_key(&self) -> Option<Zeroizing<String>> {
        self.session_key.as_ref().map(SealKey::encode)
    }

    /// One line per kind asked for: who it publishes as, or why not.
    pub fn identity_lines(&self) -> &[String] {
        &self.identity_lines
    }

    /// The kinds being published (`aws`, `gcp`).
    pub fn kinds(&self) -> Vec<&'static str> {
        self.kinds.iter().map(|k| k.label()).collect()
    }

    fn runtime(&self) -> Result<&Runtime, PublisherError> {
        self.runtime.as_ref().ok_or_else(closed)
    }

    /// The running session, or how it ended.
    fn running(&self) -> Result<MutexGuard<'_, Option<Running>>, PublisherError> {
        let mut running = lock(&self.running);
        let finished = running
            .as_ref()
            .map(|r| r.session.is_finished())
            .unwrap_or(true);
        if finished {
            if let Some(mut ended) = running.take() {
                let result = self.runtime()?.block_on(ended.session.wait());
                let error = match result {
                    Ok(()) => closed(),
                    Err(error) => session_error(&self.address, error),
                };
                *lock(&self.ended) = Some(error);
            }
            return Err(lock(&self.ended).clone().unwrap_or_else(closed));
        }
        Ok(running)
    }

    /// Sets (merges) private env variables on every agent, through the
    /// broker. Returns once the change is on its way (held and sent on
    /// reconnect while the broker is away); [`Publisher::wait_delivered`]
    /// waits for the agents.
    pub fn send_private_envs(&self, vars: Vec<(String, String)>) -> Result<(), PublisherError> {
        let changes = {
            let guard = self.running()?;
            let running = guard.as_ref().ok_or_else(closed)?;
            vars.iter().any(|(name, value)| {
                running.env.get(name).map(|v| v.as_str()) != Some(value.as_str())
            })
        };
        self.change_env(changes, |session| {
            Box::pin(session.send_private_envs(vars.clone()))
        })?;
        let mut guard = self.running()?;
        if let Some(running) = guard.as_mut() {
            running.env.extend(
                vars.into_iter()
                    .map(|(name, value)| (name, Zeroizing::new(value))),
            );
        }
        Ok(())
    }

    /// Removes private env variables from every agent.
    pub fn unset_private_envs(&self, names: Vec<String>) -> Result<(), PublisherError> {
        let changes = {
            let guard = self.running()?;
            let running = guard.as_ref().ok_or_else(closed)?;
            names.iter().any(|name| running.env.contains_key(name))
        };
        self.change_env(changes, |session| {
            Box::pin(session.unset_private_envs(names.clone()))
        })?;
        let mut guard = self.running()?;
        if let Some(running) = guard.as_mut() {
            for name in &names {
                running.env.remove(name);
            }
        }
        Ok(())
    }

    /// Sends one env change. When it changes anything, remembers the env
    /// version the broker held before, so that `wait_delivered` can wait
    /// for the version that holds it (a change that changes nothing gets
    /// no new version from the broker).
    fn change_env(
        &self,
        changes: bool,
        send: impl FnOnce(
            &PublishSession,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), SessionError>> + Send + '_>,
        >,
    ) -> Result<(), PublisherError> {
        let runtime = self.runtime()?;
        let mut guard = self.running()?;
        let running = guard.as_mut().ok_or_else(closed)?;
        let before = if changes {
            // The previous change first, so that "the version before this
            // one" is not the previous change's own.
            if let Some(above) = running.env_above {
                let _ = runtime.block_on(self.env_version_above(above, SETTLE_TIMEOUT));
            }
            runtime
                .block_on(self.cluster())
                .ok()
                .flatten()
                .and_then(|c| c.private_env.map(|e| e.version))
                .or(Some(0))
        } else {
            None
        };
        runtime
            .block_on(send(&running.session))
            .map_err(|e| session_error(&self.address, e))?;
        if before.is_some() {
            running.env_above = before;
        }
        Ok(())
    }

    /// `GetCluster` for this publisher's cluster; `None` before the broker
    /// holds anything for it.
    async fn cluster(&self) -> Result<Option<ClusterStatus>, PublisherError> {
        let mut admin = broker::connect_admin(&self.address)
            .await
            .map_err(PublisherError::from_cli)?;
        broker::get_cluster(&mut admin, &self.address)
            .await
            .map_err(PublisherError::from_cli)
    }

    /// Waits until the broker's private env version is above `above`.
    async fn env_version_above(&self, above: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(cluster)) = self.cluster().await
                && cluster.private_env.is_some_and(|e| e.version > above)
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(DELIVERY_POLL).await;
        }
    }

    /// One check of `wait_delivered`'s condition: `Ok(true)` when the broker
    /// holds a live credential of every kind published and the latest env
    /// change, and every connected agent (at least `min_agents`) has
    /// acknowledged the cluster's latest version. `Err` for a mint that
    /// failed with nothing live to fall back on.
    pub fn delivered(&self, min_agents: u32) -> Result<(bool, String), PublisherError> {
        let runtime = self.runtime()?;
        let env_above = self.running()?.as_ref().and_then(|r| r.env_above);
        let cluster = match runtime.block_on(self.cluster()) {
            Ok(Some(cluster)) => cluster,
            Ok(None) => return Ok((false, "the broker holds nothing for the cluster yet".into())),
            Err(error) if error.kind == ErrorKind::Unreachable => {
                return Ok((false, error.message));
            }
            Err(error) => return Err(error),
        };
        let observed = lock(&self.observed).clone();
        for kind in &self.kinds {
            let live = cluster.credentials.iter().any(|c| c.kind == *kind as i32);
            if !live {
                if let Some(message) = observed.mint_failed.get(kind.label()) {
                    return Err(PublisherError::new(
                        ErrorKind::Other,
                        format!(
                            "could not mint {}: {message}",
                            kind.label().to_ascii_uppercase()
                        ),
                    ));
                }
                return Ok((
                    false,
                    format!("no live {} credential at the broker yet", kind.label()),
                ));
            }
        }
        let names_match = {
            let guard = self.running()?;
            let local = guard
                .as_ref()
                .map(|r| r.env.keys().cloned().collect::<Vec<_>>());
            let held = cluster
                .private_env
                .as_ref()
                .map(|e| e.names.clone())
                .unwrap_or_default();
            let held_sealed = cluster.private_env.as_ref().is_some_and(|e| e.sealed);
            // A sealed env shows no names: it is this publisher's when this
            // publisher seals (and `version_newer` holds); an unsealing
            // publisher waits until its clear env replaced it.
            local.is_none_or(|local| {
                if held_sealed {
                    self.seal.key_id.is_some()
                } else {
                    local == held
                }
            })
        };
        let version_newer = env_above.is_none_or(|above| {
            cluster
                .private_env
                .as_ref()
                .is_some_and(|e| e.version > above)
        });
        if !(names_match && version_newer) {
            return Ok((
                false,
                "the latest private env change has not reached the broker yet".into(),
            ));
        }
        let current = cluster
            .agents
            .iter()
            .filter(|a| a.acked_version >= cluster.version)
            .count();
        let connected = cluster.agents.len();
        let progress = format!(
            "{current}/{connected} agents hold version {}",
            cluster.version
        );
        Ok((
            current == connected && connected >= min_agents as usize,
            progress,
        ))
    }

    /// Waits until [`Publisher::delivered`] holds, up to `timeout`, checking
    /// `interrupted` between polls (Ctrl-C in a notebook).
    pub fn wait_delivered(
        &self,
        timeout: Duration,
        min_agents: u32,
        mut interrupted: impl FnMut() -> Result<(), PublisherError>,
    ) -> Result<(), PublisherError> {
        let deadline = Instant::now() + timeout;
        loop {
            let (done, progress) = self.delivered(min_agents)?;
            if done {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let wanted = if min_agents > 0 {
                    format!(" (waiting for at least {min_agents} agents)")
                } else {
                    String::new()
                };
                return Err(PublisherError::new(
                    ErrorKind::Timeout,
                    format!(
                        "not delivered within {:.1}s: {progress}{wanted}\n  \
                         fix: check that the workers' agents run and reach the broker \
                         (`credstream status --broker {} --cluster {}`)",
                        timeout.as_secs_f64(),
                        self.address.url,
                        self.address.cluster_id
                    ),
                ));
            }
            interrupted()?;
            std::thread::sleep(
                DELIVERY_POLL.min(deadline.saturating_duration_since(Instant::now())),
            );
        }
    }

    /// What the broker holds for the cluster and what this publisher saw.
    pub fn status(&self) -> Result<Status, PublisherError> {
        let runtime = self.runtime()?;
        let ended = match self.running() {
            Ok(_) => None,
            Err(error) => Some(error.message),
        };
        let observed = lock(&self.observed).clone();
        let mut status = Status {
            cluster: self.address.cluster_id.clone(),
            broker: self.address.url.clone(),
            connected: ended.is_none() && observed.connected,
            disconnected: observed.disconnected.clone(),
            mint_errors: observed
                .mint_failed
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            ended,
            ..Status::default()
        };
        let Some(cluster) = runtime.block_on(self.cluster())? else {
            return Ok(status);
        };
        status.version = cluster.version;
        status.credentials = cluster
            .credentials
            .iter()
            .map(|c| CredentialInfo {
                kind: c.kind().label(),
                principal: c.principal.clone(),
                account: c.account.clone(),
                version: c.version,
                issued_at: c.issued_at.as_ref().and_then(unix),
                expires_at: c.expires_at.as_ref().and_then(unix),
                sealed: c.sealed,
            })
            .collect();
        if let Some(env) = &cluster.private_env {
            status.env_names = env.names.clone();
            status.env_version = env.version;
            status.env_sealed = Some(env.sealed);
        }
        status.sealed = cluster_sealed(&cluster);
        status.agents = cluster
            .agents
            .iter()
            .map(|a| AgentInfo {
                agent_id: a.agent_id.clone(),
                acked_version: a.acked_version,
                connected_at: a.connected_at.as_ref().and_then(unix),
            })
            .collect();
        status.agents_current = cluster
            .agents
            .iter()
            .filter(|a| a.acked_version >= cluster.version)
            .count() as u32;
        status.last_refresh_error = cluster.last_refresh_error.clone();
        Ok(status)
    }

    /// True until `close` (or a terminal error).
    pub fn is_running(&self) -> bool {
        self.running().is_ok()
    }

    /// Ends the session: revokes everything first when `revoke` (or, with
    /// `None`, when the publisher was made with `revoke_on_close`) and waits
    /// up to 5 s for the broker to confirm it, then closes the stream.
    /// Returns whether a revocation was confirmed. Closing twice is a no-op.
    pub fn close(&mut self, revoke: Option<bool>) -> Result<bool, PublisherError> {
        let running = lock(&self.running).take();
        let Some(runtime) = self.runtime.take() else {
            return Ok(false);
        };
        let revoke = revoke.unwrap_or(self.revoke_on_close);
        let mut confirmed = false;
        let mut result = Ok(());
        if let Some(running) = running {
            let session = running.session;
            result = runtime.block_on(async {
                if revoke && !session.is_finished() {
                    let mut acks = session.acks();
                    let before = acks.borrow_and_update().version;
                    if session.revoke(&[], true).await.is_ok() {
                        confirmed = tokio::time::timeout(
                            REVOKE_CONFIRM_TIMEOUT,
                            acks.wait_for(|ack| ack.version > before),
                        )
                        .await
                        .is_ok_and(|r| r.is_ok());
                    }
                }
                session.shutdown().await
            });
        }
        runtime.shutdown_timeout(Duration::from_secs(1));
        *lock(&self.ended) = Some(closed());
        match result {
            Ok(()) | Err(SessionError::Closed) => {}
            // Ended on its own before close: report it once more only if
            // the caller asked for a revocation that could not happen.
            Err(error) if revoke => return Err(session_error(&self.address, error)),
            Err(_) => {}
        }
        if revoke && !confirmed {
            return Err(PublisherError::new(
                ErrorKind::Unreachable,
                format!(
                    "could not confirm the revocation within {}s (is the broker reachable?)",
                    REVOKE_CONFIRM_TIMEOUT.as_secs()
                ),
            ));
        }
        Ok(confirmed)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.close(None);
    }
}

fn closed() -> PublisherError {
    PublisherError::new(
        ErrorKind::Closed,
        "the publisher is closed; create a new credstream.Publisher",
    )
}

/// Connects and asks for the cluster's status, as `credstream publish`
/// does: proves the URL, TLS and the token before the session starts
/// retrying in the background.
async fn preflight(address: &BrokerAddress) -> Result<Option<ClusterStatus>, PublisherError> {
    let mut admin = broker::connect_admin(address)
        .await
        .map_err(PublisherError::from_cli)?;
    broker::get_cluster(&mut admin, address)
        .await
        .map_err(PublisherError::from_cli)
}

/// Whether the broker holds the cluster sealed: `Some(true)` when every
/// credential and the env it holds are sealed, `Some(false)` when any is in
/// clear, `None` when it holds neither.
fn cluster_sealed(cluster: &ClusterStatus) -> Option<bool> {
    let mut items = cluster
        .credentials
        .iter()
        .map(|c| c.sealed)
        .chain(cluster.private_env.as_ref().map(|e| e.sealed))
        .peekable();
    items.peek()?;
    Some(items.all(|sealed| sealed))
}

/// The env version `wait_delivered` must see exceeded for this publisher's
/// first env to be at the broker: the version the broker held before it
/// connected. When the broker already holds exactly these names in clear (a
/// restarted notebook publishing the same env unsealed), a replacement that
/// changes no value gets no new version, so then only the names are
/// checked. A sealed env always gets a new version (the broker cannot tell
/// that it changes nothing).
fn initial_env_above(
    env: &BTreeMap<String, Zeroizing<String>>,
    held: Option<&ClusterStatus>,
    sealing: bool,
) -> Option<u64> {
    if env.is_empty() {
        return None;
    }
    match held.and_then(|cluster| cluster.private_env.as_ref()) {
        None => Some(0),
        Some(held) if sealing || held.sealed => Some(held.version),
        Some(held) if held.names.iter().eq(env.keys()) => None,
        Some(held) => Some(held.version),
    }
}

/// A session error with the fix spelled out, as `credstream publish` says it.
fn session_error(address: &BrokerAddress, error: SessionError) -> PublisherError {
    match error {
        SessionError::Unauthenticated(message) => PublisherError::from_cli(broker::status_error(
            address,
            &tonic::Status::unauthenticated(message),
        )),
        SessionError::PermissionDenied(message) => PublisherError::from_cli(broker::status_error(
            address,
            &tonic::Status::permission_denied(message),
        )),
        SessionError::TakenOver(message) => PublisherError::new(
            ErrorKind::TakenOver,
            format!(
                "another publisher took over cluster {}: {message}\n  \
                 only one publisher per cluster is live at a time; this one stops",
                address.cluster_id
            ),
        ),
        SessionError::InvalidEnv(message) => {
            PublisherError::new(ErrorKind::Config, format!("invalid private env: {message}"))
        }
        SessionError::Closed => closed(),
        other => PublisherError::new(ErrorKind::Other, other.to_string()),
    }
}

/// Keeps [`Observed`] up to date from the session's events.
async fn watch_events(
    mut events: tokio::sync::broadcast::Receiver<SessionEvent>,
    observed: Arc<Mutex<Observed>>,
) {
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        };
        let mut observed = lock(&observed);
        match event {
            SessionEvent::Connected { .. } => {
                observed.connected = true;
                observed.disconnected = None;
            }
            SessionEvent::Disconnected { reason, .. } => {
                observed.connected = false;
                observed.disconnected = Some(reason);
            }
            SessionEvent::Minted { kind, .. } => {
                observed.mint_failed.remove(kind.label());
            }
            SessionEvent::MintFailed { kind, message } => {
                observed.mint_failed.insert(kind.label(), message);
            }
            SessionEvent::RefreshRequested { .. } | SessionEvent::Delivered(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(url: &str) -> BrokerAddress {
        BrokerAddress {
            url: url.into(),
            token: "t".into(),
            cluster_id: "dev".into(),
            ca_cert: None,
            client_identity: None,
            insecure: false,
            pins: Vec::new(),
        }
    }

    #[test]
    fn the_clis_messages_map_to_their_exception_kinds() {
        let https = address("https://broker.example:50051");
        let cases = [
            (
                broker::status_error(&https, &tonic::Status::unauthenticated("bad signature")),
                ErrorKind::Authentication,
            ),
            (
                broker::status_error(&https, &tonic::Status::permission_denied("wrong cluster")),
                ErrorKind::Permission,
            ),
            (
                broker::status_error(&https, &tonic::Status::unavailable("connection refused")),
                ErrorKind::Unreachable,
            ),
            (
                broker::transport_error(
                    &https,
                    // What a mutual-TLS broker's alert is once h2 hands it on.
                    &std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "received fatal alert: CertificateRequired",
                    ),
                ),
                ErrorKind::Tls,
            ),
            (
                broker::transport_error(
                    &address("http://127.0.0.1:1"),
                    &std::io::Error::other("connection refused"),
                ),
                ErrorKind::Unreachable,
            ),
        ];
        for (error, kind) in cases {
            let mapped = PublisherError::from_cli(error);
            assert_eq!(mapped.kind, kind, "{}", mapped.message);
            assert!(
                mapped.message.contains("fix:"),
                "the CLI's fix is kept: {}",
                mapped.message
            );
        }
    }

    #[test]
    fn a_plaintext_refusal_is_a_tls_error_and_a_missing_token_file_a_config_error() {
        let plaintext = BrokerOptions {
            url: "http://broker.example:50051".into(),
            cluster: "dev".into(),
            token: Some("t".into()),
            token_file: None,
            ca_cert: None,
            client_identity: None,
            insecure: false,
            join: None,
        };
        let error = PublisherError::from_cli(plaintext.address().unwrap_err());
        assert_eq!(error.kind, ErrorKind::Tls, "{}", error.message);
        let missing = BrokerOptions {
            url: "http://127.0.0.1:50051".into(),
            token: None,
            token_file: Some("/nonexistent/credstream-token".into()),
            ..plaintext
        };
        let error = PublisherError::from_cli(missing.address().unwrap_err());
        assert_eq!(error.kind, ErrorKind::Config, "{}", error.message);
        assert!(error.message.contains("/nonexistent/credstream-token"));
    }

    #[test]
    fn an_unreachable_broker_fails_start_with_the_fix() {
        // A port nothing listens on: bind, read the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let options = PublisherOptions {
            broker: format!("http://127.0.0.1:{port}"),
            cluster: "dev".into(),
            token: Some("token".into()),
            env: vec![("A".into(), "b".into())],
            ..PublisherOptions::default()
        };
        let error = Publisher::start(options).unwrap_err();
        assert_eq!(error.kind, ErrorKind::Unreachable, "{}", error.message);
        assert!(error.message.contains("fix:"), "{}", error.message);
        assert!(!error.message.contains("token\""), "{}", error.message);
    }

    #[test]
    fn the_plugin_finds_the_key_the_publisher_would_and_a_bad_one_is_left_alone() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys").join("dev.key");
        let created = cluster_seal_key("dev", Some(&path)).unwrap();
        assert!(created.line.starts_with("credstream-seal-v1:dev:"));
        assert!(!format!("{created:?}").contains(created.line.as_str()));
        let again = cluster_seal_key("dev", Some(&path)).unwrap();
        assert_eq!(again.key_id, created.key_id);
        assert_eq!(again.line.as_str(), created.line.as_str());
        // The CLI's own resolution agrees.
        let (key, line) = seal_key::for_publish("dev", Some(&path), false)
            .unwrap()
            .unwrap();
        assert_eq!(key.key_id_hex(), created.key_id);
        assert!(line.contains(&created.key_id), "{line}");

        let error = cluster_seal_key("prod", Some(&path)).unwrap_err();
        assert_eq!(error.kind, ErrorKind::Config);
        assert!(error.message.contains("not prod"), "{}", error.message);
        assert!(error.message.contains("seal=False"), "{}", error.message);
        assert!(!error.message.contains("--no-seal"), "{}", error.message);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = cluster_seal_key("dev", Some(&path)).unwrap_err();
        assert!(error.message.contains("chmod 600"), "{}", error.message);
        assert!(!error.message.contains(created.line.as_str()));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.trim(),
            created.line.as_str(),
            "the file is left as it was"
        );
    }

    #[test]
    fn no_seal_with_a_key_file_is_refused_before_anything_starts() {
        let options = PublisherOptions {
            broker: "http://127.0.0.1:1".into(),
            cluster: "dev".into(),
            token: Some("token".into()),
            env: vec![("A".into(), "b".into())],
            no_seal: true,
            seal_key_file: Some("/nonexistent/dev.key".into()),
            ..PublisherOptions::default()
        };
        let error = Publisher::start(options).unwrap_err();
        assert_eq!(error.kind, ErrorKind::Config, "{}", error.message);
        assert!(error.message.contains("seal=False"), "{}", error.message);
    }

    #[test]
    fn a_session_key_with_no_seal_or_a_key_file_is_refused_before_anything_starts() {
        for (no_seal, seal_key_file) in [(true, None), (false, Some("/nonexistent/dev.key"))] {
            let options = PublisherOptions {
                broker: "http://127.0.0.1:1".into(),
                cluster: "dev".into(),
                token: Some("token".into()),
                env: vec![("A".into(), "b".into())],
                no_seal,
                seal_key_file: seal_key_file.map(PathBuf::from),
                session_seal_key: true,
                ..PublisherOptions::default()
            };
            let error = Publisher::start(options).unwrap_err();
            assert_eq!(error.kind, ErrorKind::Config, "{}", error.message);
            assert!(
                error.message.contains("seal_key=\"session\""),
                "{}",
                error.message
            );
        }
    }

    #[test]
    fn a_cluster_is_sealed_when_everything_the_broker_holds_is() {
        use credstream_proto::v1::{CredentialStatus, PrivateEnvStatus};

        let credential = |sealed| CredentialStatus {
            sealed,
            ..CredentialStatus::default()
        };
        let env = |sealed| PrivateEnvStatus {
            sealed,
            ..PrivateEnvStatus::default()
        };
        let mut cluster = ClusterStatus::default();
        assert_eq!(cluster_sealed(&cluster), None);
        cluster.credentials = vec![credential(true)];
        assert_eq!(cluster_sealed(&cluster), Some(true));
        cluster.private_env = Some(env(false));
        assert_eq!(cluster_sealed(&cluster), Some(false));
        cluster.private_env = Some(env(true));
        cluster.credentials.push(credential(false));
        assert_eq!(cluster_sealed(&cluster), Some(false));
    }

    #[test]
    fn nothing_to_publish_is_refused_before_connecting() {
        let options = PublisherOptions {
            broker: "http://127.0.0.1:1".into(),
            cluster: "dev".into(),
            token: Some("token".into()),
            ..PublisherOptions::default()
        };
        let error = Publisher::start(options).unwrap_err();
        assert_eq!(error.kind, ErrorKind::NoCredentials, "{}", error.message);
    }
}
