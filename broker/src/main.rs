//! `credstream-broker`: flags, logging, signals. Everything else is the
//! library (`credstream_broker::server::start`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use credstream_broker::auth::{Role, TokenKey};
use credstream_broker::connections::{self, ConnectionLimits};
use credstream_broker::metrics::MetricsConfig;
use credstream_broker::rate_limit::CallRate;
use credstream_broker::refresh::RefreshConfig;
use credstream_broker::server::{self, BrokerConfig, TlsFiles};
use credstream_broker::state_dir::{self, StateDir};
use credstream_proto::join::JoinString;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// The credstream broker: holds each cluster's short-lived credentials in
/// memory, fans them out to the cluster's agents, and asks the publisher to
/// re-mint them before they expire.
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a signed token (alone, on stdout).
    Token(TokenArgs),
    /// Create a state directory (token key ring; a self-signed TLS pair
    /// unless --tls-cert is given) and print one join string per role for
    /// --cluster: secrets, hand each to its role only.
    Init(InitArgs),
}

#[derive(Debug, Args)]
struct InitArgs {
    /// The state directory (created 0700; existing files are kept).
    #[arg(long, env = "CREDSTREAM_STATE_DIR")]
    state_dir: PathBuf,
    /// HOST:PORT publishers and agents reach the broker at (goes into the
    /// join strings and, for a self-signed certificate, its names).
    #[arg(long, env = "CREDSTREAM_ADDRESS")]
    address: String,
    /// The cluster the join strings' tokens are for.
    #[arg(long, env = "CREDSTREAM_CLUSTER", default_value = "default")]
    cluster: String,
    /// The join strings' token lifetime.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// A certificate of your own (e.g. CA-signed) instead of a self-signed
    /// one; the join strings pin its key.
    #[arg(long, env = "CREDSTREAM_TLS_CERT")]
    tls_cert: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "CREDSTREAM_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Development mode: an in-memory key, and ready tokens and commands for
    /// cluster `dev` printed on stdout.
    #[arg(long, env = "CREDSTREAM_DEV")]
    dev: bool,
    /// File holding the token signing key (at least 32 random bytes:
    /// `head -c 32 /dev/urandom > key`).
    #[arg(
        long,
        env = "CREDSTREAM_TOKEN_KEY_FILE",
        required_unless_present_any = ["dev", "state_dir"]
    )]
    token_key_file: Option<PathBuf>,
    /// A state directory from `credstream-broker init` (created now if
    /// missing): its token key ring and, unless --tls-cert is given, its
    /// self-signed TLS pair.
    #[arg(long, env = "CREDSTREAM_STATE_DIR", conflicts_with_all = ["token_key_file", "dev"])]
    state_dir: Option<PathBuf>,
    /// PEM certificate chain for TLS.
    #[arg(long, env = "CREDSTREAM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "CREDSTREAM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle: require client certificates it signed (mutual TLS).
    #[arg(long, env = "CREDSTREAM_CLIENT_CA", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Allow plaintext on a non-loopback address (only behind a
    /// TLS-terminating proxy).
    #[arg(long, env = "CREDSTREAM_INSECURE")]
    insecure: bool,
    /// Fraction of a credential's lifetime after which the broker asks for a
    /// new one (0.1 to 0.9).
    #[arg(long, env = "CREDSTREAM_REFRESH_AT", default_value_t = 0.5)]
    refresh_at: f64,
    /// How long the publisher has to answer a refresh request before the
    /// broker retries it (with backoff, under a new id).
    #[arg(long, env = "CREDSTREAM_REFRESH_DEADLINE", default_value = "60s", value_parser = humantime::parse_duration)]
    refresh_deadline: Duration,
    /// How often a publisher that answers heartbeats gets one; one left
    /// unanswered until the next makes it unresponsive (refresh requests are
    /// held and their deadlines suspended until it answers).
    #[arg(long, env = "CREDSTREAM_PUBLISHER_HEARTBEAT", default_value = "10s", value_parser = humantime::parse_duration)]
    publisher_heartbeat: Duration,
    /// How long a displaced publisher name may not take its cluster back
    /// from a responsive publisher (damps publishers that fight).
    #[arg(long, env = "CREDSTREAM_TAKEOVER_HOLD_DOWN", default_value = "60s", value_parser = humantime::parse_duration)]
    takeover_hold_down: Duration,
    /// How long a cluster with no publisher, no agents and no live
    /// credential is kept before it is dropped.
    #[arg(long, env = "CREDSTREAM_CLUSTER_GRACE", default_value = "10m", value_parser = humantime::parse_duration)]
    cluster_grace: Duration,
    /// New calls one token may make each second, once its burst is spent.
    #[arg(long, env = "CREDSTREAM_TOKEN_CALLS_PER_SECOND", default_value_t = CallRate::default().per_second)]
    token_calls_per_second: f64,
    /// New calls one token may make at once (one agent token shared by a
    /// whole cluster reconnects all its agents at once after a restart).
    #[arg(long, env = "CREDSTREAM_TOKEN_CALL_BURST", default_value_t = CallRate::default().burst)]
    token_call_burst: f64,
    /// Connections open at most (handshaking or established); beyond it the
    /// oldest still-handshaking connection is closed to make room, or the
    /// new one is refused at once. Default: the file descriptor limit
    /// (raised to its hard limit at start) less 64.
    #[arg(long, env = "CREDSTREAM_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Time a new connection has to finish TLS and send the HTTP/2
    /// preface before it is closed.
    #[arg(long, env = "CREDSTREAM_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// TLS handshakes in progress at most; more wait, in the order their
    /// ClientHello arrived, instead of all slowing down together past the
    /// handshake timeout in a reconnect storm. Default: 64 per core.
    #[arg(long, env = "CREDSTREAM_MAX_HANDSHAKES")]
    max_handshakes: Option<usize>,
    /// New calls one connection may make each second, once its burst is
    /// spent (a call it refuses costs its token nothing).
    #[arg(long, env = "CREDSTREAM_CONNECTION_CALLS_PER_SECOND", default_value_t = CallRate::CONNECTION.per_second)]
    connection_calls_per_second: f64,
    /// New calls one connection may make at once.
    #[arg(long, env = "CREDSTREAM_CONNECTION_CALL_BURST", default_value_t = CallRate::CONNECTION.burst)]
    connection_call_burst: f64,
    /// Serve Prometheus metrics (`GET /metrics`: clusters, agents,
    /// publishers, credential expiry, refresh outcomes; never a secret) on
    /// this address: loopback only, unless --metrics-public. At most 16
    /// connections, each closed if its request's headers take over 5 s.
    #[arg(long, env = "CREDSTREAM_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Allow --metrics-listen on an address that is not loopback. The
    /// endpoint has no authentication: anyone who can connect learns every
    /// cluster's name and when its credentials expire.
    #[arg(long, env = "CREDSTREAM_METRICS_PUBLIC", requires = "metrics_listen")]
    metrics_public: bool,
    /// Write the audit trail (one JSON line per publisher, credential,
    /// delivery, agent, revocation, issued token and refused call; never a
    /// secret) to this file (appended, mode 0600; reopened on SIGHUP, for
    /// logrotate), or `-` for stdout. A trail that cannot keep up drops
    /// records and counts them; it never holds the broker.
    #[arg(long, env = "CREDSTREAM_AUDIT_LOG")]
    audit_log: Option<String>,
    /// Log format.
    #[arg(long, env = "CREDSTREAM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Threads that serve connections. Default: one per core. On a host
    /// whose cores other work shares, fewer threads cost less CPU per
    /// update (no work stealing or wake-ups across cores; the README's
    /// "Over TLS" measures it) at the price of using fewer cores.
    #[arg(long, env = "CREDSTREAM_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// File holding the token signing key.
    #[arg(long, env = "CREDSTREAM_TOKEN_KEY_FILE")]
    token_key_file: PathBuf,
    /// The token's role.
    #[arg(long, value_enum)]
    role: Role,
    /// The cluster the token is for (required except for admin).
    #[arg(long, env = "CREDSTREAM_CLUSTER")]
    cluster: Option<String>,
    /// Bind an agent token to one agent: its Subscribe hello must carry this
    /// agent id, and its call limit is its own.
    #[arg(long)]
    agent_id: Option<String>,
    /// Lifetime, e.g. `12h`, `30m`, `7d`.
    #[arg(long, default_value = "12h", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,h2=warn,tower=warn,hyper=warn".into());
    // Colour codes only on a terminal: in a log file or journal they are
    // noise, and escapes there are what log injection looks like.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Token(args)) => return print_token(args),
        Some(Command::Init(args)) => return init(args),
        None => {}
    }
    init_logging(cli.serve.log_format);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.serve.worker_threads {
        runtime.worker_threads(usize::from(threads));
    }
    let runtime = runtime.enable_all().build().context("tokio runtime")?;
    tracing::info!(
        worker_threads = runtime.metrics().num_workers(),
        "serving threads"
    );
    runtime.block_on(serve(cli.serve))
}

