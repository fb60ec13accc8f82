//! The production metadata store: Postgres.
//!
//! [`PgStore`] is the shared [`SqlStore`] on Postgres: the statements are
//! those of `queries/*.sql` in this dialect. Times come from the
//! database clock (`now()`), so workers on machines with skewed clocks agree
//! on lease expiry. Leasing a job and claiming runs to drive lock the rows
//! with `FOR NO KEY UPDATE SKIP LOCKED`, so concurrent leasers (claimers)
//! never wait on or take the same row. A fenced write locks its job's row
//! `FOR SHARE` before it writes, so the job's lease cannot change hands until
//! the write commits. Event appends take an advisory lock (before the job's
//! row), so that commit order equals seq order. No transaction outlives a
//! lease: every pooled session has the timeouts of
//! [`SessionLimits`](crate::liveness::SessionLimits) (see
//! [`crate::liveness`]), so a worker paused inside a fenced write loses its
//! session and the job is leased again within about one lease.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgValueRef};
use sqlx::{Connection, Decode, Pool, Postgres};
use uuid::Uuid;

use crate::backend::{backend_io, encode_as, At, Backend, Clock, Id, Later};
use crate::changes::Changes;
use crate::error::{Result, StoreError};
use crate::liveness::{Failpoints, SessionLimits};
use crate::queries::{Dialect, Stmt};
use crate::sql::SqlStore;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

impl Backend for Postgres {
    const BACKEND: &'static str = "postgres";
    const DIALECT: Dialect = Dialect::Postgres;
    const EVENT_LOCK: Option<Stmt> = Some(Stmt::event_lock);
    const NOTIFY: Option<Stmt> = Some(Stmt::notify);

    backend_io!();

    /// One `LISTEN deadbolt_changes` connection per store (the first
    /// subscriber starts it), forwarding other processes' changes. It
    /// reconnects by itself; notifications sent while it was down are
    /// lost, which only delays waiters until their fallback poll.
    fn listen(pool: &Pool<Self>, changes: &Changes) {
        let pool = pool.clone();
        changes.listen_once(|tx| {
            let Ok(handle) = tokio::runtime::Handle::try_current() else {
                return;
            };
            handle.spawn(async move {
                loop {
                    let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!(error = %e, "change listener cannot connect");
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            continue;
                        }
                    };
                    if let Err(e) = listener.listen(crate::changes::CHANNEL).await {
                        tracing::warn!(error = %e, "change listener cannot listen");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        continue;
                    }
                    loop {
                        match listener.recv().await {
                            Ok(n) => {
                                if let Some(change) = crate::changes::Change::parse(n.payload()) {
                                    let _ = tx.send(change);
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "change listener lost its connection");
                                break;
                            }
                        }
                    }
                }
            });
        });
    }
}

/// Metadata in Postgres.
pub type PgStore = SqlStore<Postgres>;

