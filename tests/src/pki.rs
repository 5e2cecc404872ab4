//! A throwaway certificate authority for TLS and mutual-TLS tests: a CA,
//! and leaf certificates it signs, written as PEM files in a temporary
//! directory that lives as long as the [`Pki`].

use std::path::PathBuf;

use credstream_broker::server::TlsFiles;
use credstream_proto::connect::ClientIdentity;

/// A CA and the directory its files are written to.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

/// A certificate and key written by [`Pki::leaf`].
#[derive(Clone, Debug)]
pub struct Leaf {
    /// The certificate file.
    pub cert: PathBuf,
    /// The private key file.
    pub key: PathBuf,
}

impl Leaf {
    /// As the identity a client presents.
    pub fn client_identity(&self) -> ClientIdentity {
        ClientIdentity {
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

impl Pki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca = params.self_signed(&ca_key).expect("self-signed CA");
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            ca,
            ca_key,
        }
    }

    /// Writes a certificate for `sans` signed by the CA, and its key.
    pub fn leaf(&self, name: &str, sans: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("signed");
        let leaf = Leaf {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
        };
        std::fs::write(&leaf.cert, cert.pem()).expect("write certificate");
        std::fs::write(&leaf.key, key.serialize_pem()).expect("write key");
        leaf
    }

    /// The CA certificate's file.
    pub fn ca_path(&self) -> PathBuf {
        let path = self.dir.path().join("ca.pem");
        std::fs::write(&path, self.ca.pem()).expect("write CA");
        path
    }

    /// Broker TLS files for `localhost` and 127.0.0.1; with
    /// `require_client_certs`, clients must present a certificate this CA
    /// signed.
    pub fn broker_tls(&self, require_client_certs: bool) -> TlsFiles {
        let server = self.leaf("server", &["localhost", "127.0.0.1"]);
        TlsFiles {
            cert: server.cert,
            key: server.key,
            client_ca: require_client_certs.then(|| self.ca_path()),
        }
    }
}