fn print_token(args: TokenArgs) -> anyhow::Result<()> {
    let key = TokenKey::from_file(&args.token_key_file)?;
    let token = key.issue_for_agent(
        args.role,
        args.cluster.as_deref(),
        args.agent_id.as_deref(),
        args.ttl,
    )?;
    println!("{token}");
    Ok(())
}

/// `init`: the state directory, then the join strings.
fn init(args: InitArgs) -> anyhow::Result<()> {
    let state = StateDir::new(&args.state_dir);
    let host = state_dir::host_of(&args.address)?;
    state.ensure(args.tls_cert.is_none(), &[host])?;
    let cert = args.tls_cert.unwrap_or_else(|| state.tls_cert());
    let key = TokenKey::from_file(&state.token_key())?;
    print_join_strings(&key, &cert, &args.address, &args.cluster, args.ttl)
}

/// One join string per role for `cluster`, pinning the key of `cert`.
fn print_join_strings(
    key: &TokenKey,
    cert: &std::path::Path,
    address: &str,
    cluster: &str,
    ttl: Duration,
) -> anyhow::Result<()> {
    let pin = state_dir::pin_of(cert)?;
    println!(
        "Join strings for cluster {cluster:?} at {address} (secrets: each holds a token, valid {}; the broker's key is {pin}).",
        humantime::format_duration(ttl)
    );
    for (role, name, use_) in [
        (
            Role::Publisher,
            "PUBLISHER",
            "credstream publish --join-file FILE --cluster",
        ),
        (
            Role::Agent,
            "AGENT",
            "credstream-agent run --join-file FILE --cluster",
        ),
    ] {
        let token = key.issue(role, Some(cluster), ttl)?;
        let join = JoinString::new(address.to_owned(), &token, vec![pin])?;
        println!("# {use_} {cluster} ...");
        println!("CREDSTREAM_{name}_JOIN={}", join.encode().as_str());
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if !(0.1..=0.9).contains(&args.refresh_at) {
        bail!(
            "--refresh-at must be between 0.1 and 0.9 (got {})",
            args.refresh_at
        );
    }
    let mut args = args;
    if let Some(dir) = &args.state_dir {
        let state = StateDir::new(dir);
        let hosts = if args.listen.ip().is_unspecified() {
            Vec::new()
        } else {
            vec![args.listen.ip().to_string()]
        };
        let self_signed = args.tls_cert.is_none();
        let created = state.ensure(self_signed, &hosts)?;
        args.token_key_file = Some(state.token_key());
        if self_signed {
            args.tls_cert = Some(state.tls_cert());
            args.tls_key = Some(state.tls_key());
        }
        if created.token_key || created.tls {
            let key = TokenKey::from_file(&state.token_key())?;
            print_join_strings(
                &key,
                args.tls_cert.as_deref().unwrap_or(&state.tls_cert()),
                &args.listen.to_string(),
                "default",
                Duration::from_secs(24 * 3600),
            )?;
        }
    }
    let token_key = match (&args.token_key_file, args.dev) {
        (Some(path), _) => TokenKey::from_file(path)?,
        (None, true) => TokenKey::generate(),
        (None, false) => bail!("--token-key-file is required (or --dev for an in-memory key)"),
    };
    match connections::raise_fd_limit() {
        Ok((before, after)) if after > before => {
            tracing::info!(
                fd_limit = after,
                raised_from = before,
                "file descriptor limit raised to the hard limit"
            );
        }
        Ok((_, after)) => tracing::info!(fd_limit = after, "file descriptor limit"),
        Err(error) => {
            tracing::warn!(%error, fd_limit = connections::fd_limit(), "cannot raise the file descriptor limit")
        }
    }
    let mut config = BrokerConfig::new(args.listen, token_key.clone());
    if !(args.connection_calls_per_second > 0.0 && args.connection_call_burst >= 1.0) {
        bail!(
            "--connection-calls-per-second must be above 0 and --connection-call-burst at least 1"
        );
    }
    config.connections = ConnectionLimits {
        max_connections: args
            .max_connections
            .unwrap_or_else(|| ConnectionLimits::default_max_connections(connections::fd_limit())),
        handshake_timeout: args.handshake_timeout,
        max_handshakes: args
            .max_handshakes
            .unwrap_or_else(ConnectionLimits::default_max_handshakes),
        call_rate: CallRate {
            per_second: args.connection_calls_per_second,
            burst: args.connection_call_burst,
        },
    };
    if config.connections.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    if config.connections.max_handshakes == 0 {
        bail!("--max-handshakes must be at least 1");
    }
    config.insecure = args.insecure;
    if args.refresh_deadline.is_zero() || args.publisher_heartbeat.is_zero() {
        bail!("--refresh-deadline and --publisher-heartbeat must be above 0");
    }
    config.refresh = RefreshConfig {
        refresh_at: args.refresh_at,
        deadline: args.refresh_deadline,
        heartbeat_interval: args.publisher_heartbeat,
        takeover_hold_down: args.takeover_hold_down,
        idle_cluster_grace: args.cluster_grace,
        ..RefreshConfig::default()
    };
    if !(args.token_calls_per_second > 0.0 && args.token_call_burst >= 1.0) {
        bail!("--token-calls-per-second must be above 0 and --token-call-burst at least 1");
    }
    config.call_rate = CallRate {
        per_second: args.token_calls_per_second,
        burst: args.token_call_burst,
    };
    config.tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert,
            key,
            client_ca: args.client_ca,
        }),
        _ => None,
    };
    let metrics_config = args.metrics_listen.map(|listen| MetricsConfig {
        public: args.metrics_public,
        ..MetricsConfig::new(listen)
    });
    if let Some(config) = &metrics_config {
        config.check()?;
    }
    tracing::info!(keys = ?token_key.key_ids(), "token keys loaded (the first signs)");
    if let Some(target) = &args.audit_log {
        credstream_broker::audit::install(target)
            .with_context(|| format!("cannot open the audit log {target}"))?;
    }
    // Before the "listening" line: a supervisor may send SIGTERM as soon as
    // it reads it, and a signal with no handler yet would kill the process
    // without its shutdown.
    let mut signals = Signals::install()?;
    let mut broker = server::start(config).await?;
    println!("listening on {}", broker.local_addr);
    let metrics = match metrics_config {
        Some(config) => {
            let metrics =
                credstream_broker::metrics::serve_with(config, broker.hub.clone()).await?;
            println!("metrics on http://{}/metrics", metrics.local_addr);
            Some(metrics)
        }
        None => None,
    };
    if args.dev {
        print_dev_banner(&token_key, &broker.url())?;
    }
    use std::io::Write;
    std::io::stdout().flush().ok();

    loop {
        tokio::select! {
            result = broker.wait() => return result,
            _ = signals.term.recv() => {
                tracing::info!(signal = "SIGTERM", "shutting down");
                break;
            }
            _ = signals.interrupt.recv() => {
                tracing::info!(signal = "SIGINT", "shutting down");
                break;
            }
            _ = signals.hangup.recv() => {
                reload_keys(&token_key);
                credstream_broker::audit::reopen();
            }
        }
    }
    broker.shutdown().await;
    // The broker's shutdown stopped the metrics endpoint too; wait for it.
    if let Some(metrics) = metrics {
        metrics.stopped(METRICS_GRACE).await;
    }
    let written = tokio::task::spawn_blocking(|| credstream_broker::audit::finish(AUDIT_GRACE))
        .await
        .unwrap_or(false);
    if !written {
        tracing::warn!(
            dropped = credstream_broker::audit::dropped(),
            "the audit trail's output did not take its last records in time; they are lost"
        );
    }
    Ok(())
}

