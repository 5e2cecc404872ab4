//! `credstream-agent`: flags, sockets and signals; the work is in the
//! library (see `lib.rs`).

use std::ffi::OsString;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use credstream_agent::env_file::{EnvFile, EnvFileError};
use credstream_agent::exec::{self, ExecConfig, Waited};
use credstream_agent::hardening;
use credstream_agent::http::{self, AuthToken, LocalEndpoints, LocalServer, TokenFile};
use credstream_agent::store::CredentialStore;
use credstream_agent::subscription::{self, SubscriptionConfig, SubscriptionError};
use credstream_proto::connect::{BrokerAddress, TransportArgs};
use tokio::sync::watch;
use tokio::task::JoinHandle;
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
    /// variables to export on stdout.
    Run(AgentArgs),
    /// Serve credentials and run a command with them once ready; the
    /// command's exit status becomes the agent's.
    Exec(ExecArgs),
}

#[derive(Args)]
struct AgentArgs {
    /// The broker's URL (https://HOST:PORT, or http:// to loopback).
    #[arg(long, env = "CREDSTREAM_BROKER")]
    broker: String,
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
        conflicts_with_all = ["token_file", "token_fd"],
        required_unless_present_any = ["token_file", "token_fd"]
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
    let token = match agent_token(agent_args) {
        Ok(token) => token,
        Err(error) => {
            eprintln!("credstream-agent: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let fd_limit = hardening::raise_fd_limit();
    tracing::debug!(?fd_limit, "file descriptor limit");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("credstream-agent: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let max_connections = fd_limit.map_or(http::MAX_CONNECTIONS, |limit| {
        // Leave half the descriptors for everything else.
        usize::try_from(limit / 2)
            .unwrap_or(usize::MAX)
            .clamp(16, http::MAX_CONNECTIONS)
    });
    let start = Start {
        token,
        max_connections,
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args, start).await.map(|()| 0),
            Command::Exec(args) => exec(args, start).await,
        }
    });
    // Do not wait for blocked tasks (a stuck connection) at exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(error) => {
            eprintln!("credstream-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The agent token, read the one way it was given. A token given as an
/// argument, in `CREDSTREAM_TOKEN` or in a file is moved into a descriptor
/// by re-executing the agent (which does not return); only if that fails
/// does the agent go on with it as read (see `hardening`).
fn agent_token(args: &AgentArgs) -> Result<Zeroizing<String>> {
    if let Some(fd) = args.token_fd {
        return hardening::read_token_fd(fd)
            .with_context(|| format!("cannot read the agent token from descriptor {fd}"));
    }
    let token = match (&args.token, &args.token_file) {
        (Some(token), _) => Zeroizing::new(token.trim().to_owned()),
        (None, Some(file)) => Zeroizing::new(
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the token file {}", file.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => bail!("give the agent token with --token-file, --token-fd or --token"),
    };
    let argv: Vec<OsString> = std::env::args_os().collect();
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
    Ok(token)
}

/// What `main` prepared for `run` and `exec`.
struct Start {
    token: Zeroizing<String>,
    max_connections: usize,
}

/// The running parts shared by `run` and `exec`.
struct Agent {
    store: CredentialStore,
    endpoints: Arc<LocalEndpoints>,
    shutdown: watch::Sender<bool>,
    /// `None` once it ended (and its end was reported).
    subscription: Option<JoinHandle<Result<(), SubscriptionError>>>,
    server: JoinHandle<()>,
    /// `None` when there is no env file, or once the writer ended.
    env_file: Option<JoinHandle<Result<(), EnvFileError>>>,
    _token_file: TokenFile,
}

impl Agent {
    async fn start(args: &AgentArgs, start: Start) -> Result<Self> {
        let address = BrokerAddress {
            url: args.broker.clone(),
            token: start.token.as_str().to_owned(),
            cluster_id: args.cluster.clone(),
            ca_cert: args.transport.ca_cert.clone(),
            client_identity: args.transport.client_identity(),
            insecure: args.transport.insecure,
        };
        // Fail on a bad URL or the plaintext rule now, before serving.
        address.endpoint()?;

        let seal_key = args
            .seal_key_file
            .as_deref()
            .map(|path| credstream_agent::seal::read_key_file(path, &args.cluster))
            .transpose()?;
        if let Some(key) = &seal_key {
            tracing::info!(key_id = %key.key_id_hex(), "sealed delivery: only sealed updates are accepted");
        }
        let store = CredentialStore::with_gate(credstream_agent::seal::Gate::new(seal_key));
        let auth = AuthToken::generate();
        let token_file =
            TokenFile::create(&auth).context("cannot write the local authorization token file")?;
        let gce_metadata = !args.no_gce_metadata;
        let router = http::router(store.clone(), auth.clone(), gce_metadata);
        let server = LocalServer::bind(args.listen, router)
            .await?
            .max_connections(start.max_connections);
        let endpoints = Arc::new(LocalEndpoints {
            addr: server.local_addr(),
            token: auth,
            token_file: Some(token_file.path().to_path_buf()),
            gce_metadata,
        });
        let env_file = args
            .env_file
            .clone()
            .map(|path| EnvFile::new(path, store.clone(), endpoints.clone()))
            .transpose()?;
        tracing::info!(
            addr = %endpoints.addr,
            cluster = %args.cluster,
            agent = %args.agent_id,
            "serving local endpoints"
        );

        let (shutdown, _) = watch::channel(false);
        let server = tokio::spawn(server.serve(until(&shutdown)));
        let config = SubscriptionConfig::new(address, args.agent_id.clone());
        let subscription = tokio::spawn(subscription::run(config, store.clone(), until(&shutdown)));
        let env_file = env_file.map(|file| tokio::spawn(file.run(until(&shutdown))));
        Ok(Self {
            store,
            endpoints,
            shutdown,
            subscription: Some(subscription),
            server,
            env_file,
            _token_file: token_file,
        })
    }

    /// Resolves when a task that should run as long as the agent ends early:
    /// the subscription (a rejected token) or the env file writer (a write
    /// error). Pending forever once both are gone.
    async fn failure(&mut self) -> anyhow::Error {
        enum Ended {
            Subscription(Result<Result<(), SubscriptionError>, tokio::task::JoinError>),
            EnvFile(Result<Result<(), EnvFileError>, tokio::task::JoinError>),
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
                    Ok(Ok(())) => anyhow::anyhow!("the subscription ended"),
                    Ok(Err(error)) => {
                        anyhow::Error::new(error).context("the subscription to the broker failed")
                    }
                    Err(join) => anyhow::Error::new(join).context("the subscription task failed"),
                }
            }
            Ended::EnvFile(ended) => {
                self.env_file = None;
                match ended {
                    Ok(Ok(())) => anyhow::anyhow!("the env file writer ended"),
                    Ok(Err(error)) => anyhow::Error::new(error),
                    Err(join) => anyhow::Error::new(join).context("the env file task failed"),
                }
            }
        }
    }

    /// Signals every task to stop and waits a bounded time for them (the
    /// env file is removed on the way out).
    async fn stop(self) {
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
        if tokio::time::timeout(http::DRAIN_TIMEOUT, drain)
            .await
            .is_err()
        {
            tracing::warn!("shutdown did not finish in time");
        }
        self.store.served().log_all();
    }
}

