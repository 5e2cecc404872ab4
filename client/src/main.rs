//! `credstream`: flags and exit codes; the work is in `cli/` and the library.
//!
//! - `publish`: mint from the local identity and keep a cluster supplied.
//! - `whoami`: the identities `publish` would forward.
//! - `status`: what the broker holds for a cluster (never a secret).

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use credstream_proto::connect::TransportArgs;
use credstream_proto::v1::EnvVar;
use tracing_subscriber::EnvFilter;

/// Forward your own short-lived AWS and Google Cloud credentials (and private
/// environment variables) to every worker of a remote cluster.
#[derive(Parser)]
#[command(name = "credstream", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish credentials minted from your local identity to a cluster and
    /// keep them fresh until stopped (Ctrl-C or SIGTERM).
    ///
    /// Prints one line per event: connected, refresh requested (and why),
    /// minted (for which principal, valid until when), delivered (to how
    /// many agents). A kind without local credentials is skipped with a
    /// note; `publish` fails only if nothing at all can be published.
    ///
    /// Exit status: 0 after Ctrl-C or SIGTERM; 3 when another publisher
    /// took the cluster over (do not restart it: systemd's
    /// `RestartPreventExitStatus=3`); 1 on any other error.
    Publish(Box<PublishArgs>),
    /// Show the AWS identity and GCP principal `publish` would forward.
    /// Exits non-zero if a kind asked about has no usable credentials.
    Whoami(IdentityArgs),
    /// Show what the broker holds for a cluster: agents and the versions
    /// they hold, credential principals and expiry times, pending refreshes.
    /// Never a secret.
    Status(BrokerArgs),
    /// Print the cluster's seal key on stdout (creating it if there is none
    /// yet), for agents' `--seal-key-file`. Give it to workers out of band,
    /// like the agent token: the broker must never receive it.
    SealKey(SealKeyArgs),
}

/// Where the broker is and how to authenticate to it.
#[derive(Args, Clone)]
struct BrokerArgs {
    /// The broker's URL: https://HOST:PORT, or http://127.0.0.1:PORT for a
    /// broker on this machine.
    #[arg(
        long,
        env = "CREDSTREAM_BROKER",
        required_unless_present_any = ["join", "join_file"]
    )]
    broker: Option<String>,
    /// A file holding a join string from `credstream-broker init`: the
    /// broker's address, a publisher token and the broker's pinned key;
    /// instead of --broker, --token and --ca-cert. The broker is reached
    /// over TLS and accepted by its key alone.
    #[arg(
        long,
        env = "CREDSTREAM_JOIN_FILE",
        conflicts_with_all = ["broker", "token", "token_file", "ca_cert", "join"]
    )]
    join_file: Option<PathBuf>,
    /// The join string itself (prefer --join-file or CREDSTREAM_JOIN:
    /// arguments are visible in `ps`; it holds a token).
    #[arg(
        long,
        env = "CREDSTREAM_JOIN",
        hide_env_values = true,
        conflicts_with_all = ["broker", "token", "token_file", "ca_cert"]
    )]
    join: Option<String>,
    /// The cluster id.
    #[arg(long, env = "CREDSTREAM_CLUSTER")]
    cluster: String,
    /// The publisher token for the cluster (prefer --token-file: arguments
    /// are visible in `ps`). A token the broker rejects (malformed, forged,
    /// issued by another broker, expired) stops with "the broker rejected
    /// the token: <why>" and the command to issue a new one, exit status 1.
    #[arg(
        long,
        env = "CREDSTREAM_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file",
        required_unless_present_any = ["token_file", "join", "join_file"]
    )]
    token: Option<String>,
    /// A file holding the publisher token.
    #[arg(long, env = "CREDSTREAM_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    transport: TransportArgs,
}

/// Which local identities to use and how to mint from them.
#[derive(Args, Clone)]
struct IdentityArgs {
    /// Do not publish AWS credentials.
    #[arg(long, env = "CREDSTREAM_NO_AWS")]
    no_aws: bool,
    /// Do not publish a Google Cloud access token.
    #[arg(long, env = "CREDSTREAM_NO_GCP")]
    no_gcp: bool,
    /// The AWS profile to mint from (default: AWS_PROFILE, then `default`).
    #[arg(long, env = "CREDSTREAM_AWS_PROFILE")]
    aws_profile: Option<String>,
    /// Forward credentials of this IAM role (AssumeRole) instead of your own
    /// identity's session credentials.
    #[arg(long, env = "CREDSTREAM_AWS_ROLE_ARN")]
    aws_role_arn: Option<String>,
    /// Down-scope the role with the IAM policy in this JSON file (needs
    /// --aws-role-arn).
    #[arg(long, env = "CREDSTREAM_AWS_SESSION_POLICY")]
    aws_session_policy: Option<PathBuf>,
    /// Lifetime of each minted AWS credential (15m to 36h; at most 12h with
    /// a role). Default 12h.
    #[arg(long, env = "CREDSTREAM_AWS_DURATION", value_parser = humantime::parse_duration)]
    aws_duration: Option<Duration>,
    /// OAuth2 scopes of the Google access token, comma-separated (default:
    /// cloud-platform).
    #[arg(long, env = "CREDSTREAM_GCP_SCOPES", value_delimiter = ',')]
    gcp_scopes: Vec<String>,
}