/// How long the metrics endpoint's last responses may take after shutdown.
const METRICS_GRACE: Duration = Duration::from_secs(5);
/// How long the audit trail's last records may take to be written.
const AUDIT_GRACE: Duration = Duration::from_secs(5);

/// SIGHUP: re-read the token key file, so keys rotate without a restart.
fn reload_keys(key: &TokenKey) {
    match key.reload() {
        Ok(ids) => tracing::info!(keys = ?ids, signing = %ids[0], "token keys reloaded"),
        Err(error) => tracing::warn!(%error, "token keys not reloaded; the keys in use stay"),
    }
}

/// The `--dev` banner: the three tokens as `NAME=value` lines, then the
/// commands that supply cluster `dev` from this machine, in the order they
/// are run, each on a line of its own indented by two spaces, to be pasted
/// as printed (tests/tests/readme_try_it.rs runs them): the client and
/// agent by the paths they have next to this binary (built first when they
/// are missing), the cluster's seal key handed to the agent (publishing
/// seals by default), and `status` with the token it needs.
fn print_dev_banner(key: &TokenKey, url: &str) -> anyhow::Result<()> {
    let ttl = Duration::from_secs(12 * 3600);
    let publisher = key.issue(Role::Publisher, Some("dev"), ttl)?;
    let agent = key.issue(Role::Agent, Some("dev"), ttl)?;
    let admin = key.issue(Role::Admin, None, ttl)?;
    println!("CREDSTREAM_PUBLISHER_TOKEN={publisher}");
    println!("CREDSTREAM_AGENT_TOKEN={agent}");
    println!("CREDSTREAM_ADMIN_TOKEN={admin}");
    let bins = DevBinaries::next_to_this_one();
    let (client, agent_bin) = (bins.path("credstream"), bins.path("credstream-agent"));
    let build = match bins.build_command() {
        Some(build) => format!(
            "\nThis started the broker only; build the client and the agent first:\n  {build}\n"
        ),
        None => String::new(),
    };
    println!(
        r#"
Development broker for cluster "dev" (in-memory key: tokens die with this process; valid 12h).
Paste these on this machine, in order.
{build}
1. Publish your local AWS/GCP identity (it keeps running: give it a terminal of its own).
   It seals everything with the cluster's seal key, created on first use; the broker never sees it:
  {client} publish --broker {url} --cluster dev --token {publisher}

2. In another terminal, "on a worker": hand the agent the seal key (a file only you can read;
   copy it to real workers out of band, like the agent token), then run a command with the credentials
   (put yours after `--`, e.g. `python your_script.py`; `credstream-agent run` with the same flags serves without one):
  (umask 077 && {client} seal-key --cluster dev > dev.seal-key)
  {agent_bin} exec --broker {url} --cluster dev --agent-id worker-1 --token {agent} --seal-key-file dev.seal-key -- sh -c 'echo "ready: credentials served at $AWS_CONTAINER_CREDENTIALS_FULL_URI"'

3. What the broker holds for the cluster (principals, expiry times, agents; never a secret):
  {client} status --broker {url} --cluster dev --token {publisher}

gRPC with grpcurl: see "Inspect with grpcurl" in README.md (the admin token is CREDSTREAM_ADMIN_TOKEN above).
"#,
    );
    Ok(())
}

