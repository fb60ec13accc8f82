//! The gateway's errors; each says its gRPC code ([`ServiceError`]) and
//! [`deadbolt_proto::status`] makes the status.

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
}

impl ServiceError for GatewayError {
    fn code(&self) -> Code {
        match self {
            GatewayError::Store(s) => s.code(),
            GatewayError::Stage { status, .. } => status.code(),
            GatewayError::Cancelled(_) => Code::Cancelled,
            GatewayError::BadSpec(_) => Code::FailedPrecondition,
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

/// Codes worth retrying: the stage instance (or the network) went away, or
/// the service is not up yet. (`Cancelled` too: a dying server resets its
/// streams; the driver checks whether the run itself was cancelled.)
pub fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Cancelled
    )
}
