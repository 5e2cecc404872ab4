//! The broker's TLS configuration and a client that trusts it, for the
//! tests of the vendored rustls patch (`tls_records.rs`,
//! `tls_idle_memory.rs`; see `third_party/rustls/CREDSTREAM_PATCHES.md`)
//! and for the admission tests in `src/connections.rs`, whose crate
//! includes this file as `test_pki` (`src/lib.rs`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use credstream_broker::server::TlsFiles;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

/// Only a guard against a hang: nothing here is expected to take more
/// than a fraction of it.
pub const GUARD: Duration = Duration::from_secs(10);

/// The broker's acceptor for 127.0.0.1 (its files in the directory) and a
/// client that trusts it.
pub struct Pki {
    _dir: tempfile::TempDir,
    pub acceptor: TlsAcceptor,
    /// The client's configuration (tests that drive rustls by hand use it
    /// as it is).
    pub client: Arc<ClientConfig>,
}

impl Pki {
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(self.client.clone())
    }
}

pub fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles {
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server.key"),
        client_ca: None,
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    // ring, deprecated in rustls 0.23.48 for lacking post-quantum key exchange,
    // stays until the switch to aws-lc-rs (README "Decisions": TLS uses ring).
    #[allow(deprecated)]
    let mut client =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    Pki {
        acceptor: credstream_broker::tls::acceptor(&files).unwrap(),
        client: Arc::new(client),
        _dir: dir,
    }
}

/// Awaits `step`, panicking after [`GUARD`] so that a regression shows up
/// as a failure naming the step rather than as a test that never ends.
pub async fn within_guard<T>(what: &str, step: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, step)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {GUARD:?}"))
}

/// Both ends of a TLS connection over the given transports, the server's
/// through the broker's acceptor.
pub async fn handshake<S, C>(
    pki: &Pki,
    server_io: S,
    client_io: C,
) -> (server::TlsStream<S>, client::TlsStream<C>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let (server, client) = within_guard("the handshake", async {
        tokio::join!(
            pki.acceptor.accept(server_io),
            pki.connector().connect(name, client_io)
        )
    })
    .await;
    (
        server.expect("the server completes the handshake"),
        client.expect("the client completes the handshake"),
    )
}

/// Sends a message from the client and back from the server, so a test
/// can tell that a connection still carries data both ways.
pub async fn round_trip<S, C>(server: &mut server::TlsStream<S>, client: &mut client::TlsStream<C>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: AsyncRead + AsyncWrite + Unpin,
{
    let message = b"ping over a healthy connection";
    within_guard("a round trip", async {
        client.write_all(message).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0u8; message.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, message, "the server receives what the client sent");
        server.write_all(&got).await.unwrap();
        server.flush().await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, message, "the client receives the echo");
    })
    .await;
}
