//! The one retry rule: whether another try may succeed where one failed
//! with a gRPC code. The gateway driver asks it about a stage call's status;
//! the job worker about a job attempt's error (deadbolt-runtime's
//! `JobError` constructors ask it, and the stages map their errors
//! through them).
//!
//! A code means different things depending on who said it, so the rule
//! takes the [`Origin`] as well:
//!
//! | code | [`Origin::Call`] | [`Origin::Local`] | why |
//! |---|---|---|---|
//! | UNAVAILABLE | yes | yes | the instance, the network or a dependency (the database pool) went away or is not up yet |
//! | ABORTED | yes | yes | a lost lease: another worker or driver took over, a later try sees its outcome |
//! | UNKNOWN | yes | no | a call's transport failed without a status (a reset connection) |
//! | DEADLINE_EXCEEDED | yes | no | the instance was too slow or stopped answering; our own deadlines (an upload's) are verdicts |
//! | CANCELLED | yes | no | a dying server resets its streams (and tonic answers a request timeout so); our own CANCELLED is a cancelled job or run |
//! | RESOURCE_EXHAUSTED | yes | no | from a call, the transport's concurrency limit (tonic's load shed: an overloaded instance); our own is a quota or a value over a limit, a verdict |
//! | INTERNAL | no | yes | our own INTERNAL is a dependency that failed (database, object store, disk, libtorch); from a call it may be a bug, which every try hits |
//! | anything else | no | no | a verdict about the request: every try would get it |
//!
//! What the code cannot say, the caller checks first: the gateway driver
//! retries a stage call only while the stage's job has not failed for good
//! (a job's own RESOURCE_EXHAUSTED, say a file over a limit, is the stage's
//! verdict, not a busy instance); a job error that is a verdict whatever its
//! code (a panic's INTERNAL, a spec's INVALID_ARGUMENT) is built permanent
//! (`JobError::permanent`) instead of asking this rule.

use tonic::Code;

/// Who decided the code of a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The status of a remote call (a stage RPC): the peer's handler, its
    /// server's layers or the transport between answered it, and the code
    /// alone cannot tell which.
    Call,
    /// One of this process's own errors (a store call, a job's I/O, a
    /// library): its code was chosen for its kind.
    Local,
}

/// Whether another try may succeed after a failure with `code` (see the
/// module docs for the table and the reasons).
pub fn retryable(code: Code, origin: Origin) -> bool {
    match code {
        Code::Unavailable | Code::Aborted => true,
        Code::Unknown | Code::DeadlineExceeded | Code::Cancelled | Code::ResourceExhausted => {
            origin == Origin::Call
        }
        Code::Internal => origin == Origin::Local,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table() {
        use Origin::{Call, Local};
        // (code, retried from a call, retried as our own error)
        let table = [
            (Code::Ok, false, false),
            (Code::Cancelled, true, false),
            (Code::Unknown, true, false),
            (Code::InvalidArgument, false, false),
            (Code::DeadlineExceeded, true, false),
            (Code::NotFound, false, false),
            (Code::AlreadyExists, false, false),
            (Code::PermissionDenied, false, false),
            (Code::ResourceExhausted, true, false),
            (Code::FailedPrecondition, false, false),
            (Code::Aborted, true, true),
            (Code::OutOfRange, false, false),
            (Code::Unimplemented, false, false),
            (Code::Internal, false, true),
            (Code::Unavailable, true, true),
            (Code::DataLoss, false, false),
            (Code::Unauthenticated, false, false),
        ];
        assert_eq!(table.len(), 17, "every code");
        for (code, call, local) in table {
            assert_eq!(retryable(code, Call), call, "{code:?} from a call");
            assert_eq!(retryable(code, Local), local, "{code:?} of our own");
        }
    }

    #[test]
    fn what_the_transport_answers_is_retried() {
        // tonic's load shed, its request timeout, a connection refused
        for s in [
            tonic::Status::resource_exhausted("Too many active requests for the connection"),
            tonic::Status::cancelled("Timeout expired"),
            tonic::Status::unavailable("tcp connect error"),
        ] {
            assert!(retryable(s.code(), Origin::Call), "{s:?}");
        }
    }
}
