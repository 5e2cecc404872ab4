//! Join strings and key pinning: one string that lets a publisher or an
//! agent reach a standalone broker over TLS without a CA (issue 32).
//!
//! A join string is `csj1.` then the unpadded base64url of three or more
//! lines: the broker's `HOST:PORT`, the bearer token, then one
//! `sha256/<base64>` pin per line, the SHA-256 of the DER
//! SubjectPublicKeyInfo of a key the broker may present (several during a
//! key rotation). `credstream-broker init` prints one per role, the shape of
//! kubeadm's `--discovery-token-ca-cert-hash` and k3s's secure token.
//!
//! A [`JoinString`] carries a token, so it is a secret: its `Debug` shows
//! the address and the pins only, and [`JoinString::encode`] returns a
//! zeroizing string.
//!
//! [`PinnedServerVerifier`] is the rustls `ServerCertVerifier` a pinned
//! connection uses instead of the WebPKI one: it accepts the broker's
//! end-entity certificate iff the hash of its public key is one of the
//! pins, with no CA, validity or host name check (the address may be an
//! IP, and the pin, not a name, is what identifies the broker), and it
//! still checks the handshake signatures with the provider's algorithms, so
//! only a peer holding the pinned private key gets through. A refusal
//! fails the TLS handshake, before any HTTP/2 request, so the token is
//! never sent to a broker with another key.
//!
//! Trust on first copy: the pins are exactly as trustworthy as the channel
//! the join string was copied over. Whoever can change it in transit can
//! pin their own key; whoever can read it holds the token.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{
    WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use zeroize::Zeroizing;

/// The prefix of a join string, with its version.
pub const JOIN_PREFIX: &str = "csj1.";
/// The longest join string accepted (a token is a few hundred bytes).
pub const MAX_JOIN_LEN: usize = 4096;
/// Most pins one join string may carry.
pub const MAX_PINS: usize = 8;
/// The prefix of a pin.
pub const PIN_PREFIX: &str = "sha256/";

/// Why a join string or a pin was refused. The messages never quote the
/// string itself (it carries a token).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinError {
    /// It does not start with `csj1.`: not a join string, or one from a
    /// newer broker.
    #[error(
        "this is not a credstream join string (it should start with {JOIN_PREFIX}); copy the whole line `credstream-broker init` printed"
    )]
    Prefix,
    /// Longer than [`MAX_JOIN_LEN`].
    #[error(
        "the join string is {0} bytes, more than the {MAX_JOIN_LEN} allowed; copy the line `credstream-broker init` printed"
    )]
    TooLong(usize),
    /// The part after the prefix is not unpadded base64url, or not text:
    /// usually a string cut short or wrapped when it was copied.
    #[error(
        "the join string is damaged (not base64url after {JOIN_PREFIX}); it was probably cut or wrapped when copied: copy it again, whole"
    )]
    Encoding,
    /// A part is missing or malformed.
    #[error(
        "the join string is damaged ({0}); it was probably cut when copied: copy it again, whole"
    )]
    Malformed(&'static str),
    /// A pin is not `sha256/` and the standard base64 of 32 bytes.
    #[error(
        "invalid key pin: {0} (expected sha256/ and the base64 SHA-256 of the broker's public key)"
    )]
    Pin(&'static str),
    /// A certificate could not be parsed to take its key's hash.
    #[error("cannot read the public key of the certificate: {0}")]
    Certificate(String),
}

/// The SHA-256 of a DER SubjectPublicKeyInfo; shown as `sha256/<base64>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpkiPin(pub [u8; 32]);

impl SpkiPin {
    /// The pin of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki: &[u8]) -> Self {
        Self(Sha256::digest(spki).into())
    }

    /// The pin of the key in a DER certificate.
    pub fn of_certificate(cert: &CertificateDer<'_>) -> Result<Self, JoinError> {
        let parsed = rustls::server::ParsedCertificate::try_from(cert)
            .map_err(|e| JoinError::Certificate(e.to_string()))?;
        Ok(Self::of_spki(&parsed.subject_public_key_info()))
    }
}

impl fmt::Display for SpkiPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PIN_PREFIX}{}", STANDARD.encode(self.0))
    }
}

impl fmt::Debug for SpkiPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for SpkiPin {
    type Err = JoinError;

    fn from_str(s: &str) -> Result<Self, JoinError> {
        let b64 = s
            .strip_prefix(PIN_PREFIX)
            .ok_or(JoinError::Pin("it does not start with sha256/"))?;
        let bytes = STANDARD
            .decode(b64)
            .map_err(|_| JoinError::Pin("not standard base64"))?;
        let hash: [u8; 32] = bytes
            .try_into()
            .map_err(|_| JoinError::Pin("not 32 bytes"))?;
        Ok(Self(hash))
    }
}

