//! The metadata store (all the repositories together) and the URL-based
//! constructor.

use std::sync::Arc;

use crate::error::{Result, StoreError};
use crate::repos::*;

/// Run metadata: every repository of [`crate::repos`] (runs, run claims,
/// the stage-job queue, results, artifact records, events, teams and API
/// keys, health) behind one object, so that callers hold one
/// `Arc<dyn MetadataStore>`. Its methods are the repositories' (bring them
/// into scope with `use deadbolt_store::repos::*;`).
///
/// Implemented by [`crate::PgStore`] (production) and
/// [`crate::SqliteStore`] (embedded default); both pass the same test suite.
pub trait MetadataStore:
    Health
    + RunRepo
    + RunClaimRepo
    + JobRepo
    + ResultRepo
    + ArtifactRepo
    + EventRepo
    + AccessRepo
    + std::fmt::Debug
{
}

/// Opens the metadata store named by `url` and runs its migrations:
/// `postgres://...` / `postgresql://...` → [`crate::PgStore`];
/// `sqlite://path` (or `sqlite:path`) → [`crate::SqliteStore`], a file created
/// when missing, in WAL mode with foreign keys on; `sqlite::memory:` → a
/// private in-memory database.
pub async fn connect(url: &str) -> Result<Arc<dyn MetadataStore>> {
    connect_with(url, crate::liveness::SessionLimits::default()).await
}

/// [`connect`], with the session limits of the lease its workers hold
/// ([`crate::liveness::SessionLimits::for_lease`]).
pub async fn connect_with(
    url: &str,
    limits: crate::liveness::SessionLimits,
) -> Result<Arc<dyn MetadataStore>> {
    connect_with_options(url, limits, true).await
}

/// [`connect_with`], running the Postgres migrations only when `migrate` is
/// set; otherwise the schema must already be migrated (see
/// [`crate::PgStore::connect_with_options`]): for database roles without
/// DDL rights. A SQLite store always migrates (a file has no roles).
pub async fn connect_with_options(
    url: &str,
    limits: crate::liveness::SessionLimits,
    migrate: bool,
) -> Result<Arc<dyn MetadataStore>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(
            crate::PgStore::connect_with_options(url, limits, migrate).await?,
        ))
    } else if url == "sqlite::memory:" {
        Ok(Arc::new(crate::SqliteStore::in_memory().await?))
    } else if let Some(path) = url.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        let path = path.split('?').next().unwrap_or_default();
        if path.is_empty() {
            return Err(StoreError::InvalidUrl {
                url: url.into(),
                reason: "sqlite url needs a file path (sqlite://path/to/file.db)".into(),
            });
        }
        Ok(Arc::new(
            crate::SqliteStore::open_with(std::path::Path::new(path), limits).await?,
        ))
    } else {
        Err(StoreError::InvalidUrl {
            url: url.into(),
            reason: "expected postgres://... or sqlite://path".into(),
        })
    }
}