/// Where the `--dev` banner finds `credstream` and `credstream-agent`: next
/// to this binary (`cargo build` puts them there; `cargo run --bin
/// credstream-broker` builds the broker alone).
struct DevBinaries {
    dir: Option<PathBuf>,
}

impl DevBinaries {
    fn next_to_this_one() -> Self {
        let dir = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(PathBuf::from));
        Self { dir }
    }

    /// The command for binary `name`, quoted for a shell: its path next to
    /// this one, or its bare name when this one's folder is unknown.
    fn path(&self, name: &str) -> String {
        match &self.dir {
            Some(dir) => shell_word(&dir.join(name).to_string_lossy()),
            None => name.to_owned(),
        }
    }

    /// `cargo build` of the missing binaries, when some are missing and this
    /// binary was built from a workspace that is still there.
    fn build_command(&self) -> Option<String> {
        let dir = self.dir.as_ref()?;
        if ["credstream", "credstream-agent"]
            .iter()
            .all(|name| dir.join(name).exists())
        {
            return None;
        }
        let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()?
            .join("Cargo.toml");
        if !manifest.exists() {
            return None;
        }
        let release = if dir.ends_with("release") {
            " --release"
        } else {
            ""
        };
        Some(format!(
            "cargo build{release} --manifest-path {} --bin credstream --bin credstream-agent",
            shell_word(&manifest.to_string_lossy())
        ))
    }
}

/// `word` as one shell word: as it is when it holds only characters no
/// shell treats specially, else in single quotes.
fn shell_word(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The signals the broker answers: SIGTERM and SIGINT shut it down,
/// SIGHUP reloads the token keys and reopens the audit file. Registered as soon as this is made (a
/// `tokio::signal::ctrl_c()` future would register only when first
/// polled).
struct Signals {
    term: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        let handler = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("cannot install the {name} handler"))
        };
        Ok(Self {
            term: handler(SignalKind::terminate(), "SIGTERM")?,
            interrupt: handler(SignalKind::interrupt(), "SIGINT")?,
            hangup: handler(SignalKind::hangup(), "SIGHUP")?,
        })
    }
}