/// What a join string carries: where the broker is, the token to present
/// and the keys the broker may present.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinString {
    /// `HOST:PORT` of the broker (an IP or a name).
    pub address: String,
    /// The bearer token (publisher or agent role).
    pub token: Zeroizing<String>,
    /// The accepted broker keys; at least one.
    pub pins: Vec<SpkiPin>,
}

impl fmt::Debug for JoinString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinString")
            .field("address", &self.address)
            .field(
                "token",
                &format_args!("<redacted {} bytes>", self.token.len()),
            )
            .field("pins", &self.pins)
            .finish()
    }
}

fn check_address(address: &str) -> Result<(), JoinError> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or(JoinError::Malformed("the address has no :PORT"))?;
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-[]:_".contains(c))
    {
        return Err(JoinError::Malformed("the address's host is not valid"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(JoinError::Malformed("the address's port is not valid")),
    }
}

fn check_token(token: &str) -> Result<(), JoinError> {
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(JoinError::Malformed("the token is empty or not printable"));
    }
    Ok(())
}

impl JoinString {
    /// A join string for `address` (`HOST:PORT`), checked.
    pub fn new(address: String, token: &str, pins: Vec<SpkiPin>) -> Result<Self, JoinError> {
        check_address(&address)?;
        check_token(token)?;
        if pins.is_empty() || pins.len() > MAX_PINS {
            return Err(JoinError::Malformed("it needs 1 to 8 key pins"));
        }
        Ok(Self {
            address,
            token: Zeroizing::new(token.to_owned()),
            pins,
        })
    }

    /// The string to hand over (a secret: it holds the token).
    pub fn encode(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(format!("{}\n{}", self.address, self.token.as_str()));
        for pin in &self.pins {
            text.push('\n');
            text.push_str(&pin.to_string());
        }
        Zeroizing::new(format!(
            "{JOIN_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(text.as_bytes())
        ))
    }

    /// Parses a join string; surrounding whitespace (a file's newline) is
    /// dropped.
    pub fn parse(text: &str) -> Result<Self, JoinError> {
        let text = text.trim();
        if text.len() > MAX_JOIN_LEN {
            return Err(JoinError::TooLong(text.len()));
        }
        let body = text.strip_prefix(JOIN_PREFIX).ok_or(JoinError::Prefix)?;
        let bytes = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(body)
                .map_err(|_| JoinError::Encoding)?,
        );
        let decoded = std::str::from_utf8(&bytes).map_err(|_| JoinError::Encoding)?;
        let mut lines = decoded.split('\n');
        let address = lines
            .next()
            .filter(|l| !l.is_empty())
            .ok_or(JoinError::Malformed("no address"))?;
        let token = lines.next().ok_or(JoinError::Malformed("no token"))?;
        let pins = lines
            .filter(|line| !line.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<SpkiPin>, _>>()?;
        if pins.is_empty() {
            return Err(JoinError::Malformed("no key pin"));
        }
        Self::new(address.to_owned(), token, pins)
    }
}

/// rustls' ring provider, the one the broker serves with (its deprecation
/// note is about post-quantum key exchange, which ring lacks; the broker
/// does not offer it either).
#[allow(deprecated)]
pub fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The broker presented a key that no pin names. Its `Debug` is its
/// message (rustls shows a certificate error by `Debug`).
#[derive(thiserror::Error)]
#[error(
    "the broker presented public key {presented}, which the join string does not pin ({pinned}): this is not the broker the join string was made for, or its key changed; get a new join string from the broker's operator. No token was sent"
)]
pub struct PinMismatch {
    /// The hash of the key presented.
    pub presented: SpkiPin,
    /// The pins, comma separated.
    pub pinned: String,
}