#[derive(Args)]
struct PublishArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    identity: IdentityArgs,
    /// A private environment variable for the cluster's processes, as
    /// KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", env = "CREDSTREAM_ENV", hide_env_values = true, value_parser = credstream_client::env::parse_assignment)]
    env: Vec<EnvVar>,
    /// A dotenv file of private environment variables (repeatable; later
    /// files and --env win).
    #[arg(long, env = "CREDSTREAM_ENV_FILE")]
    env_file: Vec<PathBuf>,
    /// At exit, revoke everything published so agents stop serving it at
    /// once.
    #[arg(long, env = "CREDSTREAM_REVOKE_ON_EXIT")]
    revoke_on_exit: bool,
    /// Send credentials and env unsealed (readable by the broker). By
    /// default every update is sealed with the cluster's seal key, created
    /// on first publish (see `credstream seal-key`).
    #[arg(long, env = "CREDSTREAM_NO_SEAL")]
    no_seal: bool,
    /// The cluster's seal key file (created, mode 0600, if missing).
    /// Default: <config dir>/credstream/seal-keys/<cluster>.key.
    #[arg(long, env = "CREDSTREAM_SEAL_KEY_FILE", conflicts_with = "no_seal")]
    seal_key_file: Option<PathBuf>,
    /// The SourceIdentity AssumeRole records in CloudTrail for every call
    /// made with the role's credentials (default: your own identity's name,
    /// from GetCallerIdentity). Needs --aws-role-arn, and a trust policy
    /// allowing sts:SetSourceIdentity.
    #[arg(long, env = "CREDSTREAM_AWS_SOURCE_IDENTITY")]
    aws_source_identity: Option<String>,
    /// A transitive session tag for AssumeRole, as KEY=VALUE (repeatable),
    /// besides credstream-cluster=<cluster>, which is always set. Needs
    /// --aws-role-arn, and a trust policy allowing sts:TagSession.
    #[arg(long = "aws-tag", value_name = "KEY=VALUE", env = "CREDSTREAM_AWS_TAG", value_delimiter = ',', value_parser = parse_tag)]
    aws_tag: Vec<(String, String)>,
}

/// `KEY=VALUE` for `--aws-tag` (STS checks the characters; the minter
/// checks them first and says which).
fn parse_tag(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

#[derive(Args)]
struct SealKeyArgs {
    /// The cluster id.
    #[arg(long, env = "CREDSTREAM_CLUSTER")]
    cluster: String,
    /// The key file to read (created, mode 0600, if missing). Default:
    /// <config dir>/credstream/seal-keys/<cluster>.key, where <config dir>
    /// is $CREDSTREAM_CONFIG_DIR, else $XDG_CONFIG_HOME/credstream, else
    /// ~/.config/credstream.
    #[arg(long, env = "CREDSTREAM_SEAL_KEY_FILE")]
    seal_key_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Event lines are the output; logs only when asked for (RUST_LOG).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("error")),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("credstream: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Publish(args) => cli::publish::run((*args).into()).await,
            Command::Whoami(args) => cli::identity::whoami(&args.into()).await,
            Command::Status(args) => cli::status::run(&args.into()).await,
            Command::SealKey(args) => {
                cli::seal_key::run(&args.cluster, args.seal_key_file.as_deref())
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("credstream: {error:#}");
            ExitCode::FAILURE
        }
    }
}

impl From<BrokerArgs> for cli::broker::BrokerOptions {
    fn from(args: BrokerArgs) -> Self {
        let join = match (args.join, args.join_file) {
            (Some(text), _) => Some(credstream_client::broker::JoinSource::Text({
                if std::env::args().any(|a| a == "--join" || a.starts_with("--join=")) {
                    eprintln!(
                        "credstream: --join on the command line is visible to every local user \
                         in `ps` and stays in shell history (it holds a token); use --join-file \
                         or CREDSTREAM_JOIN"
                    );
                }
                zeroize::Zeroizing::new(text)
            })),
            (None, Some(path)) => Some(credstream_client::broker::JoinSource::File(path)),
            (None, None) => None,
        };
        Self {
            url: args.broker.unwrap_or_default(),
            join,
            cluster: args.cluster,
            token: args.token,
            token_file: args.token_file,
            client_identity: args.transport.client_identity(),
            ca_cert: args.transport.ca_cert,
            insecure: args.transport.insecure,
        }
    }
}

impl From<IdentityArgs> for cli::identity::IdentityOptions {
    fn from(args: IdentityArgs) -> Self {
        Self {
            aws: !args.no_aws,
            gcp: !args.no_gcp,
            aws_profile: args.aws_profile,
            aws_role_arn: args.aws_role_arn,
            aws_session_policy: args.aws_session_policy,
            aws_duration: args.aws_duration,
            gcp_scopes: args.gcp_scopes,
        }
    }
}

impl From<PublishArgs> for cli::publish::PublishOptions {
    fn from(args: PublishArgs) -> Self {
        Self {
            broker: args.broker.into(),
            identity: args.identity.into(),
            env: args.env,
            env_files: args.env_file,
            revoke_on_exit: args.revoke_on_exit,
            no_seal: args.no_seal,
            seal_key_file: args.seal_key_file,
            aws_audit: cli::identity::AwsAudit {
                cluster: None,
                source_identity: args.aws_source_identity,
                tags: args.aws_tag,
            },
        }
    }
}
