//! `credstream-agent`: flags, the process hardening and signals; the agent
//! itself is the library's (`credstream_agent::agent`).

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use credstream_agent::exec::{self, ExecConfig};
use credstream_agent::{Agent, AgentConfig, SealKeySource, agent, hardening, notify};
use credstream_proto::connect::TransportArgs;
use credstream_proto::join::JoinString;
use tracing_subscriber::EnvFilter;
use zeroize::Zeroizing;

/// The worker side of credstream: subscribes to a broker and serves the
/// published credentials to unmodified code on this machine.
#[derive(Parser)]
#[command(name = "credstream-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve credentials until stopped; prints the listen address and the
    /// variables to export on stdout. Under systemd (`Type=notify`), tells
    /// it READY=1 once ready, after the --env-file is first written.
    Run(AgentArgs),
    /// Serve credentials and run a command with them once ready; the
    /// command's exit status becomes the agent's.
    Exec(ExecArgs),
}

#[derive(Args)]
struct AgentArgs {
    /// The broker's URL (https://HOST:PORT, or http:// to loopback).
    /// (Required unless a join string is given: --join-file, --join-fd or
    /// CREDSTREAM_JOIN.)
    #[arg(long, env = "CREDSTREAM_BROKER")]
    broker: Option<String>,
    /// A file holding a join string from `credstream-broker init` (the
    /// broker's address, an agent token and the broker's pinned key): the
    /// broker is reached over TLS and accepted by its key alone, instead of
    /// --broker, --token-file and a CA.
    /// The join string may also be given whole in CREDSTREAM_JOIN (never as
    /// an argument: it holds a token), or on a descriptor with --join-fd.
    #[arg(
        long,
        env = "CREDSTREAM_JOIN_FILE",
        conflicts_with_all = ["broker", "token", "token_file", "token_fd", "ca_cert", "join_fd"]
    )]
    join_file: Option<PathBuf>,
    /// An open file descriptor to read a join string from (to its end;
    /// then closed), e.g. `--join-fd 3 3<agent.join`. The agent itself
    /// moves a join string from --join-file or CREDSTREAM_JOIN into one.
    #[arg(
        long,
        env = "CREDSTREAM_JOIN_FD",
        conflicts_with_all = ["broker", "token", "token_file", "token_fd", "ca_cert"]
    )]
    join_fd: Option<i32>,
    /// The cluster to serve credentials of.
    #[arg(long, env = "CREDSTREAM_CLUSTER")]
    cluster: String,
    /// This agent's id, unique within the cluster (e.g. the host name).
    #[arg(long, env = "CREDSTREAM_AGENT_ID")]
    agent_id: String,
    /// The agent token. Prefer --token-file or --token-fd: an argument is
    /// visible to every local user until the agent re-executes itself
    /// without it, and stays in shell history.
    #[arg(
        long,
        env = "CREDSTREAM_TOKEN",
        hide_env_values = true,
        conflicts_with_all = ["token_file", "token_fd"]
    )]
    token: Option<String>,
    /// A file holding the agent token (read once at start).
    #[arg(long, env = "CREDSTREAM_TOKEN_FILE", conflicts_with = "token_fd")]
    token_file: Option<PathBuf>,
    /// An open file descriptor to read the agent token from (to its end;
    /// then closed), e.g. `--token-fd 3 3<token`. The agent itself moves a
    /// token given any other way into one.
    #[arg(long, env = "CREDSTREAM_TOKEN_FD")]
    token_fd: Option<i32>,
    /// The loopback address for the local endpoints; port 0 picks a free one.
    #[arg(long, env = "CREDSTREAM_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Also write the variables to this file (mode 0600, replaced
    /// atomically on every change, removed at exit).
    #[arg(long, env = "CREDSTREAM_ENV_FILE")]
    env_file: Option<PathBuf>,
    /// Do not emulate the GCE metadata server (and do not set
    /// GCE_METADATA_HOST).
    #[arg(long, env = "CREDSTREAM_NO_GCE_METADATA")]
    no_gce_metadata: bool,
    /// The cluster's seal key (from `credstream seal-key --cluster ID`).
    /// With it, the agent accepts only credentials and env the publisher
    /// sealed, and refuses anything unsealed, altered or replayed. Without
    /// it, sealed updates are refused.
    #[arg(long, env = "CREDSTREAM_SEAL_KEY_FILE")]
    seal_key_file: Option<PathBuf>,
    /// Keep the sequences of the sealed updates accepted in this file
    /// (mode 0600, created if missing, one per agent), so that after a
    /// restart the agent still refuses older sealed updates it refused
    /// before. Needs --seal-key-file.
    #[arg(long, env = "CREDSTREAM_STATE_FILE")]
    state_file: Option<PathBuf>,
    #[command(flatten)]
    transport: TransportArgs,
}

