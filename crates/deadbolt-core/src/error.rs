//! The error type of deadbolt-core: every failure names the file, field or
//! layer it is about.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A data file that is not what it claims to be.
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    /// A spec that does not parse (the message names the key).
    #[error("invalid spec: {0}")]
    Spec(String),
    /// A value out of range; `field` is the dotted key.
    #[error("invalid value for `{field}`: {message}")]
    Invalid { field: String, message: String },
    #[error("unknown layer {layer:?} (prunable layers: {available})")]
    UnknownLayer { layer: String, available: String },
    /// Input over one of the bounds of [`crate::data::DataLimits`] (image
    /// dimensions, counts, inflated or decoded bytes, classes), refused
    /// before it was allocated; `what` is the file or field, `limit` the
    /// bound's name.
    #[error("{what}: {message} (limit `{limit}`)")]
    TooLarge {
        what: String,
        limit: &'static str,
        message: String,
    },
    #[error("empty dataset: {0}")]
    EmptyDataset(String),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("cancelled")]
    Cancelled,
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<deadbolt_spec::Error> for Error {
    fn from(e: deadbolt_spec::Error) -> Self {
        match e {
            deadbolt_spec::Error::Io { path, source } => Error::Io { path, source },
            deadbolt_spec::Error::Spec(m) => Error::Spec(m),
            deadbolt_spec::Error::Invalid { field, message } => Error::Invalid { field, message },
        }
    }
}

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
    pub fn bad_file(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn checkpoint(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }
    pub fn too_large(
        what: impl Into<String>,
        limit: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Error::TooLarge {
            what: what.into(),
            limit,
            message: message.into(),
        }
    }
    /// The dotted field this error is about, when it is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}
