//! The certificates of a TLS run: one CA and one server certificate for IP
//! 127.0.0.1 it signed (both P-256, as rcgen makes them), written as PEM
//! files that every server is given and every client verifies against.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The PEM files of one run.
#[derive(Clone, Debug)]
pub struct TlsMaterial {
    /// The CA certificate every client trusts.
    pub ca: PathBuf,
    /// The server certificate (for IP 127.0.0.1 only).
    pub cert: PathBuf,
    /// Its private key (written 0600).
    pub key: PathBuf,
}

impl TlsMaterial {
    /// Generates the CA and the server certificate into `dir`.
    pub fn generate(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ca_key = rcgen::KeyPair::generate().context("CA key")?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "credstream-bench CA");
        let ca = ca_params.self_signed(&ca_key).context("CA certificate")?;

        let key = rcgen::KeyPair::generate().context("server key")?;
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "127.0.0.1");
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .context("server certificate")?;

        let material = Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        std::fs::write(&material.ca, ca.pem())?;
        std::fs::write(&material.cert, cert.pem())?;
        write_private(&material.key, key.serialize_pem().as_bytes())?;
        Ok(material)
    }

    /// The CA certificate's PEM bytes.
    pub fn ca_pem(&self) -> Result<Vec<u8>> {
        std::fs::read(&self.ca).with_context(|| format!("cannot read {}", self.ca.display()))
    }

    /// The broker's own rustls server configuration
    /// ([`credstream_broker::tls::acceptor`]) with this material's
    /// certificate: what the in-memory TLS examples measure.
    pub fn broker_server_config(&self) -> Result<Arc<ServerConfig>> {
        let acceptor = credstream_broker::tls::acceptor(&credstream_broker::server::TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: None,
        })?;
        Ok(acceptor.config().clone())
    }

    /// A rustls client configuration that trusts this material's CA only
    /// and offers `h2`, as tonic's agents do (ring, rustls' safe default
    /// protocol versions).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem()?) {
            roots.add(cert.context("CA PEM")?)?;
        }
        // ring, deprecated in rustls 0.23.48 for lacking post-quantum key exchange,
        // stays until the switch to aws-lc-rs (README "Decisions": TLS uses ring).
        #[allow(deprecated)]
        let mut config = ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(bytes)?;
    Ok(())
}
