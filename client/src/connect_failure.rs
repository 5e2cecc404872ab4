//! Why a connection to the broker failed, read from the error's `source()`
//! chain by type: `rustls::Error` (on its own, or inside the `std::io::Error`
//! the TLS stream returns), `h2::Error`, and `std::io::Error` kinds.
//! [`crate::broker`] turns the answer into a message with the fix, for the
//! CLI and the Python package alike; nothing here looks at error text.
//!
//! What the chains look like (tonic 0.14, hyper 1, rustls 0.23):
//!
//! - failures while connecting (`Endpoint::connect`): `tonic::transport::Error`
//!   → tonic's connect error → `io::Error` (`InvalidData`) → `rustls::Error`,
//!   or → hyper-util's connect error → `io::Error` (`ConnectionRefused`, …);
//! - failures of a call on a connected channel (`Status::source`):
//!   `tonic::transport::Error` → `hyper::Error` → `h2::Error`, or → an
//!   `io::Error` that h2 rebuilt from the kind and text of the original
//!   (h2 keeps errors cloneable), so a TLS alert that arrives after the
//!   handshake is an `InvalidData` `io::Error` without its `rustls::Error`.

use std::error::Error;
use std::io;

use rustls::{AlertDescription, CertificateError, InvalidMessage};

/// What went wrong with the broker's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateProblem {
    /// No trusted CA signed it: a private CA that was not given.
    UnknownIssuer,
    /// It does not name the host the client connected to.
    WrongName,
    /// It has expired, or is not valid yet (a clock off).
    OutsideValidity,
    /// Another reason (revoked, bad signature, bad encoding, …).
    Other,
}

/// Why a connection to the broker failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The peer answered the TLS hello with bytes that are not TLS: it
    /// serves plaintext.
    NotTls,
    /// The client rejected the broker's certificate.
    BrokerCertificate(CertificateProblem),
    /// The broker rejected this client's certificate (or its absence): a
    /// certificate alert from the broker, or, with TLS 1.3, where the
    /// broker checks the client's certificate after the client considers
    /// the handshake done, a TLS failure on the connected channel.
    ClientCertificateRefused,
    /// Another TLS failure (no common protocol version or cipher suite, a
    /// malformed message, …).
    Tls,
    /// Plaintext HTTP/2 got frames it cannot parse: the peer is not a
    /// plaintext HTTP/2 server (it may serve TLS).
    NotHttp2,
    /// Anything else: refused, reset, timed out, a name that does not
    /// resolve, a connection that closed.
    Unreachable,
}

/// The alerts a TLS server sends about the client's certificate.
fn is_client_certificate_alert(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::CertificateRequired
            | AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::AccessDenied
    )
}

fn certificate_problem(error: &CertificateError) -> CertificateProblem {
    match error {
        CertificateError::UnknownIssuer => CertificateProblem::UnknownIssuer,
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            CertificateProblem::WrongName
        }
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => CertificateProblem::OutsideValidity,
        _ => CertificateProblem::Other,
    }
}

fn from_rustls(error: &rustls::Error) -> ConnectFailure {
    match error {
        rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType) => ConnectFailure::NotTls,
        rustls::Error::InvalidCertificate(problem) => {
            ConnectFailure::BrokerCertificate(certificate_problem(problem))
        }
        rustls::Error::AlertReceived(alert) if is_client_certificate_alert(*alert) => {
            ConnectFailure::ClientCertificateRefused
        }
        _ => ConnectFailure::Tls,
    }
}

/// The `rustls::Error` that `error` is or carries (an `io::Error` from the
/// TLS stream wraps it).
fn rustls_error<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = error.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    error
        .downcast_ref::<io::Error>()?
        .get_ref()?
        .downcast_ref::<rustls::Error>()
}

/// Classifies `error` by the types in its `source()` chain. The most
/// specific cause wins: a `rustls::Error` anywhere in the chain, then an
/// HTTP/2 framing error, then an `InvalidData` I/O error (which only the
/// TLS layer returns; h2 drops its type), else unreachable.
pub fn classify(error: &(dyn Error + 'static)) -> ConnectFailure {
    let chain = || std::iter::successors(Some(error), |e: &&(dyn Error + 'static)| (*e).source());
    if let Some(tls) = chain().find_map(rustls_error) {
        return from_rustls(tls);
    }
    let framing = chain().any(|e| {
        e.downcast_ref::<h2::Error>()
            .and_then(h2::Error::reason)
            .is_some_and(|reason| {
                reason == h2::Reason::FRAME_SIZE_ERROR || reason == h2::Reason::PROTOCOL_ERROR
            })
    });
    if framing {
        return ConnectFailure::NotHttp2;
    }
    let tls_layer = chain().any(|e| {
        e.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::InvalidData)
    });
    if tls_layer {
        return ConnectFailure::ClientCertificateRefused;
    }
    ConnectFailure::Unreachable
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error with a source, as tonic's and hyper's wrap theirs.
    #[derive(Debug)]
    struct Wrapped(Box<dyn Error + Send + Sync>);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("transport error")
        }
    }

    impl Error for Wrapped {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.0)
        }
    }

    fn tls_stream_error(error: rustls::Error) -> Wrapped {
        Wrapped(Box::new(io::Error::new(io::ErrorKind::InvalidData, error)))
    }

    #[test]
    fn the_cause_is_found_by_type_under_wrappers() {
        let cases = [
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                ConnectFailure::BrokerCertificate(CertificateProblem::UnknownIssuer),
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
                ConnectFailure::BrokerCertificate(CertificateProblem::WrongName),
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::Expired),
                ConnectFailure::BrokerCertificate(CertificateProblem::OutsideValidity),
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::BadSignature),
                ConnectFailure::BrokerCertificate(CertificateProblem::Other),
            ),
            (
                rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType),
                ConnectFailure::NotTls,
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
                ConnectFailure::ClientCertificateRefused,
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::HandshakeFailure),
                ConnectFailure::Tls,
            ),
        ];
        for (error, expected) in cases {
            let label = format!("{error:?}");
            assert_eq!(classify(&tls_stream_error(error)), expected, "{label}");
        }
    }

    #[test]
    fn words_in_a_message_do_not_decide() {
        // The text of a TLS failure in an error of another kind is not one.
        let text = Wrapped(Box::new(io::Error::other(
            "invalid peer certificate: UnknownIssuer",
        )));
        assert_eq!(classify(&text), ConnectFailure::Unreachable);
        let refused = Wrapped(Box::new(io::Error::from(io::ErrorKind::ConnectionRefused)));
        assert_eq!(classify(&refused), ConnectFailure::Unreachable);
        // What h2 hands on of an alert after the handshake: the kind.
        let flattened = Wrapped(Box::new(io::Error::new(
            io::ErrorKind::InvalidData,
            "received fatal alert: CertificateRequired",
        )));
        assert_eq!(
            classify(&flattened),
            ConnectFailure::ClientCertificateRefused
        );
    }

    #[test]
    fn http2_framing_errors_mean_not_plaintext_http2() {
        let framing = Wrapped(Box::new(h2::Error::from(h2::Reason::FRAME_SIZE_ERROR)));
        assert_eq!(classify(&framing), ConnectFailure::NotHttp2);
        let refused = Wrapped(Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)));
        assert_eq!(classify(&refused), ConnectFailure::Unreachable);
    }
}
