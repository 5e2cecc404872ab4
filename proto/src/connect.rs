//! How a publisher or an agent reaches the broker: URL checks, TLS, the
//! bearer token and the cluster routing header.
//!
//! The rule from the design: a token is never sent in plaintext to a host
//! that is not loopback unless the caller explicitly allows it (`--insecure`).
//!
//! A broker reached with a join string ([`crate::join`]) is pinned: the
//! address carries the accepted key hashes, and the channel's TLS is a
//! rustls client with [`PinnedServerVerifier`] instead of tonic's WebPKI
//! configuration, over tonic's connector hook (the one TLS implementation
//! the client and the agent share).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::join::{PinnedServerVerifier, SpkiPin, ring_provider};

/// The metadata key an L7 proxy routes on.
pub const CLUSTER_HEADER: &str = "x-credstream-cluster";

/// Errors opening a connection to the broker.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The broker URL does not parse; use `http://host:port` or
    /// `https://host:port`.
    #[error(
        "invalid broker URL {url:?}: {reason} (expected http://HOST:PORT or https://HOST:PORT)"
    )]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Plain `http://` to a host that is not loopback would send the bearer
    /// token in clear text.
    #[error(
        "refusing to send a token in plaintext to {host}: use https:// (with --ca-cert if the broker's certificate is private) or pass --insecure"
    )]
    PlaintextToRemote {
        /// The host named in the URL.
        host: String,
    },
    /// The CA certificate file cannot be read.
    #[error("cannot read CA certificate {path}: {source}")]
    CaCert {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The client certificate or its key cannot be read.
    #[error("cannot read the client {what} {path}: {source}")]
    ClientIdentity {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A client certificate only means something over TLS.
    #[error("a client certificate (--tls-client-cert) needs an https:// broker URL, not {url}")]
    ClientIdentityWithoutTls {
        /// The URL given.
        url: String,
    },
    /// The token contains characters that cannot go into a header.
    #[error(
        "the token contains characters that are not allowed in a gRPC header; check the token file"
    )]
    InvalidToken,
    /// Pins need TLS: the join string's address is reached over https.
    #[error("a pinned broker key (--join) needs an https:// broker URL, not {url}")]
    PinsWithoutTls {
        /// The URL given.
        url: String,
    },
    /// A pinned address has no plain tonic endpoint: use
    /// [`BrokerAddress::channel`] or [`BrokerAddress::connect`].
    #[error(
        "internal: a pinned broker address is reached with channel() or connect(), not endpoint()"
    )]
    PinnedEndpoint,
    /// The client certificate or key does not parse.
    #[error("the client certificate or key is not usable: {0}")]
    ClientIdentityInvalid(String),
    /// The transport could not be configured or could not connect.
    #[error("cannot connect to the broker at {url}: {source}")]
    Transport {
        /// The URL.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// Where and how to connect.
#[derive(Clone)]
pub struct BrokerAddress {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    /// The bearer token (publisher or agent role).
    pub token: String,
    /// The cluster, sent as `x-credstream-cluster`.
    pub cluster_id: String,
    /// A PEM CA bundle to trust instead of the system roots.
    pub ca_cert: Option<PathBuf>,
    /// The certificate and key to present to a broker that requires mutual
    /// TLS.
    pub client_identity: Option<ClientIdentity>,
    /// Allow plaintext to a non-loopback host.
    pub insecure: bool,
    /// Accept the broker's certificate iff its key hashes to one of these
    /// (a join string's pins), instead of checking a CA and the host name.
    pub pins: Vec<SpkiPin>,
}

/// The connection flags `credstream` and `credstream-agent` share.
#[cfg(feature = "cli")]
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TransportArgs {
    /// A PEM CA bundle to trust for the broker's certificate instead of the
    /// system roots.
    #[arg(long, env = "CREDSTREAM_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// A PEM client certificate to present to a broker that requires mutual
    /// TLS (--client-ca on the broker); needs --tls-client-key.
    #[arg(long, env = "CREDSTREAM_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// The PEM private key of --tls-client-cert.
    #[arg(long, env = "CREDSTREAM_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// Allow sending the token in plaintext (http://) to a broker that is
    /// not on this machine.
    #[arg(long, env = "CREDSTREAM_INSECURE")]
    pub insecure: bool,
}

#[cfg(feature = "cli")]
impl TransportArgs {
    /// The client certificate, when both of its flags are given.
    pub fn client_identity(&self) -> Option<ClientIdentity> {
        Some(ClientIdentity {
            cert: self.tls_client_cert.clone()?,
            key: self.tls_client_key.clone()?,
        })
    }
}

/// A client certificate and its private key, both PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The certificate (chain).
    pub cert: PathBuf,
    /// The private key; read when the endpoint is built, never kept.
    pub key: PathBuf,
}

