//! A broker's state directory (issue 32, "one string to join a standalone
//! broker"): `credstream-broker init --state-dir D` or the first start with
//! `--state-dir D` creates what a broker reachable by others needs, and
//! prints one join string per role ([`credstream_proto::join`]).
//!
//! - `D/token-key`: a key ring (`credstream-keys v1`, one random 32-byte
//!   key), mode 0600.
//! - `D/tls-key.pem` (mode 0600) and `D/tls-cert.pem`: a self-signed leaf
//!   certificate (not a CA: rustls refuses a CA as an end entity) for the
//!   broker's addresses, made with rcgen (ECDSA P-256), unless the operator
//!   gives a certificate of their own.
//!
//! Existing files are kept, never overwritten: a second `init` prints new
//! join strings for the same key, so joins issued before stay valid.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine;
use credstream_proto::join::SpkiPin;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;

use crate::auth::KEY_RING_HEADER;

/// The files of a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    /// The directory.
    pub dir: PathBuf,
}

/// What [`StateDir::ensure`] found or made.
#[derive(Debug, Default)]
pub struct Created {
    /// The key ring was made now.
    pub token_key: bool,
    /// The self-signed pair was made now.
    pub tls: bool,
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

impl StateDir {
    /// The directory `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The token key ring.
    pub fn token_key(&self) -> PathBuf {
        self.dir.join("token-key")
    }

    /// The self-signed certificate.
    pub fn tls_cert(&self) -> PathBuf {
        self.dir.join("tls-cert.pem")
    }

    /// The self-signed certificate's private key.
    pub fn tls_key(&self) -> PathBuf {
        self.dir.join("tls-key.pem")
    }

    /// Creates the directory (0700), the key ring and, when `self_signed`,
    /// the TLS pair for `hosts` (IP addresses or names, the certificate's
    /// SANs), each only if missing.
    pub fn ensure(&self, self_signed: bool, hosts: &[String]) -> anyhow::Result<Created> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("cannot create the state directory {}", self.dir.display()))?;
        let mut created = Created::default();
        if !self.token_key().exists() {
            let mut key = zeroize::Zeroizing::new(vec![0u8; 32]);
            rand::Rng::fill(&mut rand::thread_rng(), key.as_mut_slice());
            let ring = zeroize::Zeroizing::new(format!(
                "{KEY_RING_HEADER}\n{}\n",
                base64::engine::general_purpose::STANDARD.encode(key.as_slice())
            ));
            write_new(&self.token_key(), ring.as_bytes(), 0o600)?;
            created.token_key = true;
        }
        if self_signed && !self.tls_cert().exists() {
            if self.tls_key().exists() {
                bail!(
                    "{} exists without {}: remove it to have a new pair made, or give --tls-cert and --tls-key",
                    self.tls_key().display(),
                    self.tls_cert().display()
                );
            }
            if hosts.is_empty() {
                bail!("give the address workers reach the broker at (--address HOST:PORT)");
            }
            let key = rcgen::KeyPair::generate().context("cannot generate the TLS key")?;
            let mut params = rcgen::CertificateParams::new(hosts.to_vec())
                .context("the broker's address is not a valid certificate name")?;
            params.is_ca = rcgen::IsCa::ExplicitNoCa;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "credstream-broker");
            let cert = params
                .self_signed(&key)
                .context("cannot sign the TLS certificate")?;
            let pem = zeroize::Zeroizing::new(key.serialize_pem());
            write_new(&self.tls_key(), pem.as_bytes(), 0o600)?;
            write_new(&self.tls_cert(), cert.pem().as_bytes(), 0o644)?;
            created.tls = true;
        }
        Ok(created)
    }
}

/// The pin of the first certificate of the PEM file `cert`.
pub fn pin_of(cert: &Path) -> anyhow::Result<SpkiPin> {
    let pem = std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?;
    let first = CertificateDer::pem_slice_iter(&pem)
        .next()
        .with_context(|| format!("{} holds no PEM certificate", cert.display()))?
        .with_context(|| format!("{} is not valid PEM", cert.display()))?;
    Ok(SpkiPin::of_certificate(&first)?)
}

/// The host of `HOST:PORT` (brackets of an IPv6 address removed).
pub fn host_of(address: &str) -> anyhow::Result<String> {
    let (host, port) = address
        .rsplit_once(':')
        .with_context(|| format!("--address {address:?} has no :PORT"))?;
    port.parse::<u16>()
        .with_context(|| format!("--address {address:?}: the port is not a number"))?;
    Ok(host.trim_matches(['[', ']']).to_owned())
}
