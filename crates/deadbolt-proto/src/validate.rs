//! INVALID_ARGUMENT statuses with `google.rpc.BadRequest` field violations,
//! so clients learn which field was wrong in a machine-readable way.
//!
//! ```
//! use deadbolt_proto::validate::{invalid_argument, field_violations};
//! let status = invalid_argument("attack.rate", "1.5 is outside [0, 1]");
//! assert_eq!(status.code(), tonic::Code::InvalidArgument);
//! assert_eq!(field_violations(&status)[0].0, "attack.rate");
//! ```

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// INVALID_ARGUMENT naming one bad field.
pub fn invalid_argument(field: impl Into<String>, description: impl Into<String>) -> Status {
    let mut v = Violations::default();
    v.add(field, description);
    v.into_status()
}

/// RESOURCE_EXHAUSTED naming the field whose value costs too much (a
/// `google.rpc.BadRequest` field violation, read by [`field_violations`]
/// like an INVALID_ARGUMENT's).
pub fn resource_exhausted(field: impl Into<String>, description: impl Into<String>) -> Status {
    let mut v = Violations::default();
    v.add(field, description);
    v.into_status_with(Code::ResourceExhausted, "resource exhausted")
}

/// The (field, description) pairs carried by a status, if any.
pub fn field_violations(status: &Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|br| {
            br.field_violations
                .into_iter()
                .map(|v| (v.field, v.description))
                .collect()
        })
        .unwrap_or_default()
}

/// Collects field violations; [`Violations::check`] turns them into one
/// INVALID_ARGUMENT status.
#[derive(Debug, Default, Clone)]
pub struct Violations {
    items: Vec<FieldViolation>,
}

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) -> &mut Self {
        self.items
            .push(FieldViolation::new(field.into(), description.into()));
        self
    }

    /// Adds a violation when `value` is empty.
    pub fn non_empty(&mut self, field: &str, value: &str) -> &mut Self {
        if value.trim().is_empty() {
            self.add(field, "must not be empty");
        }
        self
    }

    /// Adds a violation when `value` is absent (an unset message field).
    pub fn present<T>(&mut self, field: &str, value: &Option<T>) -> &mut Self {
        if value.is_none() {
            self.add(field, "is required");
        }
        self
    }

    /// Adds a violation when `value` is outside `[lo, hi]` or NaN.
    pub fn in_range(&mut self, field: &str, value: f64, lo: f64, hi: f64) -> &mut Self {
        if !(lo..=hi).contains(&value) {
            self.add(field, format!("{value} is outside [{lo}, {hi}]"));
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Ok when nothing was added, else the INVALID_ARGUMENT status.
    pub fn check(self) -> Result<(), Status> {
        if self.items.is_empty() {
            Ok(())
        } else {
            Err(self.into_status())
        }
    }

    fn into_status(self) -> Status {
        self.into_status_with(Code::InvalidArgument, "invalid argument")
    }

    fn into_status_with(self, code: Code, what: &str) -> Status {
        let message = self
            .items
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; ");
        let details = ErrorDetails::with_bad_request(self.items);
        Status::with_error_details(code, format!("{what}: {message}"), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_violation_round_trips() {
        let s = invalid_argument("training.lr", "must be a positive number");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("training.lr"), "{}", s.message());
        assert_eq!(
            field_violations(&s),
            vec![(
                "training.lr".to_string(),
                "must be a positive number".to_string()
            )]
        );
    }

    #[test]
    fn details_survive_the_wire_encoding() {
        // What a client sees: the status rebuilt from its code, message and
        // grpc-status-details-bin payload.
        let s = invalid_argument("attack.rate", "1.5 is outside [0, 1]");
        let wire = Status::with_details(s.code(), s.message(), s.details().to_vec().into());
        let v = field_violations(&wire);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].0, "attack.rate");
    }

    #[test]
    fn resource_exhausted_names_its_field() {
        let s = resource_exhausted("spec.training.batch_size", "needs 40 GiB");
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(
            s.message().contains("spec.training.batch_size"),
            "{}",
            s.message()
        );
        assert_eq!(field_violations(&s)[0].0, "spec.training.batch_size");
    }

    #[test]
    fn violations_collect_several_fields() {
        let mut v = Violations::new();
        v.non_empty("run_id", " ")
            .present::<u8>("checkpoint", &None)
            .in_range("target_asr", 1.5, 0.0, 1.0)
            .in_range("max_acc_drop", f64::NAN, 0.0, 1.0)
            .in_range("ok", 0.5, 0.0, 1.0);
        let s = v.check().unwrap_err();
        let fields: Vec<String> = field_violations(&s).into_iter().map(|f| f.0).collect();
        assert_eq!(
            fields,
            ["run_id", "checkpoint", "target_asr", "max_acc_drop"]
        );
        assert!(Violations::new().check().is_ok());
        assert!(field_violations(&Status::internal("x")).is_empty());
    }
}
