//! `credstream-agent exec -- CMD`: run a user command with the credentials
//! it expects, and only then.
//!
//! - [`wait_ready`] waits for the condition `/readyz` reports (an unexpired
//!   credential of every declared kind, and the declared private env), up
//!   to a timeout, and says what it was still waiting for when it gives up.
//! - [`supervise`] starts the child with the agent's variables
//!   ([`LocalEndpoints::child_env`]) on top of the inherited environment,
//!   minus the agent's own `CREDSTREAM_*` settings (the broker token must not
//!   reach user code); forwards SIGINT and SIGTERM; and returns the child's
//!   exit status as the agent's (`128 + n` for a child killed by signal
//!   `n`, as shells report it). With `restart_on_change`, a change of the
//!   private env's content stops the child (SIGTERM, then SIGKILL after a
//!   grace period) and starts it again with the new env once ready; changes
//!   are debounced, so a burst restarts once. Credential rotation does not
//!   restart: the endpoints serve the fresh credential to the running child.
//!
//! The child runs in its own process group and signals go to the whole
//! group, as `tini -g` and `dumb-init` do: a terminal's Ctrl-C reaches the
//! agent alone and is forwarded exactly once, and grandchildren (a shell
//! script's commands) get it too. The cost: a child that reads from the
//! terminal is not in the terminal's foreground group and is stopped by
//! SIGTTIN; `exec` is meant for non-interactive workers.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use credstream_proto::v1::PrivateEnv;
use rustix::process::{Pid, Signal, kill_process_group};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::http::{ChildEnv, LocalEndpoints};
use crate::store::{AgentState, CredentialStore, NotReady};

/// How `exec` runs its command.
#[derive(Clone, Debug)]
pub struct ExecConfig {
    /// The program (looked up in `PATH`).
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// How long to wait for readiness before giving up (at start and before
    /// each restart).
    pub wait_timeout: Duration,
    /// Restart the child when the private env's content changes.
    pub restart_on_change: bool,
    /// A restart happens once no further change arrived for this long.
    pub restart_debounce: Duration,
    /// How long a child has to exit after SIGTERM before SIGKILL, on restart.
    pub stop_grace: Duration,
}