impl std::fmt::Debug for BrokerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerAddress")
            .field("url", &self.url)
            .field(
                "token",
                &format_args!("<redacted {} bytes>", self.token.len()),
            )
            .field("cluster_id", &self.cluster_id)
            .field("ca_cert", &self.ca_cert)
            .field("client_identity", &self.client_identity)
            .field("insecure", &self.insecure)
            .field("pins", &self.pins)
            .finish()
    }
}

/// True for 127.0.0.0/8, ::1 and `localhost`.
pub fn is_loopback_host(host: &str) -> bool {
    let trimmed = host.trim_start_matches('[').trim_end_matches(']');
    if trimmed.eq_ignore_ascii_case("localhost") {
        return true;
    }
    trimmed
        .parse::<IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

impl BrokerAddress {
    /// Checks the address as [`channel`](Self::channel) would, without
    /// making a channel: the URL, the plaintext rule, the files.
    pub fn check(&self) -> Result<(), ConnectError> {
        if self.pins.is_empty() {
            self.endpoint().map(drop)
        } else {
            self.pinned().map(drop)
        }
    }

    /// Builds the endpoint, checking the plaintext rule and configuring TLS.
    /// The connection itself is made lazily on first use, so a broker that is
    /// down does not fail this call. A pinned address has none
    /// ([`ConnectError::PinnedEndpoint`]): use [`channel`](Self::channel) or
    /// [`connect`](Self::connect).
    pub fn endpoint(&self) -> Result<Endpoint, ConnectError> {
        if !self.pins.is_empty() {
            return Err(ConnectError::PinnedEndpoint);
        }
        self.plain_endpoint()
    }

    fn parse_url(&self) -> Result<(http::Uri, String, bool), ConnectError> {
        let uri: http::Uri =
            self.url
                .parse()
                .map_err(|e: http::uri::InvalidUri| ConnectError::InvalidUrl {
                    url: self.url.clone(),
                    reason: e.to_string(),
                })?;
        let host = uri.host().unwrap_or_default().to_string();
        if host.is_empty() {
            return Err(ConnectError::InvalidUrl {
                url: self.url.clone(),
                reason: "no host".into(),
            });
        }
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(ConnectError::InvalidUrl {
                    url: self.url.clone(),
                    reason: "scheme must be http or https".into(),
                });
            }
        };
        Ok((uri, host, tls))
    }

    /// A plain tonic endpoint (tonic's TLS, WebPKI against `ca_cert` or the
    /// system roots).
    fn plain_endpoint(&self) -> Result<Endpoint, ConnectError> {
        let (uri, host, tls) = self.parse_url()?;
        if !tls && !self.insecure && !is_loopback_host(&host) {
            return Err(ConnectError::PlaintextToRemote { host });
        }
        if !tls && self.client_identity.is_some() {
            return Err(ConnectError::ClientIdentityWithoutTls {
                url: self.url.clone(),
            });
        }
        let transport = |source| ConnectError::Transport {
            url: self.url.clone(),
            source,
        };
        let mut endpoint = Endpoint::from(uri)
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if tls {
            let mut config = ClientTlsConfig::new().domain_name(host.trim_matches(['[', ']']));
            match &self.ca_cert {
                Some(path) => {
                    let pem = std::fs::read(path).map_err(|source| ConnectError::CaCert {
                        path: path.clone(),
                        source,
                    })?;
                    config = config.ca_certificate(Certificate::from_pem(pem));
                }
                None => config = config.with_enabled_roots(),
            }
            if let Some(identity) = &self.client_identity {
                let read = |what, path: &PathBuf| {
                    std::fs::read(path).map_err(|source| ConnectError::ClientIdentity {
                        what,
                        path: path.clone(),
                        source,
                    })
                };
                config = config.identity(Identity::from_pem(
                    read("certificate", &identity.cert)?,
                    read("key", &identity.key)?,
                ));
            }
            endpoint = endpoint.tls_config(config).map_err(transport)?;
        }
        Ok(endpoint)
    }

    /// A lazily connecting channel to the broker.
    pub fn channel(&self) -> Result<Channel, ConnectError> {
        if self.pins.is_empty() {
            return Ok(self.endpoint()?.connect_lazy());
        }
        let (endpoint, connector) = self.pinned()?;
        Ok(endpoint.connect_with_connector_lazy(connector))
    }

    /// Connects now (TCP, TLS, HTTP/2).
    pub async fn connect(&self) -> Result<Channel, ConnectError> {
        let transport = |source| ConnectError::Transport {
            url: self.url.clone(),
            source,
        };
        if self.pins.is_empty() {
            return self.endpoint()?.connect().await.map_err(transport);
        }
        let (endpoint, connector) = self.pinned()?;
        endpoint
            .connect_with_connector(connector)
            .await
            .map_err(transport)
    }

    /// The endpoint and connector of a pinned address: tonic speaks HTTP/2
    /// over what the connector returns, a rustls stream whose handshake
    /// accepted only a pinned key. The endpoint's URI is `http://` because
    /// the TLS is the connector's, not tonic's.
    fn pinned(&self) -> Result<(Endpoint, PinnedConnector), ConnectError> {
        let (uri, host, tls) = self.parse_url()?;
        if !tls {
            return Err(ConnectError::PinsWithoutTls {
                url: self.url.clone(),
            });
        }
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let port = uri.port_u16().unwrap_or(443);
        let bare_host = host.trim_matches(['[', ']']).to_owned();
        let server_name =
            ServerName::try_from(bare_host.clone()).map_err(|_| ConnectError::InvalidUrl {
                url: self.url.clone(),
                reason: "the host is not a valid name or IP address".into(),
            })?;
        let provider = Arc::new(ring_provider());
        let verifier = Arc::new(PinnedServerVerifier::new(self.pins.clone(), &provider));
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConnectError::ClientIdentityInvalid(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &self.client_identity {
            None => builder.with_no_client_auth(),
            Some(identity) => {
                let read = |what, path: &PathBuf| {
                    std::fs::read(path).map_err(|source| ConnectError::ClientIdentity {
                        what,
                        path: path.clone(),
                        source,
                    })
                };
                let invalid = |e: rustls::pki_types::pem::Error| {
                    ConnectError::ClientIdentityInvalid(e.to_string())
                };
                let chain = CertificateDer::pem_slice_iter(&read("certificate", &identity.cert)?)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(invalid)?;
                let key =
                    PrivateKeyDer::from_pem_slice(&read("key", &identity.key)?).map_err(invalid)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ConnectError::ClientIdentityInvalid(e.to_string()))?
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let endpoint = Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|source| ConnectError::Transport {
                url: self.url.clone(),
                source,
            })?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let connector = PinnedConnector {
            host: bare_host,
            port,
            server_name,
            tls: TlsConnector::from(Arc::new(config)),
        };
        Ok((endpoint, connector))
    }

    /// The interceptor that adds `authorization` and `x-credstream-cluster`
    /// to every call.
    pub fn interceptor(&self) -> Result<CallCredentials, ConnectError> {
        let authorization = bearer_header(&self.token)?;
        let cluster = MetadataValue::try_from(self.cluster_id.as_str()).ok();
        Ok(CallCredentials {
            authorization: Arc::new(RwLock::new(authorization)),
            cluster,
        })
    }
}