impl PgStore {
    /// Connects to `url` (postgres://...) with the session limits of the
    /// default lease and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, SessionLimits::default()).await
    }

    /// Connects to `url` with every pooled session bounded by `limits`
    /// (see [`crate::liveness`]) and runs the migrations first, on a
    /// connection of their own without those limits.
    pub async fn connect_with(url: &str, limits: SessionLimits) -> Result<Self> {
        Self::connect_with_options(url, limits, true).await
    }

    /// [`Self::connect_with`], migrating only when `migrate` is set. With
    /// `migrate = false` (a role without DDL rights: the stage and gateway
    /// pods, see deploy/postgres/20-roles.sql) it runs no DDL and instead
    /// checks that every migration this build knows was applied, unchanged
    /// ([`Self::check_migrated`]); it fails with an error naming the first
    /// missing one otherwise.
    pub async fn connect_with_options(
        url: &str,
        limits: SessionLimits,
        migrate: bool,
    ) -> Result<Self> {
        let opts: PgConnectOptions = url.parse()?;
        let mut conn = PgConnection::connect_with(&opts).await?;
        if migrate {
            MIGRATOR.run(&mut conn).await?;
        } else {
            Self::check_migrated(&mut conn).await?;
        }
        conn.close().await?;
        // a few connections kept open: a stage call, the worker's lease
        // and a heartbeat each need one at once, and opening one on demand
        // costs a backend start (tens of ms) on the path of every stage
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .min_connections(3)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts.options(limits.pg_settings()))
            .await?;
        tracing::info!(
            migrate,
            idle_in_transaction_ms = limits.idle_in_transaction.as_millis() as u64,
            statement_ms = limits.statement.as_millis() as u64,
            lock_ms = limits.lock.as_millis() as u64,
            "postgres metadata store ready"
        );
        Self::new(pool, Failpoints::from_env())
    }

    /// Checks, without DDL, that the schema is migrated: every migration of
    /// this build is recorded in sqlx's table as applied successfully and
    /// with the checksum of this build's file. A migration recorded that
    /// this build does not know (a newer build migrated; its migrations are
    /// additive) is only logged, so a rolling upgrade's old pods keep
    /// starting.
    pub async fn check_migrated(conn: &mut PgConnection) -> Result<()> {
        let table = MIGRATOR.table_name.as_ref();
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relname = $1 AND n.nspname = ANY (current_schemas(false)))",
        )
        .bind(table)
        .fetch_one(&mut *conn)
        .await?;
        let first = MIGRATOR
            .iter()
            .find(|m| !m.migration_type.is_down_migration());
        if !exists {
            let first = first.map(|m| m.version).unwrap_or_default();
            return Err(StoreError::FailedPrecondition(format!(
                "the database is not migrated (no {table} table; first migration {first}) \
                 and this process does not migrate (migrate = false / DEADBOLT_MIGRATE=false): \
                 run the migrations first (the deadbolt-migrate Job, or a process with \
                 migrate = true as the schema owner)"
            )));
        }
        let applied: Vec<(i64, bool, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT version, success, checksum FROM {table} ORDER BY version"
        )))
        .fetch_all(&mut *conn)
        .await?;
        let applied: std::collections::BTreeMap<i64, (bool, Vec<u8>)> = applied
            .into_iter()
            .map(|(v, ok, sum)| (v, (ok, sum)))
            .collect();
        for m in MIGRATOR.iter() {
            if m.migration_type.is_down_migration() {
                continue;
            }
            match applied.get(&m.version) {
                None => {
                    return Err(StoreError::FailedPrecondition(format!(
                        "migration {} ({}) is not applied and this process does not migrate \
                         (migrate = false / DEADBOLT_MIGRATE=false): run the migrations first \
                         (the deadbolt-migrate Job)",
                        m.version, m.description
                    )))
                }
                Some((false, _)) => {
                    return Err(sqlx::migrate::MigrateError::Dirty(m.version).into())
                }
                Some((true, sum)) if sum[..] != m.checksum[..] => {
                    return Err(sqlx::migrate::MigrateError::VersionMismatch(m.version).into())
                }
                Some(_) => {}
            }
        }
        for v in applied.keys().filter(|v| !MIGRATOR.version_exists(**v)) {
            tracing::warn!(
                version = v,
                "the database has a migration this build does not know (a newer build migrated)"
            );
        }
        Ok(())
    }

    /// Wraps an existing pool (its sessions keep whatever limits the pool
    /// sets) and runs the migrations.
    pub async fn from_pool(pool: PgPool) -> Result<Self> {
        MIGRATOR.run(&pool).await?;
        tracing::info!("postgres metadata store ready");
        Self::new(pool, Failpoints::from_env())
    }
}

// `Clock` is bound as `$1` but unused: Postgres reads its own clock; a
// `Later` is the seconds to add to it.
encode_as!(Postgres:
    Id => Uuid, |id| id.0;
    Clock => DateTime<Utc>, |c| c.0;
    Later => f64, |l| l.0.as_secs_f64();
    At => DateTime<Utc>, |t| t.0;
);

impl Decode<'_, Postgres> for Id {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        Ok(Id(Decode::<Postgres>::decode(value)?))
    }
}
