//! Reaching the broker as a publisher: the checked address from what the
//! user gave (`credstream publish`'s and `credstream status`'s flags, the
//! Python `Publisher`'s arguments), an eager connection (so that a typo in
//! the URL or a TLS problem shows at once, not as an endless reconnect
//! loop), and a [`BrokerError`] whose message says what to do.
//!
//! The messages name the command line's flags (`--broker`, `--token-file`,
//! `--ca-cert`); the Python package says the same things.

use std::path::PathBuf;

use credstream_proto::connect::{BrokerAddress, CallCredentials, ClientIdentity, ConnectError};
use credstream_proto::join::{JoinError, JoinString};
use credstream_proto::rules::retry::{self, Final};
use credstream_proto::rules::token::TokenSourceError;
use credstream_proto::v1::admin_service_client::AdminServiceClient;
use credstream_proto::v1::{ClusterStatus, GetClusterRequest};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::connect_failure::{CertificateProblem, ConnectFailure, classify};

/// How to reach the broker: the flags `publish` and `status` share. No
/// `Debug`: it holds the token.
pub struct BrokerOptions {
    /// `--broker`.
    pub url: String,
    /// `--cluster`.
    pub cluster: String,
    /// `--token`.
    pub token: Option<String>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// `--ca-cert`.
    pub ca_cert: Option<PathBuf>,
    /// `--tls-client-cert` and `--tls-client-key`.
    pub client_identity: Option<ClientIdentity>,
    /// `--insecure`.
    pub insecure: bool,
    /// `--join`, `--join-file` or `CREDSTREAM_JOIN`: a join string, which
    /// gives the address (over TLS), the token and the broker's pinned
    /// keys, instead of `url`, the token and a CA.
    pub join: Option<JoinSource>,
}

/// Where the join string comes from. No `Debug`: it holds a token.
#[derive(Clone)]
pub enum JoinSource {
    /// The string itself (`--join` or `CREDSTREAM_JOIN`).
    Text(Zeroizing<String>),
    /// A file holding it (`--join-file`).
    File(PathBuf),
}

impl JoinSource {
    /// The join string, read and parsed.
    pub fn read(&self) -> Result<JoinString, BrokerError> {
        let text = match self {
            Self::Text(text) => text.clone(),
            Self::File(path) => {
                Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
                    BrokerError::JoinFile {
                        path: path.clone(),
                        source,
                    }
                })?)
            }
        };
        Ok(JoinString::parse(&text)?)
    }
}

/// Why the broker could not be reached or used. Every message says what
/// happened and, where a person can fix it, how (a `fix:` line). No
/// message holds the token.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No usable token was given (missing, unreadable file, empty).
    #[error(transparent)]
    Token(#[from] TokenSourceError),
    /// The join file cannot be read.
    #[error("cannot read the join file {}: {source}", path.display())]
    JoinFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The join string does not parse (the message never quotes it).
    #[error(transparent)]
    Join(#[from] JoinError),
    /// The address cannot be used: a bad URL, plaintext to another host, a
    /// CA or client certificate file that cannot be read.
    #[error(transparent)]
    Address(#[from] ConnectError),
    /// `UNAUTHENTICATED`: the broker does not accept the token.
    #[error("the broker rejected the token: {message}\n  fix: {}", token_fix(*.joined, cluster))]
    TokenRejected {
        /// The cluster the token was used for.
        cluster: String,
        /// The broker's words.
        message: String,
        /// The token came in a join string, so the fix is a new join string.
        joined: bool,
    },
    /// `PERMISSION_DENIED`: the token is for another cluster or role.
    #[error(
        "the token may not be used for cluster {cluster:?}: {message}\n  \
         fix: use a publisher token issued for cluster {cluster:?}"
    )]
    WrongCluster {
        /// The cluster the token was used for.
        cluster: String,
        /// The broker's words.
        message: String,
    },
    /// The connection could not be made or was lost (`UNAVAILABLE`, a
    /// refused or closed connection).
    #[error("cannot reach the broker at {url}: {reason}\n  fix: {fix}")]
    Unreachable {
        /// `--broker`.
        url: String,
        /// The status message, or the transport error and its sources.
        reason: String,
        /// What to check.
        fix: &'static str,
    },
    /// An `https://` broker answered without TLS.
    #[error(
        "the broker at {url} did not answer with TLS: {chain}\n  \
         fix: check the port in --broker; a broker without TLS (on this machine) is reached with http://"
    )]
    NotTls {
        /// `--broker`.
        url: String,
        /// The transport error and its sources.
        chain: String,
    },
    /// The broker requires mutual TLS and refused this client's
    /// certificate (or its absence).
    #[error(
        "the broker at {url} refused this client's TLS certificate: {chain}\n  \
         fix: the broker requires mutual TLS; pass --tls-client-cert FILE and --tls-client-key FILE \
         with a certificate signed by the CA the broker trusts (its --client-ca)"
    )]
    ClientCertificateRefused {
        /// `--broker`.
        url: String,
        /// The transport error and its sources.
        chain: String,
    },
    /// The TLS handshake failed on the broker's certificate or otherwise.
    #[error("TLS with the broker at {url} failed: {chain}\n  fix: {fix}")]
    Tls {
        /// `--broker`.
        url: String,
        /// The transport error and its sources.
        chain: String,
        /// What to change.
        fix: &'static str,
    },
    /// An `http://` broker answered with something other than plaintext
    /// HTTP/2 (typically TLS).
    #[error(
        "the broker at {url} does not speak plaintext gRPC: {chain}\n  \
         fix: if it serves TLS, use https:// in --broker"
    )]
    NotHttp2 {
        /// `--broker`.
        url: String,
        /// The transport error and its sources.
        chain: String,
    },
    /// Any other status the broker answered with.
    #[error("the broker answered {code:?}: {message}")]
    Answered {
        /// The status code.
        code: Code,
        /// The broker's words.
        message: String,
    },
}