/// Opens TCP to the broker and runs the pinned TLS handshake; tonic's
/// connector for a pinned address (the URI tonic passes is ignored: the
/// address is fixed).
#[derive(Clone)]
pub struct PinnedConnector {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: TlsConnector,
}

impl tower::Service<http::Uri> for PinnedConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect((this.host.as_str(), this.port)).await?;
            tcp.set_nodelay(true)?;
            let tls = this.tls.connect(this.server_name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// Adds the bearer token and the cluster header to each request.
///
/// Clones share the token: [`renew`](Self::renew) replaces it for every
/// clone, so a client built once (with the credentials moved into its
/// interceptor) presents a token the broker renewed on its next call.
#[derive(Clone)]
pub struct CallCredentials {
    authorization: Arc<RwLock<AsciiMetadataValue>>,
    cluster: Option<AsciiMetadataValue>,
}

fn bearer_header(token: &str) -> Result<AsciiMetadataValue, ConnectError> {
    let mut value: AsciiMetadataValue = format!("Bearer {token}")
        .parse()
        .map_err(|_| ConnectError::InvalidToken)?;
    value.set_sensitive(true);
    Ok(value)
}

impl CallCredentials {
    /// Credentials for a bearer token alone (no cluster header), for admin
    /// calls.
    pub fn bearer(token: &str) -> Result<Self, ConnectError> {
        Ok(Self {
            authorization: Arc::new(RwLock::new(bearer_header(token)?)),
            cluster: None,
        })
    }

    /// Presents `token` instead of the one held, on every later call of
    /// every clone (a `TokenRenewal` from the broker). On an error the
    /// token held stays.
    pub fn renew(&self, token: &str) -> Result<(), ConnectError> {
        let value = bearer_header(token)?;
        *self
            .authorization
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = value;
        Ok(())
    }
}

impl std::fmt::Debug for CallCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallCredentials(<redacted>)")
    }
}

