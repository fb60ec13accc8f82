//! The one implementation of the repositories ([`crate::repos`]) over SQL:
//! [`SqlStore`], generic over the [`Backend`] (Postgres or SQLite); the
//! repositories' `impl` blocks are in `repos.rs`.
//!
//! - Statements come from the store's statement table
//!   ([`crate::queries`]), expanded for its dialect when it was built.
//!   A statement with time tokens is started with [`SqlStore::timed`],
//!   which binds the application's clock ([`Clock`]) as `$1`; a [`Later`]
//!   is bound for each `{later $n}`: SQLite stores those values; Postgres
//!   expands `{now}` to `now()` (the database clock, so that workers on
//!   machines with skewed clocks agree on lease expiry), leaves `$1` unused
//!   and adds the seconds of a `Later` to `now()`. A time that the caller
//!   gives (a key's expiry) is bound as an [`At`], so that SQLite stores it
//!   in the same text form.
//! - Rows decode (`sqlx::FromRow`) into the types of [`crate::rows`], the
//!   same for both backends, and convert into the records of
//!   [`crate::records`]. Ids go through [`Id`] (a native UUID on Postgres,
//!   hyphenated text on SQLite).
//! - Every fenced write goes through [`SqlStore::fenced`].

mod repos;

use std::future::Future;
use std::sync::Arc;

use sqlx::{Database, Pool};
use uuid::Uuid;

pub(crate) use crate::backend::{At, Clock, Id, Later};
use crate::backend::{Backend, Record, Tx, Q};
use crate::changes::{Change, ChangeKind, Changes};
use crate::error::{map_db, Result, StoreError};
use crate::liveness::Failpoints;
use crate::queries::{Statements, Stmt};
use crate::records::{Fence, Job, Run};
use crate::rows::{JobRow, RunRow};

/// How long after its last recorded use a key's `last_used_at` is written
/// again (so that authenticating is not a write per request).
pub(crate) const LAST_USED_PRECISION: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Rows per multi-row `INSERT` (7 binds each at most: well under SQLite's
/// 32,766 and Postgres's 65,535 bind parameters per statement).
pub(crate) const ROWS_PER_INSERT: usize = 1000;

/// The longest string that [`AccessRepo::authenticate`](crate::repos::AccessRepo::authenticate)
/// hashes; longer ones are no key.
pub(crate) const MAX_API_KEY_LEN: usize = 256;

/// The message of the failure that `lease_job` records for a job whose lease
/// expired with no attempts left (code
/// [`JobFailure::LEASE_EXPIRED_CODE`](crate::JobFailure::LEASE_EXPIRED_CODE)).
pub(crate) const LEASE_EXPIRED: &str = "lease expired with no attempts left";

/// The metadata store over one SQL backend: [`crate::PgStore`] or
/// [`crate::SqliteStore`]. Cheap to clone; clones share the pool, the
/// change channel and the test hooks.
pub struct SqlStore<DB: Database> {
    pub(crate) pool: Pool<DB>,
    changes: Changes,
    failpoints: Failpoints,
    statements: Arc<Statements>,
}

impl<DB: Database> Clone for SqlStore<DB> {
    fn clone(&self) -> Self {
        SqlStore {
            pool: self.pool.clone(),
            changes: self.changes.clone(),
            failpoints: self.failpoints.clone(),
            statements: self.statements.clone(),
        }
    }
}

impl<DB: Database> std::fmt::Debug for SqlStore<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("pool", &self.pool)
            .field("failpoints", &self.failpoints)
            .finish_non_exhaustive()
    }
}

/// All the repositories: what callers hold as `Arc<dyn MetadataStore>`.
impl<DB: Backend> crate::MetadataStore for SqlStore<DB> {}

impl<DB: Database> SqlStore<DB> {
    /// The store's test hooks (see [`crate::liveness`]).
    pub fn failpoints(&self) -> &Failpoints {
        &self.failpoints
    }

    /// The underlying pool (for ad-hoc dashboard queries and tests).
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }
}

/// The fenced writes, by the name the failpoints know them by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FencedWrite {
    RecordMetric,
    PutNeuronStats,
    PutPruningCurve,
    SetPruningChoice,
    PutScanResult,
    RecordArtifact,
    DeleteArtifact,
    AppendEvent,
}