/// The fix for a broker that cannot be reached, by status.
const UNAVAILABLE_FIX: &str =
    "check --broker and that credstream-broker is running and reachable from here";
/// The fix for a connection that could not be made.
const CONNECT_FIX: &str = "check the host and port in --broker and that credstream-broker is running and reachable from here";
/// [`CONNECT_FIX`], when the broker may require a client certificate.
const CONNECT_OR_MUTUAL_TLS_FIX: &str = "check the host and port in --broker and that credstream-broker is running and reachable from here; \
     if the broker requires mutual TLS, pass --tls-client-cert FILE and --tls-client-key FILE";
/// The fix for a broker certificate this client does not trust.
const CA_FIX: &str = "if the broker's certificate comes from a private CA, pass that CA with --ca-cert FILE; \
     check that the host in --broker is a name the certificate is issued for; \
     a broker without TLS is reached with http:// (loopback only)";
/// The fix for a broker certificate issued for another name.
const WRONG_NAME_FIX: &str = "use a host in --broker that the broker's certificate is issued for (the names it presents are above), \
     or reissue the certificate for this name";
/// The fix for a pinned broker (a join string) that presented another key.
const PIN_FIX: &str = "the broker's key is not one the join string pins: check that the join string is for this broker (a man in the middle, or a broker whose key changed, presents another key); get a new join string from `credstream-broker init` on the broker";

/// The fix for a broker certificate out of its validity.
const VALIDITY_FIX: &str = "the broker's certificate has expired or is not valid yet: renew it, or check this machine's clock";

impl BrokerOptions {
    /// The checked address: token read, URL parsed, plaintext rule applied,
    /// CA file read.
    pub fn address(&self) -> Result<BrokerAddress, BrokerError> {
        if let Some(join) = &self.join {
            let join = join.read()?;
            let address = BrokerAddress {
                url: format!("https://{}", join.address),
                token: join.token.as_str().to_owned(),
                cluster_id: self.cluster.clone(),
                ca_cert: None,
                client_identity: self.client_identity.clone(),
                insecure: false,
                pins: join.pins,
            };
            address.check()?;
            return Ok(address);
        }
        let token = credstream_proto::rules::token::read(
            self.token.as_deref(),
            self.token_file.as_deref(),
            "publisher",
            "--token-file or --token",
        )?;
        let address = BrokerAddress {
            url: self.url.clone(),
            token: token.as_str().to_owned(),
            cluster_id: self.cluster.clone(),
            ca_cert: self.ca_cert.clone(),
            client_identity: self.client_identity.clone(),
            insecure: self.insecure,
            pins: Vec::new(),
        };
        address.check()?;
        Ok(address)
    }
}

