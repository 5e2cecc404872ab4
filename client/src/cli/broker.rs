//! Reaching the broker from the command line: the address from flags, an
//! eager connection (so that a typo in the URL or a TLS problem shows at
//! once, not as an endless reconnect loop), and errors that say what to do.

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use credstream_client::connect_failure::{CertificateProblem, ConnectFailure, classify};
use credstream_proto::connect::{BrokerAddress, CallCredentials, ClientIdentity};
use credstream_proto::v1::admin_service_client::AdminServiceClient;
use credstream_proto::v1::{ClusterStatus, GetClusterRequest};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The broker flags shared by `publish` and `status`.
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
}

impl BrokerOptions {
    /// The checked address: token read, URL parsed, plaintext rule applied,
    /// CA file read.
    pub fn address(&self) -> Result<BrokerAddress> {
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
        };
        address.endpoint()?;
        Ok(address)
    }
}

/// An `AdminService` client with the caller's token.
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, CallCredentials>>;

/// Connects now (TCP, TLS, HTTP/2) and returns an admin client for the
/// address's cluster. Its calls carry `x-credstream-cluster`, so that a
/// proxy sharding brokers by cluster sends them to the shard that holds it
/// (README "Sharding").
pub async fn connect_admin(address: &BrokerAddress) -> Result<AdminClient> {
    let channel = address
        .endpoint()?
        .connect()
        .await
        .map_err(|error| transport_error(address, &error))?;
    let credentials = address.interceptor()?;
    Ok(AdminServiceClient::with_interceptor(channel, credentials))
}

/// `GetCluster` for the address's cluster; `None` when the broker holds
/// nothing for it (NOT_FOUND).
pub async fn get_cluster(
    client: &mut AdminClient,
    address: &BrokerAddress,
) -> Result<Option<ClusterStatus>> {
    let request = GetClusterRequest {
        cluster_id: address.cluster_id.clone(),
    };
    match client.get_cluster(request).await {
        Ok(response) => Ok(response.into_inner().cluster),
        Err(status) if status.code() == Code::NotFound => Ok(None),
        Err(status) => Err(status_error(address, &status)),
    }
}

/// The fix for a status the broker answered with.
pub fn status_error(address: &BrokerAddress, status: &tonic::Status) -> anyhow::Error {
    // A call that failed in the transport (a TLS alert after the handshake,
    // a reset connection) carries the cause as its source.
    if std::error::Error::source(status).is_some() {
        return transport_error(address, status);
    }
    let message = status.message();
    let cluster = &address.cluster_id;
    match status.code() {
        Code::Unauthenticated => anyhow!(
            "the broker rejected the token: {message}\n  \
             fix: ask the broker's operator for a new publisher token \
             (`credstream-broker token --token-key-file KEY --role publisher --cluster {cluster}`) \
             and pass it with --token-file"
        ),
        Code::PermissionDenied => anyhow!(
            "the token may not be used for cluster {cluster:?}: {message}\n  \
             fix: use a publisher token issued for cluster {cluster:?}"
        ),
        Code::Unavailable => anyhow!(
            "cannot reach the broker at {}: {message}\n  \
             fix: check --broker and that credstream-broker is running and reachable from here",
            address.url
        ),
        code => anyhow!("the broker answered {code:?}: {message}"),
    }
}

/// The fix for a connection that could not be made. The cause is read
/// from the types in `error`'s `source()` chain
/// ([`credstream_client::connect_failure`]), never from its text; the text
/// is quoted in the message.
pub fn transport_error(
    address: &BrokerAddress,
    error: &(dyn std::error::Error + 'static),
) -> anyhow::Error {
    let chain = error_chain(error);
    let url = &address.url;
    let https = url.starts_with("https://");
    let tls_failed =
        |fix: &str| anyhow!("TLS with the broker at {url} failed: {chain}\n  fix: {fix}");
    const CA_FIX: &str = "if the broker's certificate comes from a private CA, pass that CA with --ca-cert FILE; \
         check that the host in --broker is a name the certificate is issued for; \
         a broker without TLS is reached with http:// (loopback only)";
    match classify(error) {
        ConnectFailure::NotTls if https => anyhow!(
            "the broker at {url} did not answer with TLS: {chain}\n  \
             fix: check the port in --broker; a broker without TLS (on this machine) is reached with http://"
        ),
        // The broker did not accept this client.
        ConnectFailure::ClientCertificateRefused if https => anyhow!(
            "the broker at {url} refused this client's TLS certificate: {chain}\n  \
             fix: the broker requires mutual TLS; pass --tls-client-cert FILE and --tls-client-key FILE \
             with a certificate signed by the CA the broker trusts (its --client-ca)"
        ),
        ConnectFailure::BrokerCertificate(CertificateProblem::WrongName) if https => tls_failed(
            "use a host in --broker that the broker's certificate is issued for (the names it presents are above), \
             or reissue the certificate for this name",
        ),
        ConnectFailure::BrokerCertificate(CertificateProblem::OutsideValidity) if https => {
            tls_failed(
                "the broker's certificate has expired or is not valid yet: renew it, or check this machine's clock",
            )
        }
        ConnectFailure::BrokerCertificate(_) | ConnectFailure::Tls if https => tls_failed(CA_FIX),
        ConnectFailure::NotHttp2 if !https => anyhow!(
            "the broker at {url} does not speak plaintext gRPC: {chain}\n  \
             fix: if it serves TLS, use https:// in --broker"
        ),
        // With TLS 1.3 a broker that requires client certificates accepts
        // the handshake and then drops the connection; the client often
        // sees only a closed connection, not the alert.
        _ if https && address.client_identity.is_none() => anyhow!(
            "cannot reach the broker at {url}: {chain}\n  \
             fix: check the host and port in --broker and that credstream-broker is running and reachable from here; \
             if the broker requires mutual TLS, pass --tls-client-cert FILE and --tls-client-key FILE"
        ),
        _ => anyhow!(
            "cannot reach the broker at {url}: {chain}\n  \
             fix: check the host and port in --broker and that credstream-broker is running and reachable from here"
        ),
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