/// A future that resolves once `true` is sent on `shutdown`.
fn until(shutdown: &watch::Sender<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut receiver = shutdown.subscribe();
    async move {
        let _ = receiver.wait_for(|stop| *stop).await;
    }
}

async fn run(args: AgentArgs, start: Start) -> Result<()> {
    // Handlers first: once the address is printed, a SIGTERM must mean a
    // clean stop (env file and token file removed), not the default kill.
    let mut signals = exec::os_signals().context("cannot install signal handlers")?;
    let mut agent = Agent::start(&args, start).await?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {}", agent.endpoints.addr)?;
    for (name, value) in agent.endpoints.public_exports() {
        writeln!(stdout, "export {name}='{value}'")?;
    }
    if let Some(path) = &args.env_file {
        writeln!(
            stdout,
            "# all variables, once ready: set -a; . '{}'; set +a",
            path.display()
        )?;
    }
    stdout.flush()?;
    drop(stdout);

    let result = tokio::select! {
        Some(signal) = signals.recv() => {
            tracing::info!(?signal, "shutting down");
            Ok(())
        }
        error = agent.failure() => Err(error),
    };
    agent.stop().await;
    result
}

async fn exec(args: ExecArgs, start: Start) -> Result<i32> {
    // Handlers first: a SIGTERM from here on is forwarded, not fatal.
    let mut signals = exec::os_signals().context("cannot install signal handlers")?;
    let mut agent = Agent::start(&args.agent, start).await?;
    let mut program = args.command.into_iter();
    let mut config = ExecConfig::new(
        program.next().context("no command given after --")?,
        program.collect(),
    );
    config.wait_timeout = args.wait_timeout;
    config.restart_on_change = args.restart_on_change;

    // Until the child starts, a broken subscription (a rejected token) is
    // fatal: waiting out the timeout would only hide it.
    let store = agent.store.clone();
    let endpoints = agent.endpoints.clone();
    let waited = tokio::select! {
        waited = exec::wait_ready(&store, config.wait_timeout, &mut signals) => waited,
        error = agent.failure() => {
            agent.stop().await;
            return Err(error);
        }
    };
    let code = match waited {
        Ok(Waited::Ready(_)) => {
            // Once it runs, the child keeps being served what the agent
            // holds, until it expires, even if the subscription fails for
            // good: stopping the user's work would not bring it back.
            let supervise = exec::supervise(&config, &store, &endpoints, &mut signals);
            tokio::pin!(supervise);
            loop {
                tokio::select! {
                    code = &mut supervise => break code,
                    error = agent.failure() => tracing::error!(
                        "{error:#}; the command keeps running with the credentials held until they expire"
                    ),
                }
            }
        }
        Ok(Waited::Signalled(signal)) => Ok(signal.exit_code()),
        Err(error) => Err(error),
    };
    agent.stop().await;
    Ok(code?)
}