/// An `AdminService` client with the caller's token.
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, CallCredentials>>;

/// Connects now (TCP, TLS, HTTP/2) and returns an admin client for the
/// address's cluster. Its calls carry `x-credstream-cluster`, so that a
/// proxy sharding brokers by cluster sends them to the shard that holds it
/// (README "Sharding").
pub async fn connect_admin(address: &BrokerAddress) -> Result<AdminClient, BrokerError> {
    let channel = match address.connect().await {
        Ok(channel) => channel,
        Err(credstream_proto::connect::ConnectError::Transport { source, .. }) => {
            return Err(transport_error(address, &source));
        }
        Err(error) => return Err(error.into()),
    };
    let credentials = address.interceptor()?;
    Ok(AdminServiceClient::with_interceptor(channel, credentials))
}

/// `GetCluster` for the address's cluster; `None` when the broker holds
/// nothing for it (NOT_FOUND).
pub async fn get_cluster(
    client: &mut AdminClient,
    address: &BrokerAddress,
) -> Result<Option<ClusterStatus>, BrokerError> {
    let request = GetClusterRequest {
        cluster_id: address.cluster_id.clone(),
    };
    match client.get_cluster(request).await {
        Ok(response) => Ok(response.into_inner().cluster),
        Err(status) if status.code() == Code::NotFound => Ok(None),
        Err(status) => Err(status_error(address, &status)),
    }
}

/// The fix for a rejected publisher token, in the terms it was given in.
fn token_fix(joined: bool, cluster: &str) -> String {
    if joined {
        format!(
            "ask the broker's operator for a new publisher join string \
             (`credstream-broker init --state-dir D --address HOST:PORT --cluster {cluster}` \
             prints one) and pass it with --join-file"
        )
    } else {
        format!(
            "ask the broker's operator for a new publisher token \
             (`credstream-broker token --token-key-file KEY --role publisher --cluster {cluster}`) \
             and pass it with --token-file"
        )
    }
}

/// The fix for a status the broker answered with. Which codes a person
/// must act on is the shared rule ([`credstream_proto::rules::retry`]);
/// `UNAVAILABLE` is a broker that cannot be reached.
pub fn status_error(address: &BrokerAddress, status: &tonic::Status) -> BrokerError {
    // A call that failed in the transport (a TLS alert after the handshake,
    // a reset connection) carries the cause as its source.
    if std::error::Error::source(status).is_some() {
        return transport_error(address, status);
    }
    let message = status.message().to_owned();
    let cluster = address.cluster_id.clone();
    match retry::final_reason(status.code()) {
        Some(Final::Unauthenticated) => BrokerError::TokenRejected {
            cluster,
            message,
            joined: !address.pins.is_empty(),
        },
        Some(Final::PermissionDenied) => BrokerError::WrongCluster { cluster, message },
        None if status.code() == Code::Unavailable => BrokerError::Unreachable {
            url: address.url.clone(),
            reason: message,
            fix: UNAVAILABLE_FIX,
        },
        _ => BrokerError::Answered {
            code: status.code(),
            message,
        },
    }
}