#[derive(Args)]
struct ExecArgs {
    #[command(flatten)]
    agent: AgentArgs,
    /// How long to wait for the agent to become ready before giving up.
    #[arg(long, env = "CREDSTREAM_WAIT_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    wait_timeout: Duration,
    /// Restart the command when the private environment changes (debounced).
    #[arg(long, env = "CREDSTREAM_RESTART_ON_CHANGE")]
    restart_on_change: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<OsString>,
}

fn main() -> ExitCode {
    // First, in this image and in the re-executed one (exec resets it):
    // processes of the same user may no longer read this one's memory or
    // environment (see `hardening`).
    let inspection = hardening::forbid_inspection();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("warn,credstream_agent=info")),
        )
        .init();
    if let Err(error) = inspection {
        tracing::warn!(
            %error,
            "cannot mark the agent non-dumpable: processes of this user can read its memory"
        );
    }
    let agent_args = match &cli.command {
        Command::Run(args) => args,
        Command::Exec(args) => &args.agent,
    };
    let result = agent_token(agent_args).and_then(|token| {
        let fd_limit = hardening::raise_fd_limit();
        tracing::debug!(?fd_limit, "file descriptor limit");
        let max_connections = agent::max_connections_for(fd_limit);
        let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
        let result = runtime.block_on(async {
            // Handlers first: once `run` printed the address, a SIGTERM must
            // mean a clean stop (env file and token file removed), not the
            // default kill; under `exec` it is forwarded, not fatal.
            let mut signals = exec::os_signals().context("cannot install signal handlers")?;
            match cli.command {
                Command::Run(args) => {
                    let agent = Agent::start(config(args, token, max_connections)?).await?;
                    let mut stdout = std::io::stdout();
                    stdout
                        .write_all(agent.banner().as_bytes())
                        .and_then(|()| stdout.flush())?;
                    // Under systemd's Type=notify, units ordered after this
                    // one start once the env file they read is written.
                    let ready = agent.ready();
                    tokio::spawn(async move {
                        ready.await;
                        match notify::ready() {
                            Ok(true) => tracing::info!("ready: told the service manager"),
                            Ok(false) => {}
                            Err(error) => tracing::warn!(
                                %error,
                                "cannot tell the service manager that the agent is ready"
                            ),
                        }
                    });
                    let signalled = async move {
                        match signals.recv().await {
                            Some(signal) => tracing::info!(?signal, "shutting down"),
                            None => std::future::pending().await,
                        }
                    };
                    agent.run_until(signalled).await?;
                    Ok(0)
                }
                Command::Exec(args) => {
                    let mut program = args.command.into_iter();
                    let command = ExecConfig {
                        wait_timeout: args.wait_timeout,
                        restart_on_change: args.restart_on_change,
                        ..ExecConfig::new(
                            program.next().context("no command given after --")?,
                            program.collect(),
                        )
                    };
                    let agent = Agent::start(config(args.agent, token, max_connections)?).await?;
                    Ok(agent.exec(&command, &mut signals).await?)
                }
            }
        });
        // Do not wait for blocked tasks (a stuck connection) at exit.
        runtime.shutdown_timeout(Duration::from_secs(1));
        result
    });
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(error) => {
            eprintln!("credstream-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The agent token and, if one was given, the join string, each read the
/// one way it was given. A token given as an argument, in
/// `CREDSTREAM_TOKEN` or in a file, and a join string given in a file or
/// in `CREDSTREAM_JOIN`, are moved into a descriptor by re-executing the
/// agent (which does not return); only if that fails does the agent go on
/// with them as read (see `hardening`).
fn agent_token(args: &AgentArgs) -> Result<(Zeroizing<String>, Option<JoinString>)> {
    if let Some(fd) = args.token_fd {
        let token = hardening::read_token_fd(fd)
            .with_context(|| format!("cannot read the agent token from descriptor {fd}"))?;
        return Ok((token, None));
    }
    if let Some(fd) = args.join_fd {
        let text = hardening::read_token_fd(fd)
            .with_context(|| format!("cannot read the join string from descriptor {fd}"))?;
        let join = JoinString::parse(&text)
            .with_context(|| format!("the join string on descriptor {fd} is not usable"))?;
        return Ok((join.token.clone(), Some(join)));
    }
    let argv: Vec<OsString> = std::env::args_os().collect();
    if let Some(join) = join(args)? {
        let error = hardening::hand_over_join(&join.encode(), &argv);
        tracing::warn!(
            %error,
            "cannot re-execute the agent without the join string in its arguments and \
             environment; going on with them there"
        );
        return Ok((join.token.clone(), Some(join)));
    }
    let token = credstream_proto::rules::token::read(
        args.token.as_deref(),
        args.token_file.as_deref(),
        "agent",
        "--join-file, --join-fd, CREDSTREAM_JOIN, --token-file, --token-fd or --token",
    )?;
    if hardening::without_token_arguments(argv.get(2..).unwrap_or_default()).1 {
        tracing::warn!(
            "--token on the command line is visible to every local user until the agent \
             re-executes itself without it; use --token-file or --token-fd"
        );
    }
    let error = hardening::hand_over(&token, &argv);
    tracing::warn!(
        %error,
        "cannot re-execute the agent without the token in its arguments and environment; \
         going on with them there"
    );
    Ok((token, None))
}

/// The join string of --join-file or `CREDSTREAM_JOIN`, if given (the
/// variable conflicts with the flags a join string replaces).
fn join(args: &AgentArgs) -> Result<Option<JoinString>> {
    let from_env = std::env::var_os(JOIN_VARIABLE);
    let (text, from) = match (&args.join_file, from_env) {
        (Some(_), Some(_)) => anyhow::bail!("give either --join-file or {JOIN_VARIABLE}, not both"),
        (Some(path), None) => (
            Zeroizing::new(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the join file {}", path.display()))?,
            ),
            format!("the join file {}", path.display()),
        ),
        (None, Some(value)) => {
            if args.broker.is_some()
                || args.token.is_some()
                || args.token_file.is_some()
                || args.transport.ca_cert.is_some()
            {
                anyhow::bail!(
                    "{JOIN_VARIABLE} gives the broker, the token and its key: do not also give \
                     --broker, --token, --token-file or --ca-cert"
                );
            }
            let text = value
                .into_string()
                .map_err(|_| anyhow::anyhow!("{JOIN_VARIABLE} is not text"))?;
            (Zeroizing::new(text), JOIN_VARIABLE.to_owned())
        }
        (None, None) => return Ok(None),
    };
    let join = JoinString::parse(&text).with_context(|| format!("{from} is not usable"))?;
    Ok(Some(join))
}

/// The variable that may hold a join string.
const JOIN_VARIABLE: &str = "CREDSTREAM_JOIN";

/// The library's config from the flags.
fn config(
    args: AgentArgs,
    (token, join): (Zeroizing<String>, Option<JoinString>),
    max_connections: usize,
) -> Result<AgentConfig> {
    let (broker, pins) = match (join, args.broker) {
        (Some(join), _) => (format!("https://{}", join.address), join.pins),
        (None, Some(broker)) => (broker, Vec::new()),
        (None, None) => anyhow::bail!(
            "give the broker with --broker, or a join string with --join-file, --join-fd or {JOIN_VARIABLE}"
        ),
    };
    let mut config = AgentConfig::new(broker, args.cluster, args.agent_id, token);
    config.pins = pins;
    config.listen = args.listen;
    config.env_file = args.env_file;
    config.gce_metadata = !args.no_gce_metadata;
    config.seal_key = args.seal_key_file.map(SealKeySource::File);
    config.state_file = args.state_file;
    config.max_connections = max_connections;
    config.client_identity = args.transport.client_identity();
    config.ca_cert = args.transport.ca_cert;
    config.insecure = args.transport.insecure;
    Ok(config)
}
