//! The broker's TLS: a rustls server configuration (ring, TLS 1.2 and 1.3,
//! ALPN `h2`, optionally requiring client certificates) from PEM files.
//! The handshake itself runs in [`connections`](crate::connections), under
//! the handshake deadline, before tonic sees the connection.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, crypto};

use crate::server::TlsFiles;

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

fn certificates(
    path: &Path,
    what: &str,
) -> anyhow::Result<Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>> {
    let pem = read(path, what)?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(pem.as_slice()))
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

/// The acceptor for `files`.
pub fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(crypto::ring::default_provider());
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
    let key = rustls_pemfile::private_key(&mut BufReader::new(key_pem.as_slice()))
        .ok()
        .flatten()
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
    Ok(TlsAcceptor::from(Arc::new(config)))
}