/// The fix for a connection that could not be made. The cause is read
/// from the types in `error`'s `source()` chain
/// ([`crate::connect_failure`]), never from its text; the text is quoted
/// in the message.
pub fn transport_error(
    address: &BrokerAddress,
    error: &(dyn std::error::Error + 'static),
) -> BrokerError {
    let chain = error_chain(error);
    let url = address.url.clone();
    let https = url.starts_with("https://");
    match classify(error) {
        // A pinned broker (--join) is identified by its key, not a CA.
        ConnectFailure::BrokerCertificate(_) | ConnectFailure::Tls
            if https && !address.pins.is_empty() =>
        {
            BrokerError::Tls {
                url,
                chain,
                fix: PIN_FIX,
            }
        }
        ConnectFailure::NotTls if https => BrokerError::NotTls { url, chain },
        // The broker did not accept this client.
        ConnectFailure::ClientCertificateRefused if https => {
            BrokerError::ClientCertificateRefused { url, chain }
        }
        ConnectFailure::BrokerCertificate(CertificateProblem::WrongName) if https => {
            BrokerError::Tls {
                url,
                chain,
                fix: WRONG_NAME_FIX,
            }
        }
        ConnectFailure::BrokerCertificate(CertificateProblem::OutsideValidity) if https => {
            BrokerError::Tls {
                url,
                chain,
                fix: VALIDITY_FIX,
            }
        }
        ConnectFailure::BrokerCertificate(_) | ConnectFailure::Tls if https => BrokerError::Tls {
            url,
            chain,
            fix: CA_FIX,
        },
        ConnectFailure::NotHttp2 if !https => BrokerError::NotHttp2 { url, chain },
        // With TLS 1.3 a broker that requires client certificates accepts
        // the handshake and then drops the connection; the client often
        // sees only a closed connection, not the alert.
        _ if https && address.client_identity.is_none() => BrokerError::Unreachable {
            url,
            reason: chain,
            fix: CONNECT_OR_MUTUAL_TLS_FIX,
        },
        _ => BrokerError::Unreachable {
            url,
            reason: chain,
            fix: CONNECT_FIX,
        },
    }
}

/// An error and its sources, `: `-separated, without repeats.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![error.to_string()];
    let mut source = error.source();
    while let Some(next) = source {
        let text = next.to_string();
        if !parts.iter().any(|seen| seen.contains(&text)) {
            parts.push(text);
        }
        source = next.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(url: &str) -> BrokerAddress {
        BrokerAddress {
            url: url.into(),
            token: "secret-token".into(),
            cluster_id: "dev".into(),
            ca_cert: None,
            client_identity: None,
            insecure: false,
            pins: Vec::new(),
        }
    }

    #[test]
    fn final_codes_name_their_fix_and_the_others_say_what_the_broker_answered() {
        let https = address("https://broker.example:50051");
        let rejected = status_error(&https, &tonic::Status::unauthenticated("bad signature"));
        assert!(
            matches!(&rejected, BrokerError::TokenRejected { cluster, .. } if cluster == "dev"),
            "{rejected:?}"
        );
        assert!(
            rejected
                .to_string()
                .contains("--role publisher --cluster dev")
        );
        assert!(rejected.to_string().contains("--token-file"));
        // A token that came in a join string is replaced by a new join string.
        let mut joined = address("https://10.0.0.1:50051");
        joined.pins = vec![credstream_proto::join::SpkiPin([7; 32])];
        let rejected = status_error(&joined, &tonic::Status::unauthenticated("token expired"));
        let text = rejected.to_string();
        assert!(text.contains("new publisher join string"), "{text}");
        assert!(
            text.contains("--join-file") && !text.contains("--token-file"),
            "{text}"
        );
        let denied = status_error(&https, &tonic::Status::permission_denied("other cluster"));
        assert!(
            matches!(denied, BrokerError::WrongCluster { .. }),
            "{denied:?}"
        );
        let down = status_error(&https, &tonic::Status::unavailable("draining"));
        assert_eq!(
            down.to_string(),
            "cannot reach the broker at https://broker.example:50051: draining\n  \
             fix: check --broker and that credstream-broker is running and reachable from here"
        );
        // Final for the session, but nothing this message could name a fix for.
        let aborted = status_error(&https, &tonic::Status::aborted("taken over"));
        assert_eq!(
            aborted.to_string(),
            "the broker answered Aborted: taken over"
        );
        for error in [rejected, denied, down, aborted] {
            assert!(!format!("{error} {error:?}").contains("secret-token"));
        }
    }

    #[test]
    fn a_missing_token_file_is_named_with_its_reason() {
        let options = BrokerOptions {
            url: "http://127.0.0.1:50051".into(),
            cluster: "dev".into(),
            token: None,
            token_file: Some("/nonexistent/credstream-token".into()),
            ca_cert: None,
            client_identity: None,
            insecure: false,
            join: None,
        };
        let error = options.address().unwrap_err();
        assert!(matches!(error, BrokerError::Token(_)), "{error:?}");
        let chain = error_chain(&error);
        assert!(
            chain.starts_with("cannot read the token file /nonexistent/credstream-token: "),
            "{chain}"
        );
    }
}
