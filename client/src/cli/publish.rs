//! `credstream publish`: check the broker and the local identities, start a
//! [`PublishSession`], and print what happens until a signal or a terminal
//! error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use credstream_client::session::{PublishSession, SessionError, SessionEvent};
use credstream_proto::connect::BrokerAddress;
use credstream_proto::v1::{EnvVar, UpdateAck};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::broadcast::error::RecvError;

use super::access::AccessView;
use super::broker::{self, BrokerOptions};
use super::identity::{self, AwsAudit, IdentityOptions};
use super::output::{Printer, kind_name, reason_name, time_and_distance};

/// How long to wait for the broker to confirm a revocation at exit.
const REVOKE_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// The exit status when another publisher took the cluster over
/// (`ABORTED`): distinct from 1 (any other error) so that a supervisor can
/// leave it alone, e.g. systemd's `RestartPreventExitStatus=3`.
pub const EXIT_TAKEN_OVER: u8 = 3;

/// The `publish` flags.
pub struct PublishOptions {
    /// Where to publish.
    pub broker: BrokerOptions,
    /// What to mint from.
    pub identity: IdentityOptions,
    /// `--env KEY=VALUE`.
    pub env: Vec<EnvVar>,
    /// `--env-file F`.
    pub env_files: Vec<PathBuf>,
    /// `--revoke-on-exit`.
    pub revoke_on_exit: bool,
    /// `--no-seal`.
    pub no_seal: bool,
    /// `--seal-key-file F`.
    pub seal_key_file: Option<PathBuf>,
    /// `--aws-source-identity`, `--aws-tag` (the cluster is filled in from
    /// `broker`).
    pub aws_audit: AwsAudit,
}

/// Runs `credstream publish` until Ctrl-C / SIGTERM (exit 0), another
/// publisher taking the cluster over ([`EXIT_TAKEN_OVER`]) or another error
/// no retry can fix (exit 1).
pub async fn run(options: PublishOptions) -> Result<ExitCode> {
    let address = options.broker.address()?;
    let env = credstream_client::env::collect(&options.env_files, &options.env)?;
    if !options.identity.aws && !options.identity.gcp && env.is_empty() {
        bail!("nothing to publish: --no-aws and --no-gcp were given, and no --env or --env-file");
    }
    let audit = AwsAudit {
        cluster: Some(address.cluster_id.clone()),
        ..options.aws_audit.clone()
    };
    let minters = options.identity.minters_for(&audit).await?;
    let mut signals = Signals::install()?;

    // The identities and the broker are independent: check both at once, so
    // a wrong URL or token is reported before anything is minted.
    let (usable, checked) = tokio::join!(identity::usable(minters), preflight(&address));
    checked?;
    let mut printer = Printer::stdout();
    for line in &usable.lines {
        printer.line(line);
    }
    if usable.minters.is_empty() && env.is_empty() {
        bail!(
            "nothing to publish: no local credentials were found for the kinds asked for (see above), and no --env or --env-file was given"
        );
    }
    let mut what: Vec<String> = usable
        .minters
        .iter()
        .map(|m| kind_name(m.kind()).to_owned())
        .collect();
    if !env.is_empty() {
        what.push(format!(
            "{} private env variable{}",
            env.len(),
            if env.len() == 1 { "" } else { "s" }
        ));
    }
    printer.line(format!(
        "publishing {} to cluster {} at {}",
        what.join(", "),
        address.cluster_id,
        address.url
    ));

    let mut builder = PublishSession::builder(address.clone());
    if let Some((key, line)) = super::seal_key::for_publish(
        &address.cluster_id,
        options.seal_key_file.as_deref(),
        options.no_seal,
    )? {
        printer.line(line);
        builder = builder.seal(key);
    } else {
        printer.line(
            "not sealing (--no-seal): the broker can read every credential and env value it relays",
        );
    }
    for minter in usable.minters {
        builder = builder.minter(minter);
    }
    if !env.is_empty() {
        builder = builder.private_env(env.iter().map(|v| (v.name.clone(), v.value.clone())));
    }
    drop(env);
    let mut session = builder.start()?;
    let mut events = session.events();
    let mut view = EventView {
        stopped: session.watch_stopped_kinds(),
        delivered: None,
        disconnected: false,
    };
    let mut access_ends = session.watch_access_ends();
    let mut access_open = true;
    let mut access = AccessView::default();

    let stop = loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) => view.show(&mut printer, &address, event),
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => {}
            },
            changed = access_ends.changed(), if access_open => {
                if changed.is_err() {
                    access_open = false;
                    continue;
                }
                let ends = access_ends.borrow_and_update().clone();
                for line in access.update(&ends, std::time::SystemTime::now()) {
                    printer.line(line);
                }
            }
            () = sleep_until_wall(access.next_warning()) => {
                for line in access.due(std::time::SystemTime::now()) {
                    printer.line(line);
                }
            }
            name = signals.recv() => break Stop::Signal(name),
            ended = session.wait() => break Stop::Ended(ended),
        }
    };
    while let Ok(event) = events.try_recv() {
        view.show(&mut printer, &address, event);
    }

    match stop {
        Stop::Signal(name) => {
            printer.line(format!("stopping ({name})"));
            if options.revoke_on_exit {
                revoke(&session, &mut printer, &address).await;
            }
            let ended = session.shutdown().await;
            printer.finish();
            match ended {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(error) => ended_with(&address, error),
            }
        }
        Stop::Ended(ended) => {
            printer.finish();
            match ended {
                Ok(()) => Err(anyhow!("the publish session ended unexpectedly")),
                Err(error) => ended_with(&address, error),
            }
        }
    }
}