impl fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Accepts a server certificate whose public key is pinned (see the module
/// documentation).
#[derive(Debug)]
pub struct PinnedServerVerifier {
    pins: Vec<SpkiPin>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedServerVerifier {
    /// A verifier for `pins`, checking signatures with `provider`'s
    /// algorithms.
    pub fn new(pins: Vec<SpkiPin>, provider: &rustls::crypto::CryptoProvider) -> Self {
        Self {
            pins,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = SpkiPin::of_certificate(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.pins.contains(&presented) {
            return Ok(ServerCertVerified::assertion());
        }
        let pinned = self
            .pins
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(PinMismatch { presented, pinned })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(n: u8) -> SpkiPin {
        SpkiPin([n; 32])
    }

    #[test]
    fn a_join_string_round_trips_and_hides_its_token() {
        let join = JoinString::new(
            "10.231.0.1:50051".into(),
            "cs1.abc.def",
            vec![pin(1), pin(2)],
        )
        .unwrap();
        let text = join.encode();
        assert!(text.starts_with(JOIN_PREFIX));
        assert_eq!(
            JoinString::parse(&format!("  {}\n", text.as_str())).unwrap(),
            join
        );
        let debug = format!("{join:?}");
        assert!(!debug.contains("cs1.abc"), "{debug}");
        assert!(debug.contains("10.231.0.1:50051"), "{debug}");
        let ipv6 = JoinString::new("[fd00::1]:443".into(), "t", vec![pin(3)]).unwrap();
        assert_eq!(JoinString::parse(&ipv6.encode()).unwrap(), ipv6);
    }

    #[test]
    fn hostile_join_strings_get_clear_errors_that_never_quote_them() {
        let good = JoinString::new("broker:50051".into(), "secret-token", vec![pin(7)])
            .unwrap()
            .encode();
        let truncated = &good[..good.len() - 20];
        let cases: Vec<(String, &str)> = vec![
            ("csj2.abc".into(), "should start with csj1."),
            ("secret-token".into(), "should start with csj1."),
            ("csj1.!!!!".into(), "not base64url"),
            (truncated.to_owned(), "probably cut"),
            (format!("csj1.{}", "A".repeat(5000)), "more than the 4096"),
            (
                format!("csj1.{}", URL_SAFE_NO_PAD.encode("h:1\nt")),
                "no key pin",
            ),
            (
                format!("csj1.{}", URL_SAFE_NO_PAD.encode("h:1\nt\nsha256/AAAA")),
                "not 32 bytes",
            ),
            (
                format!("csj1.{}", URL_SAFE_NO_PAD.encode("h\nt\n") + ""),
                "damaged",
            ),
            (
                format!(
                    "csj1.{}",
                    URL_SAFE_NO_PAD.encode(format!("h:99999\nt\n{}", pin(1)))
                ),
                "port is not valid",
            ),
            (
                format!(
                    "csj1.{}",
                    URL_SAFE_NO_PAD.encode(format!("h:1\nt t\n{}", pin(1)))
                ),
                "token is empty or not printable",
            ),
        ];
        for (input, expected) in cases {
            let err = JoinString::parse(&input).unwrap_err().to_string();
            assert!(err.contains(expected), "{input:.40}: {err}");
            assert!(!err.contains("secret-token"), "{err}");
        }
        let too_many = vec![pin(0); MAX_PINS + 1];
        assert!(JoinString::new("h:1".into(), "t", too_many).is_err());
    }

    #[test]
    fn pins_parse_and_print() {
        let p = pin(9);
        assert_eq!(p.to_string().parse::<SpkiPin>().unwrap(), p);
        assert!("md5/AAAA".parse::<SpkiPin>().is_err());
        assert!("sha256/***".parse::<SpkiPin>().is_err());
    }

    mod verifier {
        use super::*;
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

        fn provider() -> rustls::crypto::CryptoProvider {
            ring_provider()
        }

        fn leaf() -> (CertificateDer<'static>, KeyPair) {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec!["broker".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            (cert.der().clone(), key)
        }

        fn check(pins: Vec<SpkiPin>, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
            PinnedServerVerifier::new(pins, &provider())
                .verify_server_cert(
                    cert,
                    &[],
                    &ServerName::try_from("10.231.0.1").unwrap(),
                    &[],
                    UnixTime::now(),
                )
                .map(|_| ())
        }

        #[test]
        fn the_pinned_key_is_accepted_whatever_the_name() {
            let (cert, key) = leaf();
            let pin = SpkiPin::of_certificate(&cert).unwrap();
            assert_eq!(pin, SpkiPin::of_spki(&key.public_key_der()));
            check(vec![pin], &cert).unwrap();
            // One of several (a rotation).
            check(vec![SpkiPin([0; 32]), pin], &cert).unwrap();
        }

        #[test]
        fn another_key_is_refused_naming_both() {
            let (cert, _) = leaf();
            let (other, _) = leaf();
            let pin = SpkiPin::of_certificate(&other).unwrap();
            let err = check(vec![pin], &cert).unwrap_err().to_string();
            assert!(err.contains(&pin.to_string()), "{err}");
            assert!(
                err.contains(&SpkiPin::of_certificate(&cert).unwrap().to_string()),
                "{err}"
            );
            assert!(err.contains("No token was sent"), "{err}");
        }

        #[test]
        fn a_pinned_ca_does_not_vouch_for_the_certificates_it_signs() {
            let ca_key = KeyPair::generate().unwrap();
            let mut ca_params = CertificateParams::new(vec![]).unwrap();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let leaf_key = KeyPair::generate().unwrap();
            let leaf = CertificateParams::new(vec!["broker".into()])
                .unwrap()
                .signed_by(&leaf_key, &ca, &ca_key)
                .unwrap();
            let ca_pin = SpkiPin::of_certificate(ca.der()).unwrap();
            assert!(check(vec![ca_pin], leaf.der()).is_err());
        }

        #[test]
        fn garbage_is_not_a_certificate() {
            let garbage = CertificateDer::from(vec![0x30, 0x03, 0x01, 0x01, 0xff]);
            assert!(check(vec![SpkiPin([0; 32])], &garbage).is_err());
        }
    }
}
