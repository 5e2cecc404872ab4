//! A service account key for tests: a new 2048-bit RSA key per call, made
//! in Rust (RustCrypto's `rsa`), so the GCP minting tests need no Python.
//! The private half is PKCS#8 PEM, as Google's key files hold it; the
//! public half is PKCS#1 DER, as `ring` verifies a JWT signature with it.

use rsa::pkcs1::EncodeRsaPublicKey;
use rsa::pkcs8::{EncodePrivateKey, LineEnding};

/// One generated key.
pub struct TestKey {
    /// The private key, PKCS#8 PEM (a key file's `private_key`).
    pub pem: String,
    /// The public key, PKCS#1 DER.
    pub public_pkcs1_der: Vec<u8>,
}

/// A new key.
pub fn generate() -> TestKey {
    let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("RSA key");
    let pem = private
        .to_pkcs8_pem(LineEnding::LF)
        .expect("PKCS#8 PEM")
        .to_string();
    let public_pkcs1_der = private
        .to_public_key()
        .to_pkcs1_der()
        .expect("PKCS#1 DER")
        .as_bytes()
        .to_vec();
    TestKey {
        pem,
        public_pkcs1_der,
    }
}