/// Sleeps until the wall-clock time `at`; forever when there is none.
async fn sleep_until_wall(at: Option<std::time::SystemTime>) {
    match at {
        Some(at) => {
            let left = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(left).await;
        }
        None => std::future::pending().await,
    }
}

/// How a session error ends the command: taken over exits with
/// [`EXIT_TAKEN_OVER`] after saying so; anything else is an error (exit 1).
fn ended_with(address: &BrokerAddress, error: SessionError) -> Result<ExitCode> {
    if matches!(error, SessionError::TakenOver(_)) {
        eprintln!("credstream: {:#}", session_error(address, error));
        return Ok(ExitCode::from(EXIT_TAKEN_OVER));
    }
    Err(session_error(address, error))
}

enum Stop {
    Signal(&'static str),
    Ended(Result<(), SessionError>),
}

/// Connects and asks for the cluster's status: proves the URL, TLS and the
/// token before the session starts retrying in the background.
async fn preflight(address: &BrokerAddress) -> Result<()> {
    let mut admin = broker::connect_admin(address).await?;
    broker::get_cluster(&mut admin, address).await?;
    Ok(())
}

/// Revokes everything and waits (bounded) until the broker has applied it.
async fn revoke(session: &PublishSession, printer: &mut Printer, address: &BrokerAddress) {
    let mut acks = session.acks();
    let before = acks.borrow_and_update().version;
    if session.revoke(&[], true).await.is_err() {
        printer.line("could not revoke: the session has ended");
        return;
    }
    let confirmed = tokio::time::timeout(
        REVOKE_CONFIRM_TIMEOUT,
        acks.wait_for(|ack| ack.version > before),
    )
    .await;
    match confirmed {
        Ok(Ok(_)) => printer.line(format!(
            "revoked everything published to cluster {}; agents stop serving it now",
            address.cluster_id
        )),
        _ => printer.line(format!(
            "could not confirm the revocation within {}s (is the broker reachable?)",
            REVOKE_CONFIRM_TIMEOUT.as_secs()
        )),
    }
}

/// A session error with the fix spelled out.
fn session_error(address: &BrokerAddress, error: SessionError) -> anyhow::Error {
    match error {
        SessionError::Unauthenticated(message) => {
            broker::status_error(address, &tonic::Status::unauthenticated(message))
        }
        SessionError::PermissionDenied(message) => {
            broker::status_error(address, &tonic::Status::permission_denied(message))
        }
        SessionError::TakenOver(message) => anyhow!(
            "another publisher took over cluster {}: {message}\n  \
             only one publisher per cluster is live at a time; this one stops (exit status {EXIT_TAKEN_OVER}: \
             a supervisor should not restart it, e.g. systemd's RestartPreventExitStatus={EXIT_TAKEN_OVER})",
            address.cluster_id
        ),
        other => anyhow!(other),
    }
}

/// Turns session events into lines, remembering what was already said.
struct EventView {
    /// Kinds the session reported as failing permanently.
    stopped: tokio::sync::watch::Receiver<Vec<credstream_proto::v1::CredentialKind>>,
    /// The last "delivered" line printed: (version, agents).
    delivered: Option<(u64, u32)>,
    /// True while the last thing said about the connection is "lost".
    disconnected: bool,
}

impl EventView {
    fn show(&mut self, printer: &mut Printer, address: &BrokerAddress, event: SessionEvent) {
        match event {
            SessionEvent::Connected { agents } => {
                self.disconnected = false;
                printer.line(format!(
                    "connected to the broker at {} (cluster {}, {agents} agent{} connected)",
                    address.url,
                    address.cluster_id,
                    plural(agents)
                ));
                printer.status(format!("agents: {agents} connected"));
            }
            SessionEvent::RefreshRequested { kind, reason } => {
                printer.line(format!(
                    "refresh requested: {} ({})",
                    kind_name(kind),
                    reason_name(reason)
                ));
            }
            SessionEvent::Minted {
                kind,
                principal,
                expires_at,
            } => {
                let mut line = format!("minted {}", kind_name(kind));
                if !principal.is_empty() {
                    line.push_str(&format!(" for {principal}"));
                }
                if let Some(at) = expires_at {
                    line.push_str(&format!(", valid until {}", time_and_distance(at)));
                }
                printer.line(line);
            }
            SessionEvent::MintFailed { kind, message } => {
                if self.stopped.borrow().contains(&kind) {
                    printer.line(format!(
                        "could not mint {}: {message}; retrying cannot fix this, so the broker stops asking: fix it, then restart credstream publish",
                        kind_name(kind)
                    ));
                } else {
                    printer.line(format!(
                        "could not mint {}: {message}; the broker will ask again",
                        kind_name(kind)
                    ));
                }
            }
            SessionEvent::Delivered(ack) => self.delivered(printer, ack),
            SessionEvent::Disconnected { reason, retry_in } => {
                let retry = format!("{:.1}s", retry_in.as_secs_f64());
                if reason.contains("takeover hold-down") {
                    // The broker refused this hello: another publisher holds
                    // the cluster and this one was displaced a moment ago.
                    printer.line(format!(
                        "the broker keeps the cluster with the other publisher for now: {reason}; trying again in {retry}"
                    ));
                    printer.status(format!(
                        "held off by the takeover hold-down; retrying in {retry}"
                    ));
                    self.disconnected = true;
                    return;
                }
                if self.disconnected {
                    printer.status(format!("broker unreachable; retrying in {retry}"));
                } else {
                    printer.line(format!(
                        "lost the broker: {reason}; reconnecting in {retry} (agents keep serving what they hold)"
                    ));
                    printer.status(format!("broker unreachable; retrying in {retry}"));
                }
                self.disconnected = true;
            }
        }
    }

    fn delivered(&mut self, printer: &mut Printer, ack: UpdateAck) {
        printer.status(format!(
            "agents: {}/{} hold version {}",
            ack.agents_current, ack.agents_connected, ack.version
        ));
        if ack.agents_current < ack.agents_connected {
            return;
        }
        let key = (ack.version, ack.agents_connected);
        if self.delivered == Some(key) {
            return;
        }
        self.delivered = Some(key);
        if ack.agents_connected == 0 {
            printer.line(format!(
                "version {} is with the broker; no agents are connected yet",
                ack.version
            ));
        } else {
            printer.line(format!(
                "delivered version {} to {}/{} agent{}",
                ack.version,
                ack.agents_current,
                ack.agents_connected,
                plural(ack.agents_connected)
            ));
        }
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Ctrl-C and SIGTERM, installed once so none is missed between polls.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "interrupted",
            _ = self.terminate.recv() => "terminated",
        }
    }
}
