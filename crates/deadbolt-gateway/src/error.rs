//! The gateway's errors and their gRPC codes, in one place.

use deadbolt_store::StoreError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stage call failed for good (its status is passed on).
    #[error("stage {stage}: {status}")]
    Stage { stage: String, status: Status },
    #[error("run {0} was cancelled")]
    Cancelled(uuid::Uuid),
    #[error("run spec: {0}")]
    BadSpec(String),
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Self {
        match e {
            GatewayError::Store(s) => s.into(),
            GatewayError::Stage { stage, status } => Status::new(
                status.code(),
                format!("stage {stage}: {}", status.message()),
            ),
            GatewayError::Cancelled(id) => Status::cancelled(format!("run {id} was cancelled")),
            GatewayError::BadSpec(m) => Status::new(Code::FailedPrecondition, m),
        }
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
