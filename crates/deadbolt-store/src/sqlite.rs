//! The embedded metadata store: one SQLite file in WAL mode.
//!
//! [`SqliteStore`] is the shared [`SqlStore`] on SQLite: the statements
//! are those of `queries/*.sql` in this dialect. Ids are stored as
//! hyphenated UUID text and times as fixed-width RFC 3339 UTC text
//! (`YYYY-MM-DDTHH:MM:SS.ffffffZ`), so times compare correctly as text; "now"
//! and "later" come from the application's clock. SQLite has one writer at a time: the leasing
//! `UPDATE ... WHERE id = (SELECT ... LIMIT 1) RETURNING *` takes the write
//! lock when it starts, so two leasers can never pick the same job, and
//! multi-statement writes (fenced writes, which check the job's lease first,
//! and run claims) use `BEGIN IMMEDIATE`.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use sqlx::error::BoxDynError;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous, SqliteValueRef,
};
use sqlx::{Decode, Pool, Sqlite};
use uuid::Uuid;

use crate::backend::{backend_io, encode_as, At, Backend, Clock, Id, Later};
use crate::changes::Changes;
use crate::error::{Result, StoreError};
use crate::liveness::{Failpoints, SessionLimits};
use crate::queries::{Dialect, Stmt};
use crate::sql::SqlStore;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

impl Backend for Sqlite {
    const BACKEND: &'static str = "sqlite";
    const DIALECT: Dialect = Dialect::Sqlite;
    const EVENT_LOCK: Option<Stmt> = None;
    const NOTIFY: Option<Stmt> = None;

    backend_io!();

    /// Changes reach only this process's subscribers (the embedded store
    /// runs every service in one process).
    fn listen(_pool: &Pool<Self>, _changes: &Changes) {}
}

/// Metadata in a SQLite file (the embedded default).
pub type SqliteStore = SqlStore<Sqlite>;

impl SqliteStore {
    /// Opens (creating when missing) the SQLite file at `path` and migrates
    /// it, with the busy timeout of the default lease.
    pub async fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, SessionLimits::default()).await
    }

    /// [`Self::open`], with a writer waiting on another at most
    /// `limits.busy` (see [`crate::liveness`]).
    pub async fn open_with(path: &Path, limits: SessionLimits) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Database(sqlx::Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("creating {}: {e}", dir.display()),
                )))
            })?;
        }
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(limits.busy);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await?;
        tracing::info!(path = %path.display(), "sqlite metadata store ready");
        Self::new(pool, Failpoints::from_env())
    }

    /// A private in-memory database (one connection, gone when dropped), for
    /// tests of code that needs a metadata store.
    pub async fn in_memory() -> Result<Self> {
        let opts = SqliteConnectOptions::new()
            .in_memory(true)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .min_connections(1)
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await?;
        Self::new(pool, Failpoints::default())
    }
}

encode_as!(Sqlite:
    Id => String, |id| id.0.hyphenated().to_string();
    Clock => String, |c| time_text(c.0);
    Later => String, |l| time_text(later(l.0));
    At => String, |t| time_text(t.0);
);

impl Decode<'_, Sqlite> for Id {
    fn decode(value: SqliteValueRef<'_>) -> Result<Self, BoxDynError> {
        Ok(Id(Uuid::parse_str(Decode::<Sqlite>::decode(value)?)?))
    }
}

/// Times as fixed-width RFC 3339 UTC text (`YYYY-MM-DDTHH:MM:SS.ffffffZ`),
/// so that they compare correctly as text; years past 9999 are clamped.
fn time_text(t: DateTime<Utc>) -> String {
    if t.year() > 9999 {
        return "9999-12-31T23:59:59.999999Z".into();
    }
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// `d` after now, by the application's clock.
fn later(d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| Utc::now().checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}
