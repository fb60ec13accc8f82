//! The one error type of the store.

use uuid::Uuid;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Every failure of the metadata store and the artifact store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named row or object does not exist.
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    /// The request contradicts what is stored (e.g. a reused client_request_id
    /// with a different spec).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A team's quota is used up (e.g. its runs in flight).
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// The row is not in a state that allows the change (e.g. a finished run
    /// cannot be cancelled or restarted).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The caller's lease on a job is gone: it expired and another worker took
    /// the job, or the job was completed, failed or cancelled.
    #[error("lease lost on job {job_id}")]
    LeaseLost { job_id: Uuid },
    /// The caller's drive lease on a run is gone: it expired and another
    /// driver claimed the run, or it was released.
    #[error("drive lost on run {run_id}")]
    DriveLost { run_id: Uuid },
    /// An object's bytes do not hash to the recorded sha256.
    #[error("checksum mismatch for {key}: expected sha256 {expected}, got {actual}")]
    Checksum {
        key: String,
        expected: String,
        actual: String,
    },
    /// A stored value that does not decode (e.g. a run's spec written by a
    /// version that no longer reads it).
    #[error("stored {what} of {id} does not decode: {reason}")]
    Corrupt {
        what: &'static str,
        id: String,
        reason: String,
    },
    /// An artifact name that could escape its prefix or is otherwise unusable.
    #[error("invalid artifact key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    /// A value outside its allowed set or range.
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// A store URL that names no supported backend.
    #[error("unsupported store url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("object store error: {0}")]
    ObjectStore(#[from] object_store::Error),
}

impl StoreError {
    pub fn not_found(what: &'static str, id: impl ToString) -> Self {
        StoreError::NotFound {
            what,
            id: id.to_string(),
        }
    }

    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        StoreError::Invalid {
            field,
            message: message.into(),
        }
    }

    /// True for NotFound (handy when mapping to gRPC codes).
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// Maps a foreign-key violation (the run does not exist) to NotFound, a
/// unique violation to Conflict, and passes everything else through.
pub(crate) fn map_db(err: sqlx::Error, run_id: Option<Uuid>) -> StoreError {
    match run_id {
        Some(id) => map_db_missing(err, "run", id),
        None => map_db_as(err, None),
    }
}

/// [`map_db`] for a write whose one foreign key names `what` `id` (NotFound
/// when it does not exist).
pub(crate) fn map_db_missing(
    err: sqlx::Error,
    what: &'static str,
    id: impl ToString,
) -> StoreError {
    map_db_as(err, Some((what, id.to_string())))
}

fn map_db_as(err: sqlx::Error, missing: Option<(&'static str, String)>) -> StoreError {
    if let sqlx::Error::Database(db) = &err {
        match db.kind() {
            sqlx::error::ErrorKind::ForeignKeyViolation => {
                if let Some((what, id)) = missing {
                    return StoreError::not_found(what, id);
                }
            }
            sqlx::error::ErrorKind::UniqueViolation => {
                return StoreError::Conflict(db.message().to_string());
            }
            sqlx::error::ErrorKind::CheckViolation => {
                return StoreError::invalid("row", db.message().to_string());
            }
            _ => {}
        }
    }
    StoreError::Database(err)
}

/// Each store error says its gRPC code; [`deadbolt_proto::status`] (the
/// one error-to-status function) makes the status.
impl deadbolt_proto::ServiceError for StoreError {
    fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            StoreError::NotFound { .. } => Code::NotFound,
            StoreError::Conflict(_) => Code::AlreadyExists,
            StoreError::QuotaExceeded(_) => Code::ResourceExhausted,
            StoreError::FailedPrecondition(_) => Code::FailedPrecondition,
            StoreError::LeaseLost { .. } | StoreError::DriveLost { .. } => Code::Aborted,
            StoreError::Checksum { .. } | StoreError::Corrupt { .. } => Code::DataLoss,
            StoreError::InvalidKey { .. } | StoreError::Invalid { .. } => Code::InvalidArgument,
            StoreError::InvalidUrl { .. } => Code::FailedPrecondition,
            StoreError::Database(
                sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_),
            ) => Code::Unavailable,
            StoreError::Database(_) | StoreError::Migrate(_) | StoreError::ObjectStore(_) => {
                Code::Internal
            }
        }
    }
    fn field(&self) -> Option<String> {
        match self {
            StoreError::Invalid { field, .. } => Some(field.to_string()),
            _ => None,
        }
    }
}

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> Self {
        deadbolt_proto::status(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_grpc_codes() {
        use tonic::{Code, Status};
        let id = Uuid::nil();
        let cases = [
            (StoreError::not_found("run", id), Code::NotFound),
            (StoreError::Conflict("x".into()), Code::AlreadyExists),
            (
                StoreError::QuotaExceeded("x".into()),
                Code::ResourceExhausted,
            ),
            (
                StoreError::FailedPrecondition("run x already succeeded".into()),
                Code::FailedPrecondition,
            ),
            (StoreError::LeaseLost { job_id: id }, Code::Aborted),
            (StoreError::DriveLost { run_id: id }, Code::Aborted),
            (
                StoreError::Checksum {
                    key: "k".into(),
                    expected: "a".into(),
                    actual: "b".into(),
                },
                Code::DataLoss,
            ),
            (
                StoreError::Corrupt {
                    what: "spec",
                    id: "run x".into(),
                    reason: "r".into(),
                },
                Code::DataLoss,
            ),
            (StoreError::invalid("f", "m"), Code::InvalidArgument),
            (
                StoreError::Database(sqlx::Error::PoolTimedOut),
                Code::Unavailable,
            ),
            (
                StoreError::Database(sqlx::Error::RowNotFound),
                Code::Internal,
            ),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{msg}");
            // INVALID_ARGUMENT with a field names the field first.
            assert!(s.message().ends_with(&msg), "{} / {msg}", s.message());
        }
    }
}
