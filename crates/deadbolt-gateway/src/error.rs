//! The gateway's errors; each says its gRPC code ([`ServiceError`]) and
//! [`deadbolt_proto::status`] makes the status.

use std::time::Duration;

use deadbolt_proto::ServiceError;
use deadbolt_store::StoreError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stage call failed for good (its code and field are passed on).
    #[error("stage {stage}: {}", status.message())]
    Stage { stage: String, status: Status },
    #[error("run {0} was cancelled")]
    Cancelled(uuid::Uuid),
    #[error("run spec: {0}")]
    BadSpec(String),
    /// An upload whose first message did not arrive within the request
    /// timeout.
    #[error("no upload header within {:.0} s", .0.as_secs_f64())]
    UploadHeaderLate(Duration),
    /// An upload whose bytes did not all arrive within its deadline.
    #[error("{got} of the declared {size} bytes arrived within the upload's deadline of {:.0} s (the request timeout plus 1 s per MiB)", .limit.as_secs_f64())]
    UploadLate {
        got: u64,
        size: u64,
        limit: Duration,
    },
    /// An upload over the team's quota (the message names the quota).
    #[error("{0}")]
    UploadQuota(String),
    /// The team has no upload of that name (another team's answers the
    /// same).
    #[error("this team has no upload {name}{}", .file.as_ref().map(|f| format!(" with a file {f}")).unwrap_or_default())]
    NoSuchUpload { name: String, file: Option<String> },
    /// A download of an artifact the run does not have.
    #[error("the run has no artifact {0:?}")]
    NoSuchArtifact(String),
    /// A value of ours that does not serialise: a bug.
    #[error("{what}: {message}")]
    Encoding { what: &'static str, message: String },
}

impl ServiceError for GatewayError {
    fn code(&self) -> Code {
        match self {
            GatewayError::Store(s) => s.code(),
            GatewayError::Stage { status, .. } => status.code(),
            GatewayError::Cancelled(_) => Code::Cancelled,
            GatewayError::BadSpec(_) => Code::FailedPrecondition,
            GatewayError::UploadHeaderLate(_) | GatewayError::UploadLate { .. } => {
                Code::DeadlineExceeded
            }
            GatewayError::UploadQuota(_) => Code::ResourceExhausted,
            GatewayError::NoSuchUpload { .. } | GatewayError::NoSuchArtifact(_) => Code::NotFound,
            GatewayError::Encoding { .. } => Code::Internal,
        }
    }
    fn field(&self) -> Option<String> {
        match self {
            GatewayError::Store(s) => s.field(),
            GatewayError::Stage { status, .. } => ServiceError::field(status),
            _ => None,
        }
    }
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Self {
        deadbolt_proto::status(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_errors_keep_their_codes_and_words() {
        let cases = [
            (
                GatewayError::UploadHeaderLate(Duration::from_secs(30)),
                Code::DeadlineExceeded,
                "no upload header within 30 s",
            ),
            (
                GatewayError::UploadLate {
                    got: 10,
                    size: 20,
                    limit: Duration::from_secs(31),
                },
                Code::DeadlineExceeded,
                "10 of the declared 20 bytes arrived within the upload's deadline of 31 s (the request timeout plus 1 s per MiB)",
            ),
            (
                GatewayError::UploadQuota("max_uploads_per_team: over".into()),
                Code::ResourceExhausted,
                "max_uploads_per_team: over",
            ),
            (
                GatewayError::NoSuchUpload {
                    name: "mnist".into(),
                    file: None,
                },
                Code::NotFound,
                "this team has no upload mnist",
            ),
            (
                GatewayError::NoSuchUpload {
                    name: "mnist".into(),
                    file: Some("a.gz".into()),
                },
                Code::NotFound,
                "this team has no upload mnist with a file a.gz",
            ),
            (
                GatewayError::NoSuchArtifact("x.json".into()),
                Code::NotFound,
                "the run has no artifact \"x.json\"",
            ),
            (
                GatewayError::Encoding {
                    what: "spec serializes",
                    message: "key must be a string".into(),
                },
                Code::Internal,
                "spec serializes: key must be a string",
            ),
        ];
        for (e, code, message) in cases {
            let s = Status::from(e);
            assert_eq!((s.code(), s.message()), (code, message));
            assert!(deadbolt_proto::validate::field_violations(&s).is_empty());
        }
    }
}