impl FencedWrite {
    /// The name of `DEADBOLT_FAILPOINT=stop-before-commit:<write>`.
    pub fn name(self) -> &'static str {
        match self {
            FencedWrite::RecordMetric => "record_metric",
            FencedWrite::PutNeuronStats => "put_neuron_stats",
            FencedWrite::PutPruningCurve => "put_pruning_curve",
            FencedWrite::SetPruningChoice => "set_pruning_choice",
            FencedWrite::PutScanResult => "put_scan_result",
            FencedWrite::RecordArtifact => "record_artifact",
            FencedWrite::DeleteArtifact => "delete_artifact",
            FencedWrite::AppendEvent => "append_event",
        }
    }
}

// Crate-private helpers only: `Backend` stays crate-private.
#[allow(private_bounds)]
impl<DB: Backend> SqlStore<DB> {
    /// Wraps `pool` (already migrated) with the statements of its dialect.
    pub(crate) fn new(pool: Pool<DB>, failpoints: Failpoints) -> Result<Self> {
        let statements = Statements::build(DB::DIALECT).map_err(|e| {
            StoreError::Database(sqlx::Error::Configuration(
                format!("the {} statement table: {e}", DB::BACKEND).into(),
            ))
        })?;
        Ok(SqlStore {
            pool,
            changes: Changes::default(),
            failpoints,
            statements: Arc::new(statements),
        })
    }

    /// A statement of the table.
    fn q(&self, stmt: Stmt) -> Q<DB> {
        Q::new(self.statements.get(stmt))
    }

    /// A statement with time tokens: `$1` is the application's clock.
    fn timed(&self, stmt: Stmt) -> Q<DB> {
        self.q(stmt).bind(Clock::now())
    }

