//! The one place where deadbolt's errors become gRPC statuses.
//!
//! Every error type of the services (store, stage jobs, gateway, spec
//! validation) implements [`ServiceError`]: it says its own code and, when a
//! request field is at fault, the field. [`status`] is the only function
//! that builds a `Status` from an error: INVALID_ARGUMENT or
//! RESOURCE_EXHAUSTED with a field carries a `google.rpc.BadRequest` field
//! violation, everything else the code and the message. Server-side
//! failures (INTERNAL, UNAVAILABLE,
//! DATA_LOSS, UNKNOWN) are logged here once.

use tonic::{Code, Status};

use crate::validate::{invalid_argument, resource_exhausted};

/// An error that knows its gRPC code (quickwit-style).
pub trait ServiceError: std::fmt::Display {
    fn code(&self) -> Code;
    /// The dotted request field at fault, when one is.
    fn field(&self) -> Option<String> {
        None
    }
}

/// The status of an error: the one error-to-status mapping.
pub fn status<E: ServiceError + ?Sized>(e: &E) -> Status {
    let code = e.code();
    let message = e.to_string();
    if matches!(
        code,
        Code::Internal | Code::Unavailable | Code::DataLoss | Code::Unknown
    ) {
        tracing::error!(code = code_name(code), error = %message, "request failed");
    }
    match (code, e.field()) {
        (Code::InvalidArgument, Some(field)) => invalid_argument(field, message),
        (Code::ResourceExhausted, Some(field)) => resource_exhausted(field, message),
        _ => Status::new(code, message),
    }
}

/// A status that came from elsewhere (a stage service called by the
/// gateway), as an error that keeps its code.
impl ServiceError for Status {
    fn code(&self) -> Code {
        Status::code(self)
    }
    fn field(&self) -> Option<String> {
        crate::validate::field_violations(self)
            .into_iter()
            .next()
            .map(|(f, _)| f)
    }
}

const CODES: [(Code, &str); 17] = [
    (Code::Ok, "ok"),
    (Code::Cancelled, "cancelled"),
    (Code::Unknown, "unknown"),
    (Code::InvalidArgument, "invalid_argument"),
    (Code::DeadlineExceeded, "deadline_exceeded"),
    (Code::NotFound, "not_found"),
    (Code::AlreadyExists, "already_exists"),
    (Code::PermissionDenied, "permission_denied"),
    (Code::ResourceExhausted, "resource_exhausted"),
    (Code::FailedPrecondition, "failed_precondition"),
    (Code::Aborted, "aborted"),
    (Code::OutOfRange, "out_of_range"),
    (Code::Unimplemented, "unimplemented"),
    (Code::Internal, "internal"),
    (Code::Unavailable, "unavailable"),
    (Code::DataLoss, "data_loss"),
    (Code::Unauthenticated, "unauthenticated"),
];

/// The lowercase name of a code (`invalid_argument`), as job failures store it.
pub fn code_name(c: Code) -> &'static str {
    CODES
        .iter()
        .find(|(k, _)| *k == c)
        .map(|(_, n)| *n)
        .unwrap_or("unknown")
}

/// The code of a lowercase name; `Unknown` for a name no code has.
pub fn code_from_name(n: &str) -> Code {
    CODES
        .iter()
        .find(|(_, k)| *k == n)
        .map(|(c, _)| *c)
        .unwrap_or(Code::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::field_violations;

    struct E(Code, Option<&'static str>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "bad thing")
        }
    }
    impl ServiceError for E {
        fn code(&self) -> Code {
            self.0
        }
        fn field(&self) -> Option<String> {
            self.1.map(String::from)
        }
    }

    #[test]
    fn a_field_at_fault_becomes_a_field_violation() {
        let s = status(&E(Code::InvalidArgument, Some("spec.training.epochs")));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(field_violations(&s)[0].0, "spec.training.epochs");
        let s = status(&E(
            Code::ResourceExhausted,
            Some("spec.training.batch_size"),
        ));
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(field_violations(&s)[0].0, "spec.training.batch_size");
        let s = status(&E(Code::NotFound, None));
        assert_eq!((s.code(), s.message()), (Code::NotFound, "bad thing"));
        assert!(field_violations(&s).is_empty());
        // a status passed through keeps its code and field
        let again = status(&status(&E(Code::InvalidArgument, Some("run_id"))));
        assert_eq!(field_violations(&again)[0].0, "run_id");
    }

    #[test]
    fn code_names_round_trip() {
        for (c, n) in CODES {
            assert_eq!(code_from_name(code_name(c)), c);
            assert_eq!(code_name(code_from_name(n)), n);
        }
        assert_eq!(code_from_name("nonsense"), Code::Unknown);
    }
}
