//! The broker's TLS: a rustls server configuration (ring, TLS 1.2 and 1.3,
//! ALPN `h2`, optionally requiring client certificates) from PEM files.
//! The handshake itself runs in [`crate::connections`], under the handshake
//! deadline and at most `max_handshakes` at a time (the others wait after
//! their ClientHello), before tonic sees the connection.
//!
//! Tuned for many long-lived, mostly idle agent connections, each of which
//! gets every credential version through its own AEAD (issue 18):
//!
//! - **Cheapest AEAD first.** The server picks the cipher suite, in the
//!   order AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305 (TLS 1.3, then the
//!   same for 1.2), instead of following the client, whose rustls default
//!   puts AES-256-GCM first: AES-128 runs 10 rounds instead of 14 on every
//!   record to every agent, and both are TLS 1.3's mandatory suites.
//! - **Stateless session tickets.** One TLS 1.3 ticket per connection (an
//!   agent holds one connection; rustls sends two by default), sealed by a
//!   rotating key (ring's `Ticketer`, 6 h) instead of rustls' default
//!   stateful cache of 256 sessions, which 10,000 agents would thrash and
//!   which takes a lock on every handshake: any agent that reconnects to the
//!   same broker process resumes (no certificate, no signature) and the
//!   broker keeps nothing per agent for it. After a broker restart the key
//!   is new, so a reconnect storm is full handshakes (measured in the
//!   README).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use tokio_rustls::rustls::{
    CipherSuite, RootCertStore, ServerConfig, SupportedCipherSuite, crypto,
};

use crate::server::TlsFiles;

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

fn certificates(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{what} {} is not valid PEM", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{what} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(certs)
}

/// The server's cipher suite preference (see the module documentation).
const SUITE_ORDER: [CipherSuite; 6] = [
    CipherSuite::TLS13_AES_128_GCM_SHA256,
    CipherSuite::TLS13_AES_256_GCM_SHA384,
    CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
];

/// Where `suite` goes in the server's preference: listed ones first, in
/// [`SUITE_ORDER`], then the rest in the provider's order.
fn preference(suite: &SupportedCipherSuite) -> usize {
    SUITE_ORDER
        .iter()
        .position(|s| *s == suite.suite())
        .unwrap_or(SUITE_ORDER.len())
}

/// TLS 1.3 tickets sent per connection.
const TLS13_TICKETS: usize = 1;

/// The acceptor for `files`.
pub fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    // ring, deprecated in rustls 0.23.48 for lacking post-quantum key exchange,
    // stays until the switch to aws-lc-rs (README "Decisions": TLS uses ring).
    #[allow(deprecated)]
    let mut provider = crypto::ring::default_provider();
    // A stable sort: suites not named keep the provider's order.
    provider.cipher_suites.sort_by_key(preference);
    let provider = Arc::new(provider);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS configuration")?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(certificates(ca, "client CA")?);
            if added == 0 {
                bail!("client CA {} holds no usable certificate", ca.display());
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .context("TLS configuration: client CA")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let chain = certificates(&files.cert, "TLS certificate")?;
    let key_pem = zeroize::Zeroizing::new(read(&files.key, "TLS key")?);
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .ok()
        .with_context(|| {
            format!(
                "TLS key {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                files.key.display()
            )
        })?;
    let mut config = builder
        .with_single_cert(chain, key)
        .context("TLS configuration: the certificate and key do not form a usable identity")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.ignore_client_order = true;
    config.ticketer = crypto::ring::Ticketer::new().context("TLS session ticket key")?;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = TLS13_TICKETS;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_prefers_aes_128_gcm_and_keeps_every_suite() {
        // ring, deprecated in rustls 0.23.48 for lacking post-quantum key exchange,
        // stays until the switch to aws-lc-rs (README "Decisions": TLS uses ring).
        #[allow(deprecated)]
        let mut suites = crypto::ring::default_provider().cipher_suites;
        let count = suites.len();
        suites.sort_by_key(preference);
        assert_eq!(suites.len(), count);
        assert_eq!(suites[0].suite(), CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(suites[1].suite(), CipherSuite::TLS13_AES_256_GCM_SHA384);
        // TLS 1.3 suites stay ahead of every TLS 1.2 one.
        let first_tls12 = suites
            .iter()
            .position(|s| s.tls13().is_none())
            .expect("a TLS 1.2 suite");
        assert!(suites[first_tls12..].iter().all(|s| s.tls13().is_none()));
    }
}
