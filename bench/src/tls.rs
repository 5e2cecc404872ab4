//! The certificates of a TLS run: one CA and one server certificate for IP
//! 127.0.0.1 it signed (both P-256, as rcgen makes them), written as PEM
//! files that every server is given and every client verifies against.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

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