impl ExecConfig {
    /// A config with the defaults: 60 s wait, no restarts, 2 s debounce,
    /// 10 s grace.
    pub fn new(program: OsString, args: Vec<OsString>) -> Self {
        Self {
            program,
            args,
            wait_timeout: Duration::from_secs(60),
            restart_on_change: false,
            restart_debounce: Duration::from_secs(2),
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// A signal the agent received and passes on to the child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardedSignal {
    /// SIGINT.
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl ForwardedSignal {
    fn signal(self) -> Signal {
        match self {
            Self::Interrupt => Signal::INT,
            Self::Terminate => Signal::TERM,
        }
    }

    /// The exit status a shell reports for a process ended by this signal:
    /// what the agent exits with when the signal arrives before the child
    /// started.
    pub fn exit_code(self) -> i32 {
        128 + self.signal().as_raw()
    }
}

/// Errors running the command.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The agent did not become ready in time; the message names what was
    /// missing (broker, publisher, a credential, the private env).
    #[error("not starting the command: after waiting {}, {reason}", humantime::format_duration(*.waited))]
    NotReady {
        /// How long it waited.
        waited: Duration,
        /// What was still missing.
        reason: NotReady,
    },
    /// The command could not be started (not found, not executable).
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: io::Error,
    },
    /// Waiting for the child failed.
    #[error("cannot wait for the child process: {0}")]
    Wait(io::Error),
}

/// The outcome of [`wait_ready`] when it did not time out.
#[derive(Debug)]
pub enum Waited {
    /// Ready, with the state that is.
    Ready(AgentState),
    /// A signal arrived first; nothing was started.
    Signalled(ForwardedSignal),
}

/// SIGINT and SIGTERM as a channel, for [`wait_ready`] and [`supervise`].
/// Installing the handlers replaces the default "terminate" action, so the
/// agent outlives the signal long enough to pass it on.
pub fn os_signals() -> io::Result<mpsc::Receiver<ForwardedSignal>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let received = tokio::select! {
                Some(()) = interrupt.recv() => ForwardedSignal::Interrupt,
                Some(()) = terminate.recv() => ForwardedSignal::Terminate,
                else => break,
            };
            if tx.send(received).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Waits until the store is ready (see the module documentation), at most
/// `timeout`. Readiness is gained only through a message from the broker,
/// so waking on store changes is enough; expiry can only take it away. It
/// wakes on refusals too, so that what it logs as the reason names them
/// (once, not per refusal), and so does its error on timeout.
pub async fn wait_ready(
    store: &CredentialStore,
    timeout: Duration,
    signals: &mut mpsc::Receiver<ForwardedSignal>,
) -> Result<Waited, ExecError> {
    let deadline = Instant::now() + timeout;
    let mut changes = store.subscribe();
    let mut refusals = store.gate().refusals().subscribe();
    let mut last_reason: Option<NotReady> = None;
    loop {
        refusals.borrow_and_update();
        let state = changes.borrow_and_update().clone();
        let reason = match store.readiness(&state, SystemTime::now()) {
            Ok(()) => return Ok(Waited::Ready(state)),
            Err(reason) => reason,
        };
        if last_reason.as_ref().map(NotReady::kind) != Some(reason.kind()) {
            tracing::info!(%reason, "waiting before starting the command");
        }
        last_reason = Some(reason);
        tokio::select! {
            Ok(()) = changes.changed() => {}
            Ok(()) = refusals.changed() => {}
            Some(signal) = signals.recv() => return Ok(Waited::Signalled(signal)),
            () = tokio::time::sleep_until(deadline) => {
                let reason = store
                    .readiness(&store.current(), SystemTime::now())
                    .err()
                    .or(last_reason)
                    .unwrap_or(NotReady::NoSnapshot);
                return Err(ExecError::NotReady { waited: timeout, reason });
            }
        }
    }
}

/// Runs the command as described in the module documentation and returns
/// the exit code for the agent. Waits for readiness first (immediately
/// satisfied when the caller already waited).
pub async fn supervise(
    config: &ExecConfig,
    store: &CredentialStore,
    endpoints: &LocalEndpoints,
    signals: &mut mpsc::Receiver<ForwardedSignal>,
) -> Result<i32, ExecError> {
    warn_about_shadowing_variables();
    let mut changes = store.subscribe();
    loop {
        let state = match wait_ready(store, config.wait_timeout, signals).await? {
            Waited::Ready(state) => state,
            Waited::Signalled(signal) => return Ok(signal.exit_code()),
        };
        changes.borrow_and_update();
        let started_env = state.env.clone();
        let mut child = spawn(config, &endpoints.child_env(&state, SystemTime::now()))?;
        tracing::info!(pid = child.id(), "command started");

        let mut restart_at: Option<Instant> = None;
        let mut kill_at: Option<Instant> = None;
        let mut restarting = false;
        let mut stopping = false;
        loop {
            tokio::select! {
                status = child.wait() => {
                    let status = status.map_err(ExecError::Wait)?;
                    if restarting && !stopping {
                        tracing::info!(%status, "command stopped for a restart");
                        break;
                    }
                    tracing::info!(%status, "command exited");
                    return Ok(exit_code(status));
                }
                Some(signal) = signals.recv() => {
                    tracing::info!(?signal, "forwarding a signal to the command");
                    send(&child, signal.signal());
                    stopping = true;
                    restart_at = None;
                }
                Ok(()) = changes.changed(), if config.restart_on_change && !stopping && !restarting => {
                    if !same_env(&started_env, &changes.borrow_and_update().env) {
                        restart_at = Some(Instant::now() + config.restart_debounce);
                    }
                }
                () = sleep_until(restart_at) => {
                    restart_at = None;
                    if !same_env(&started_env, &changes.borrow().env) {
                        tracing::info!("the private environment changed: restarting the command");
                        send(&child, Signal::TERM);
                        restarting = true;
                        kill_at = Some(Instant::now() + config.stop_grace);
                    }
                }
                () = sleep_until(kill_at) => {
                    kill_at = None;
                    tracing::warn!(grace = %humantime::format_duration(config.stop_grace), "the command ignored SIGTERM: killing it");
                    send(&child, Signal::KILL);
                }
            }
        }
    }
}

fn spawn(config: &ExecConfig, env: &ChildEnv) -> Result<Child, ExecError> {
    let mut command = Command::new(&config.program);
    command.args(&config.args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CREDSTREAM_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter());
    command.process_group(0).kill_on_drop(true);
    command.spawn().map_err(|source| ExecError::Spawn {
        program: config.program.to_string_lossy().into_owned(),
        source,
    })
}

/// Signals the child's process group (its pid: it leads the group).
fn send(child: &Child, signal: Signal) {
    let Some(pid) = child.id().and_then(|id| Pid::from_raw(id as i32)) else {
        return; // already reaped
    };
    if let Err(error) = kill_process_group(pid, signal) {
        tracing::debug!(%error, "cannot signal the command's process group");
    }
}

/// The agent's exit code for the child's status.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Compares two private envs by content (names and values), ignoring order
/// and version: a publisher that re-sends the same env after a reconnect
/// must not restart anything.
fn same_env(a: &Option<Arc<PrivateEnv>>, b: &Option<Arc<PrivateEnv>>) -> bool {
    vars_of(a) == vars_of(b)
}

fn vars_of(env: &Option<Arc<PrivateEnv>>) -> Option<BTreeMap<&str, &str>> {
    env.as_ref().map(|env| {
        env.set
            .iter()
            .map(|v| (v.name.as_str(), v.value.as_str()))
            .collect()
    })
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Variables in the agent's own environment that the child inherits and
/// that make the SDKs look elsewhere before reaching the agent (docs/facts.md, fact 5 and
/// 10). Logged by name only.
fn warn_about_shadowing_variables() {
    const SHADOWING: &[&str] = &[
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "NO_GCE_CHECK",
    ];
    for name in SHADOWING {
        if std::env::var_os(name).is_some() {
            tracing::warn!(
                variable = name,
                "the command inherits {name}, which the SDKs read before the agent's endpoints"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use credstream_proto::v1::credential_update::Credential;
    use credstream_proto::v1::{
        AwsCredential, ClusterInfo, ClusterSnapshot, CredentialKind, CredentialUpdate,
        SealedPayload, subscribe_response::Message,
    };

    use super::*;
    use crate::refusals::tests::Captured;

    /// A sealed AWS credential, which an agent without a seal key refuses.
    fn sealed(version: u64) -> Message {
        Message::Credential(CredentialUpdate {
            credential: Some(Credential::Aws(AwsCredential::default())),
            sealed: Some(SealedPayload::default()),
            version,
            ..Default::default()
        })
    }

    /// Issue 32: an agent without `--seal-key-file` that refuses the
    /// publisher's sealed updates says so, with the fix, while it waits and
    /// when it gives up; not only "no aws credential received yet".
    #[tokio::test(start_paused = true)]
    async fn the_wait_names_the_refused_updates_and_the_fix() {
        let captured = Captured::default();
        let _guard = captured.install();
        let store = CredentialStore::new();
        store.apply(Message::Snapshot(ClusterSnapshot {
            info: Some(ClusterInfo {
                kinds: vec![CredentialKind::Aws as i32],
                private_env: false,
                publisher_connected: true,
                version: 1,
            }),
            ..Default::default()
        }));
        let (_signal, mut signals) = mpsc::channel(1);
        let broker = store.clone();
        tokio::spawn(async move {
            for version in 2..=4 {
                broker.apply(sealed(version));
                tokio::task::yield_now().await;
            }
        });
        let error = wait_ready(&store, Duration::from_secs(60), &mut signals)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(
                "no aws credential received yet: refused 3 updates from the broker (last: aws version 4: it is sealed and this agent has no seal key: start it with --seal-key-file"
            ),
            "{error}"
        );
        let waits: Vec<String> = captured
            .lines()
            .into_iter()
            .filter(|line| line.contains("waiting before starting the command"))
            .collect();
        assert_eq!(
            waits.len(),
            2,
            "once before, once on the refusals: {waits:#?}"
        );
        assert!(!waits[0].contains("refused"), "{}", waits[0]);
        assert!(
            waits[1].contains("from the broker (last: aws version")
                && waits[1].contains("--seal-key-file"),
            "{}",
            waits[1]
        );
    }
}
