//! Which gRPC codes end a stream for good. A peer retries every other code
//! with backoff: `UNAVAILABLE` (a broker restarting or draining), transport
//! errors, `RESOURCE_EXHAUSTED` (a call limit), `INTERNAL`, and so on. The
//! final ones are those a retry cannot fix without a person: a token that
//! is not accepted, a token for something else, a request the broker will
//! always refuse, and, for a publisher, another publisher taking over.

use tonic::Code;

/// Why a stream ended for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Final {
    /// `UNAUTHENTICATED`: the token is not accepted (expired, revoked key,
    /// garbled).
    Unauthenticated,
    /// `PERMISSION_DENIED`: the token is for another role, cluster or agent.
    PermissionDenied,
    /// `INVALID_ARGUMENT`, `FAILED_PRECONDITION`, `OUT_OF_RANGE`: the
    /// broker refused what was sent, and would again.
    Rejected,
    /// `ABORTED`: another publisher took the cluster over. Final for a
    /// publisher; an agent never receives it from a broker and retries it.
    TakenOver,
}

/// `Some` if a stream that ended with `code` must not be retried.
pub fn final_reason(code: Code) -> Option<Final> {
    match code {
        Code::Unauthenticated => Some(Final::Unauthenticated),
        Code::PermissionDenied => Some(Final::PermissionDenied),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            Some(Final::Rejected)
        }
        Code::Aborted => Some(Final::TakenOver),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_a_person_must_fix_is_final() {
        for code in [
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::Internal,
            Code::Unknown,
            Code::DeadlineExceeded,
            Code::Cancelled,
        ] {
            assert_eq!(final_reason(code), None, "{code:?}");
        }
        assert_eq!(
            final_reason(Code::Unauthenticated),
            Some(Final::Unauthenticated)
        );
        assert_eq!(
            final_reason(Code::PermissionDenied),
            Some(Final::PermissionDenied)
        );
        assert_eq!(final_reason(Code::OutOfRange), Some(Final::Rejected));
        assert_eq!(final_reason(Code::Aborted), Some(Final::TakenOver));
    }
}