impl tonic::service::Interceptor for CallCredentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        let authorization = self
            .authorization
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        metadata.insert("authorization", authorization);
        if let Some(cluster) = &self.cluster {
            metadata.insert(CLUSTER_HEADER, cluster.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(url: &str, insecure: bool) -> BrokerAddress {
        BrokerAddress {
            url: url.into(),
            token: "t".into(),
            cluster_id: "c".into(),
            ca_cert: None,
            client_identity: None,
            insecure,
            pins: Vec::new(),
        }
    }

    #[test]
    fn plaintext_is_allowed_only_to_loopback_or_with_insecure() {
        assert!(address("http://127.0.0.1:50051", false).endpoint().is_ok());
        assert!(address("http://localhost:50051", false).endpoint().is_ok());
        assert!(address("http://[::1]:50051", false).endpoint().is_ok());
        let err = address("http://broker.example.com:50051", false)
            .endpoint()
            .unwrap_err();
        assert!(
            matches!(err, ConnectError::PlaintextToRemote { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("--insecure"));
        assert!(
            address("http://broker.example.com:50051", true)
                .endpoint()
                .is_ok()
        );
    }

    #[test]
    fn bad_urls_are_explained() {
        let err = address("ftp://x:1", false).endpoint().unwrap_err();
        assert!(err.to_string().contains("scheme"), "{err}");
    }

    #[test]
    fn a_client_certificate_needs_tls_and_readable_files() {
        let identity = ClientIdentity {
            cert: "/nonexistent/client.pem".into(),
            key: "/nonexistent/client.key".into(),
        };
        let mut plain = address("http://127.0.0.1:1", false);
        plain.client_identity = Some(identity.clone());
        let err = plain.endpoint().unwrap_err();
        assert!(
            matches!(err, ConnectError::ClientIdentityWithoutTls { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("https://"), "{err}");

        let mut tls = address("https://127.0.0.1:1", false);
        tls.client_identity = Some(identity);
        let err = tls.endpoint().unwrap_err();
        assert!(
            err.to_string()
                .contains("client certificate /nonexistent/client.pem"),
            "{err}"
        );
    }

    #[test]
    fn a_renewed_token_reaches_every_clone() {
        use tonic::service::Interceptor;
        let credentials = address("http://127.0.0.1:1", false).interceptor().unwrap();
        let mut in_client = credentials.clone();
        let sent = |interceptor: &mut CallCredentials| {
            let request = interceptor.call(Request::new(())).unwrap();
            request.metadata().get("authorization").unwrap().clone()
        };
        assert_eq!(sent(&mut in_client), "Bearer t");
        credentials.renew("renewed").unwrap();
        assert_eq!(sent(&mut in_client), "Bearer renewed");
        assert!(credentials.renew("bad\ntoken").is_err());
        assert_eq!(sent(&mut in_client), "Bearer renewed", "kept on error");
    }

    #[test]
    fn debug_hides_the_token() {
        let mut a = address("http://127.0.0.1:1", false);
        a.token = "super-secret-token".into();
        assert!(!format!("{a:?}").contains("super-secret"));
    }
}