    /// A multi-row insert: `head`, `rows` rows of `width` placeholders,
    /// `tail` (the one statement text built per call: its length varies).
    fn multi_row(&self, head: Stmt, tail: Stmt, rows: usize, width: usize) -> Q<DB> {
        let sql = format!(
            "{}{}{}",
            self.statements.get(head).as_str(),
            values_list(rows, width),
            self.statements.get(tail).as_str()
        );
        Q::new(sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(sql)))
    }

    /// A write transaction (on SQLite: BEGIN IMMEDIATE, so that it waits on
    /// busy_timeout instead of failing with SQLITE_BUSY when it upgrades
    /// from a read).
    async fn write_tx(&self) -> Result<Tx<DB>> {
        Ok(self
            .pool
            .begin_with(self.statements.get(Stmt::begin_write))
            .await?)
    }

    /// A fenced write: in one write transaction, checks `fence` (see
    /// [`Self::check_fence`]; Postgres takes the event-order lock first for
    /// [`FencedWrite::AppendEvent`], so that a transaction holding a job
    /// row lock never waits for it), runs `write` (which hands the
    /// transaction back with its result), runs the failpoint hook of
    /// [`crate::liveness::Failpoints`] (a no-op unless a test set one) and
    /// commits.
    async fn fenced<T, F, Fut>(
        &self,
        write: FencedWrite,
        fence: Option<&Fence>,
        run_id: Uuid,
        body: F,
    ) -> Result<T>
    where
        F: FnOnce(Tx<DB>) -> Fut,
        Fut: Future<Output = Result<(Tx<DB>, T)>>,
    {
        let mut tx = self.write_tx().await?;
        if write == FencedWrite::AppendEvent {
            if let Some(lock) = DB::EVENT_LOCK {
                self.q(lock).execute(&mut tx).await?;
            }
        }
        self.check_fence(&mut tx, fence, run_id).await?;
        let (tx, out) = body(tx).await?;
        self.failpoints
            .before_fenced_commit(write.name(), fence)
            .await;
        tx.commit().await?;
        Ok(out)
    }

    /// A fenced write of statements that return nothing: the statements
    /// that `build` makes (inside the transaction, after the fence check),
    /// in order, a database error mapped as for a write to `run_id`.
    async fn fenced_execute(
        &self,
        write: FencedWrite,
        fence: Option<&Fence>,
        run_id: Uuid,
        build: impl FnOnce() -> Vec<Q<DB>>,
    ) -> Result<()> {
        self.fenced(write, fence, run_id, |mut tx| async move {
            for q in build() {
                q.execute(&mut tx)
                    .await
                    .map_err(|e| map_db(e, Some(run_id)))?;
            }
            Ok((tx, ()))
        })
        .await
    }

    /// The rows of `q` (on the pool) as `T`s.
    async fn all<R: Record, T: From<R>>(&self, q: Q<DB>) -> Result<Vec<T>> {
        let rows: Vec<R> = q.fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(T::from).collect())
    }

    /// The row of `q` (on the pool), if any, as a `T`.
    async fn opt<R: Record, T: From<R>>(&self, q: Q<DB>) -> Result<Option<T>> {
        let row: Option<R> = q.fetch_optional(&self.pool).await?;
        Ok(row.map(T::from))
    }

    /// The row of `q` (on the pool) as a `T`, or `missing()`.
    async fn one<R: Record, T: From<R>>(
        &self,
        q: Q<DB>,
        missing: impl FnOnce() -> StoreError,
    ) -> Result<T> {
        self.opt::<R, T>(q).await?.ok_or_else(missing)
    }

    /// Checks `fence` inside the write transaction `tx`, before the write:
    /// locks the job's row (`{share_lock}`: on Postgres no lease change can
    /// commit until `tx` ends; on SQLite the write transaction excludes
    /// every other writer) and requires it to be leased with the fence's
    /// token, and to belong to `run_id`.
    async fn check_fence(
        &self,
        tx: &mut Tx<DB>,
        fence: Option<&Fence>,
        run_id: Uuid,
    ) -> Result<()> {
        let Some(f) = fence else {
            return Ok(());
        };
        let row: Option<(Id, Option<Id>, String)> = self
            .q(Stmt::fence_check)
            .bind(Id(f.job_id))
            .fetch_optional(tx)
            .await?;
        match row {
            None => Err(StoreError::not_found("job", f.job_id)),
            Some((job_run, ..)) if job_run.0 != run_id => Err(StoreError::invalid(
                "fence",
                format!(
                    "job {} belongs to run {}, not run {run_id}",
                    f.job_id, job_run.0
                ),
            )),
            Some((_, token, status)) if status == "leased" && token == Some(Id(f.lease_token)) => {
                Ok(())
            }
            Some(_) => {
                tracing::warn!(
                    job_id = %f.job_id, %run_id,
                    "refused a write whose lease is no longer current"
                );
                Err(StoreError::LeaseLost { job_id: f.job_id })
            }
        }
    }

    async fn fetch_run(&self, id: Uuid) -> Result<Option<Run>> {
        self.opt::<RunRow, _>(self.q(Stmt::run_get).bind(Id(id)))
            .await
    }

    async fn fetch_job(&self, id: Uuid) -> Result<Option<Job>> {
        self.opt::<JobRow, _>(self.q(Stmt::job_get).bind(Id(id)))
            .await
    }

    /// After a fenced job update matched nothing: NotFound or LeaseLost.
    async fn lease_lost(&self, job_id: Uuid) -> StoreError {
        match self.fetch_job(job_id).await {
            Ok(Some(_)) => StoreError::LeaseLost { job_id },
            Ok(None) => StoreError::not_found("job", job_id),
            Err(e) => e,
        }
    }

    /// Tells the waiters of this process (and, on Postgres, of every
    /// process) that something about `run_id` changed.
    async fn changed(&self, run_id: Uuid, kind: ChangeKind) {
        let change = Change { run_id, kind };
        self.changes.send(change);
        if let Some(stmt) = DB::NOTIFY {
            if let Err(e) = self
                .q(stmt)
                .bind(change.payload())
                .execute(&self.pool)
                .await
            {
                tracing::warn!(%run_id, error = %e, "change notification failed");
            }
        }
    }
}

/// `$1, $2, ...`: the placeholders of `rows` rows of `width`
/// values each, as `VALUES (..), (..)`.
fn values_list(rows: usize, width: usize) -> String {
    let mut out = String::with_capacity(8 + rows * width * 7);
    out.push_str(" VALUES ");
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..width {
            if c > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&(r * width + c + 1).to_string());
        }
        out.push(')');
    }
    out.push(' ');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_list_numbers_every_placeholder() {
        assert_eq!(super::values_list(1, 2), " VALUES ($1, $2) ");
        assert_eq!(
            super::values_list(2, 3),
            " VALUES ($1, $2, $3), ($4, $5, $6) "
        );
    }
}
