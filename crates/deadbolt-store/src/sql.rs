//! The one implementation of [`MetadataStore`](crate::MetadataStore) over
//! SQL, shared by [`crate::PgStore`] and [`crate::SqliteStore`].
//!
//! - Rows decode (`sqlx::FromRow`) into the types of [`crate::rows`], the
//!   same for both backends, and convert into the domain types of
//!   [`crate::model`]. Ids go through [`Id`] (a native UUID on Postgres,
//!   hyphenated text on SQLite).
//! - Query text is written once, with `$n` placeholders (SQLite accepts them
//!   too). Where the dialects differ, the text holds a token that the
//!   backend's [`Dialect`] expands:
//!   - `{now}`: the current time;
//!   - `{later $n}`: the time that the [`Later`] bound as `$n` stands for;
//!   - `{each $n}`: the strings of the JSON array `$n`, as a one-column
//!     `SELECT` (for `x IN ({each $n})`);
//!   - `{each_id $n}`: the same for the ids (hyphenated UUID text) of the
//!     JSON array `$n`, for an id column (`run_id IN ({each_id $n})`);
//!   - `{skip_locked}`: lock the selected row, skipping rows that other
//!     transactions hold (nothing on SQLite, which has one writer at a time);
//!   - `{share_lock}`: lock the selected row against updates until the
//!     transaction ends, waiting for other writers (nothing on SQLite, whose
//!     write transactions exclude each other). Fenced writes take it on the
//!     job's row before they write.
//!
//!   A statement with time tokens is built with `timed`/`timed_as`, which bind
//!   the application's clock ([`Clock`]) as `$1`, and binds a [`Later`] for
//!   each `{later $n}`: SQLite stores those values; Postgres expands `{now}`
//!   to `now()` (the database clock, so that workers on machines with skewed
//!   clocks agree on lease expiry), leaves `$1` unused and adds the seconds
//!   of a `Later` to `now()`. A time that the caller gives (a key's expiry)
//!   is bound as an [`At`], so that SQLite stores it in the same text form.
//! - [`sql_store!`] expands the trait implementation for one backend, so the
//!   code is written once and type-checked against each driver.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// What differs between the SQL of the backends (see the module docs).
#[derive(Debug)]
pub(crate) struct Dialect {
    /// `{now}`.
    pub now: &'static str,
    /// `{later $n}`, where `$n` is a [`Later`]; `{}` stands for the placeholder.
    pub later: &'static str,
    /// `{each $n}`; `{}` stands for the placeholder.
    pub each: &'static str,
    /// `{each_id $n}`; `{}` stands for the placeholder.
    pub each_id: &'static str,
    /// `{skip_locked}`.
    pub skip_locked: &'static str,
    /// `{share_lock}`.
    pub share_lock: &'static str,
    /// `{update_lock}`: lock the selected row for update, waiting for other
    /// writers (nothing on SQLite, whose write transactions exclude each
    /// other).
    pub update_lock: &'static str,
    /// Starts a write transaction.
    pub begin: &'static str,
    /// Run first in the transaction that appends an event, so that commit
    /// order equals `seq` order (watchers polling `seq > n` never skip one).
    pub event_lock: Option<&'static str>,
    /// Tells other processes that a run changed (`$1`: its id as text).
    pub notify: Option<&'static str>,
}

impl Dialect {
    /// Expands the tokens of `template`.
    pub fn sql(&self, template: &'static str) -> sqlx::AssertSqlSafe<String> {
        let mut out = String::with_capacity(template.len() + 64);
        let mut rest = template;
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let len = rest[start..].find('}').expect("unclosed token in SQL");
            let token = &rest[start + 1..start + len];
            let (name, arg) = token.split_once(' ').unwrap_or((token, ""));
            match name {
                "now" => out.push_str(self.now),
                "later" => out.push_str(&self.later.replace("{}", arg)),
                "each" => out.push_str(&self.each.replace("{}", arg)),
                "each_id" => out.push_str(&self.each_id.replace("{}", arg)),
                "skip_locked" => out.push_str(self.skip_locked),
                "share_lock" => out.push_str(self.share_lock),
                "update_lock" => out.push_str(self.update_lock),
                _ => panic!("unknown SQL token {{{token}}}"),
            }
            rest = &rest[start + len + 1..];
        }
        out.push_str(rest);
        sqlx::AssertSqlSafe(out)
    }
}

/// A UUID column: native `UUID` on Postgres, hyphenated `TEXT` on SQLite
/// (the encodings live in the backend modules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Id(pub Uuid);

impl From<Id> for Uuid {
    fn from(id: Id) -> Uuid {
        id.0
    }
}

/// The application's clock, bound as `$1` of every statement with time
/// tokens (unused on Postgres).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock(pub DateTime<Utc>);

impl Clock {
    pub fn now() -> Self {
        Clock(Utc::now())
    }
}

/// A time given by the caller (not "now"): a `TIMESTAMPTZ` on Postgres, the
/// fixed-width text of the other times on SQLite.
#[derive(Debug, Clone, Copy)]
pub(crate) struct At(pub DateTime<Utc>);

/// How long after its last recorded use a key's `last_used_at` is written
/// again (so that authenticating is not a write per request).
pub(crate) const LAST_USED_PRECISION: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Rows per multi-row `INSERT` (7 binds each at most: well under SQLite's
/// 32,766 and Postgres's 65,535 bind parameters per statement).
pub(crate) const ROWS_PER_INSERT: usize = 1000;

/// The longest string that [`MetadataStore::authenticate`](crate::MetadataStore::authenticate)
/// hashes; longer ones are no key.
pub(crate) const MAX_API_KEY_LEN: usize = 256;

/// A time this long after now, bound for a `{later $n}`: on Postgres as the
/// seconds to add to `now()`, on SQLite as the time by the application's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Later(pub std::time::Duration);

/// Implements `Type<$db>` and `Encode<$db>` for each `$ty`: bound as the
/// `$target` that `$conv` makes of it (`$v`).
macro_rules! encode_as {
    ($db:ty: $($ty:ty => $target:ty, |$v:ident| $conv:expr;)+) => {$(
        impl sqlx::Type<$db> for $ty {
            fn type_info() -> <$db as sqlx::Database>::TypeInfo {
                <$target as sqlx::Type<$db>>::type_info()
            }
        }

        impl sqlx::Encode<'_, $db> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut <$db as sqlx::Database>::ArgumentBuffer,
            ) -> std::result::Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                let $v = self;
                <$target as sqlx::Encode<$db>>::encode($conv, buf)
            }
        }
    )+};
}

pub(crate) use encode_as;

/// The message of the failure that `lease_job` records for a job whose lease
/// expired with no attempts left (code
/// [`JobFailure::LEASE_EXPIRED_CODE`](crate::JobFailure::LEASE_EXPIRED_CODE)).
pub(crate) const LEASE_EXPIRED: &str = "lease expired with no attempts left";

/// Implements [`MetadataStore`](crate::MetadataStore) for `$store` (a struct
/// with a `pool: sqlx::Pool<$db>` field) with the SQL of `$dialect`.
macro_rules! sql_store {
    ($store:ident, $db:ty, $backend:literal, $dialect:expr) => {
        impl $store {
            /// A statement with time tokens: `$1` is the application's clock.
            fn timed<'q>(
                template: &'static str,
            ) -> sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments> {
                sqlx::query($dialect.sql(template)).bind($crate::sql::Clock::now())
            }

            /// [`Self::timed`], decoding rows as `O`.
            fn timed_as<'q, O>(
                template: &'static str,
            ) -> sqlx::query::QueryAs<'q, $db, O, <$db as sqlx::Database>::Arguments>
            where
                O: for<'r> sqlx::FromRow<'r, <$db as sqlx::Database>::Row>,
            {
                sqlx::query_as($dialect.sql(template)).bind($crate::sql::Clock::now())
            }

            /// A write transaction (on SQLite: BEGIN IMMEDIATE, so that it
            /// waits on busy_timeout instead of failing with SQLITE_BUSY when
            /// it upgrades from a read).
            async fn write_tx(&self) -> Result<sqlx::Transaction<'static, $db>> {
                Ok(self.pool.begin_with($dialect.begin).await?)
            }

            /// Commits a fenced write's transaction, after the test hook of
            /// [`crate::liveness::Failpoints`] (a no-op unless a test set it).
            async fn commit_fenced(
                &self,
                write: &'static str,
                fence: Option<&Fence>,
                tx: sqlx::Transaction<'static, $db>,
            ) -> Result<()> {
                self.failpoints.before_fenced_commit(write, fence).await;
                tx.commit().await?;
                Ok(())
            }

            async fn fetch_run(&self, id: Uuid) -> Result<Option<Run>> {
                let row: Option<RunRow> = sqlx::query_as("SELECT * FROM runs WHERE id = $1")
                    .bind(Id(id))
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.map(Run::from))
            }

            async fn fetch_job(&self, id: Uuid) -> Result<Option<Job>> {
                let row: Option<JobRow> = sqlx::query_as("SELECT * FROM stage_jobs WHERE id = $1")
                    .bind(Id(id))
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.map(Job::from))
            }

            /// Checks `fence` inside the write transaction `tx`, before the
            /// write: locks the job's row (`{share_lock}`: on Postgres no lease
            /// change can commit until `tx` ends; on SQLite the write
            /// transaction excludes every other writer) and requires it to be
            /// leased with the fence's token, and to belong to `run_id`.
            async fn check_fence(
                tx: &mut sqlx::Transaction<'static, $db>,
                fence: Option<&Fence>,
                run_id: Uuid,
            ) -> Result<()> {
                let Some(f) = fence else {
                    return Ok(());
                };
                let row: Option<(Id, Option<Id>, String)> = sqlx::query_as($dialect.sql(
                    "SELECT run_id, lease_token, status FROM stage_jobs WHERE id = $1 \
                     {share_lock}",
                ))
                .bind(Id(f.job_id))
                .fetch_optional(&mut **tx)
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
                    Some((_, token, status))
                        if status == "leased" && token == Some(Id(f.lease_token)) =>
                    {
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

            /// The compare-and-set of a run's status (a finished run never
            /// changes, a running run does not go back to queued), also
            /// requiring the drive token when `token` is given.
            async fn set_status(
                &self,
                id: Uuid,
                token: Option<Uuid>,
                status: RunStatus,
                error: Option<String>,
            ) -> Result<Run> {
                let row: Option<RunRow> = Self::timed_as(
                    "UPDATE runs SET status = $2, error = $3, updated_at = {now} \
                     WHERE id = $4 AND status IN ('queued', 'running') \
                       AND NOT (status = 'running' AND $2 = 'queued') \
                       AND ($5 IS NULL OR driver_token = $5) \
                     RETURNING *",
                )
                .bind(status.as_str())
                .bind(&error)
                .bind(Id(id))
                .bind(token.map(Id))
                .fetch_optional(&self.pool)
                .await?;
                if let Some(row) = row {
                    tracing::info!(run_id = %id, status = %status, "run status set");
                    self.changed(id, crate::changes::ChangeKind::Run).await;
                    return Ok(Run::from(row));
                }
                let current: Option<(String, Option<Id>)> =
                    sqlx::query_as("SELECT status, driver_token FROM runs WHERE id = $1")
                        .bind(Id(id))
                        .fetch_optional(&self.pool)
                        .await?;
                let Some((current, driver_token)) = current else {
                    return Err(StoreError::not_found("run", id));
                };
                if let Some(token) = token {
                    if driver_token != Some(Id(token)) {
                        return Err(StoreError::DriveLost { run_id: id });
                    }
                }
                Err(StoreError::FailedPrecondition(format!(
                    "run {id} is {current}; it cannot become {status}"
                )))
            }

            /// Tells the waiters of this process (and, on Postgres, of every
            /// process) that something about `run_id` changed.
            async fn changed(&self, run_id: Uuid, kind: crate::changes::ChangeKind) {
                let change = crate::changes::Change { run_id, kind };
                self.changes.send(change);
                if let Some(sql) = $dialect.notify {
                    if let Err(e) = sqlx::query(sql)
                        .bind(change.payload())
                        .execute(&self.pool)
                        .await
                    {
                        tracing::warn!(%run_id, error = %e, "change notification failed");
                    }
                }
            }

            /// After a fenced job update matched nothing: NotFound or LeaseLost.
            async fn lease_lost(&self, job_id: Uuid) -> StoreError {
                match self.fetch_job(job_id).await {
                    Ok(Some(_)) => StoreError::LeaseLost { job_id },
                    Ok(None) => StoreError::not_found("job", job_id),
                    Err(e) => e,
                }
            }

            /// Ends the leased attempt of a job with `error`: requeued after
            /// `retry_after` if given and attempts remain, else failed.
            async fn end_attempt(
                &self,
                job_id: Uuid,
                lease_token: Uuid,
                error: &JobFailure,
                retry_after: Option<Duration>,
            ) -> Result<Job> {
                error.validate()?;
                let row: Option<JobRow> = Self::timed_as(
                    "UPDATE stage_jobs SET \
                     status = CASE WHEN $2 AND attempts < max_attempts \
                       THEN 'queued' ELSE 'failed' END, \
                     error = $3, error_code = $4, error_field = $5, run_after = {later $6}, \
                     lease_token = NULL, lease_expires_at = NULL, updated_at = {now} \
                     WHERE id = $7 AND lease_token = $8 AND status = 'leased' RETURNING *",
                )
                .bind(retry_after.is_some())
                .bind(&error.message)
                .bind(&error.code)
                .bind(&error.field)
                .bind(Later(retry_after.unwrap_or_default()))
                .bind(Id(job_id))
                .bind(Id(lease_token))
                .fetch_optional(&self.pool)
                .await?;
                let Some(row) = row else {
                    return Err(self.lease_lost(job_id).await);
                };
                let j = Job::from(row);
                tracing::warn!(
                    job_id = %job_id, status = %j.status, attempt = j.attempts, %error,
                    "job attempt failed"
                );
                self.changed(j.run_id, crate::changes::ChangeKind::Job).await;
                Ok(j)
            }
        }

        #[async_trait::async_trait]
        impl $crate::metadata::MetadataStore for $store {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn ping(&self) -> Result<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            fn changes(&self) -> tokio::sync::broadcast::Receiver<crate::changes::Change> {
                self.start_listener();
                self.changes.subscribe()
            }

            async fn queue_stats(&self) -> Result<Vec<QueueStat>> {
                let rows: Vec<(String, i64, Option<chrono::DateTime<chrono::Utc>>)> =
                    Self::timed_as(
                        "SELECT stage, count(*), min(created_at) FROM stage_jobs \
                         WHERE status = 'queued' AND run_after <= {now} GROUP BY stage",
                    )
                    .fetch_all(&self.pool)
                    .await?;
                let now = chrono::Utc::now();
                Ok(rows
                    .into_iter()
                    .map(|(stage, queued, oldest)| QueueStat {
                        stage,
                        queued,
                        oldest_seconds: oldest
                            .map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0)
                            .unwrap_or(0.0),
                    })
                    .collect())
            }

            fn pool_stats(&self) -> (u32, u32) {
                (self.pool.size(), self.pool.num_idle() as u32)
            }

            async fn create_run(&self, new: NewRun) -> Result<(Run, bool)> {
                let inserted: Option<RunRow> = Self::timed_as(
                    "INSERT INTO runs (id, team, client_request_id, name, status, spec_json, \
                     created_at, updated_at) \
                     VALUES ($2, $3, $4, $5, 'queued', $6, {now}, {now}) \
                     ON CONFLICT (team, client_request_id) DO NOTHING RETURNING *",
                )
                .bind(Id(Uuid::new_v4()))
                .bind(&new.team)
                .bind(&new.client_request_id)
                .bind(&new.name)
                .bind(Json(&new.spec_json))
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| map_db_missing(e, "team", &new.team))?;
                if let Some(row) = inserted {
                    let run = Run::from(row);
                    tracing::info!(
                        run_id = %run.id, team = %run.team, name = %run.name, "created run"
                    );
                    return Ok((run, true));
                }
                let row: RunRow = sqlx::query_as(
                    "SELECT * FROM runs WHERE team = $1 AND client_request_id = $2",
                )
                .bind(&new.team)
                .bind(&new.client_request_id)
                .fetch_one(&self.pool)
                .await?;
                let run = Run::from(row);
                $crate::check_same_request(&run, &new)?;
                Ok((run, false))
            }

            async fn create_run_within(
                &self,
                new: NewRun,
                max_in_flight: i64,
            ) -> Result<(Run, bool)> {
                let mut tx = self.write_tx().await?;
                // one submit of a team at a time: the team's row stays
                // locked until this transaction ends, so the count below
                // sees every run an earlier submit created
                let team: Option<(String,)> = sqlx::query_as(
                    $dialect.sql("SELECT name FROM teams WHERE name = $1 {update_lock}"),
                )
                .bind(&new.team)
                .fetch_optional(&mut *tx)
                .await?;
                if team.is_none() {
                    return Err(StoreError::not_found("team", &new.team));
                }
                if let Some(crid) = &new.client_request_id {
                    let existing: Option<RunRow> = sqlx::query_as(
                        "SELECT * FROM runs WHERE team = $1 AND client_request_id = $2",
                    )
                    .bind(&new.team)
                    .bind(crid)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if let Some(row) = existing {
                        // an idempotent retry answers its run, at quota too
                        let run = Run::from(row);
                        $crate::check_same_request(&run, &new)?;
                        return Ok((run, false));
                    }
                }
                let (in_flight,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM runs WHERE team = $1 \
                     AND status IN ('queued', 'running')",
                )
                .bind(&new.team)
                .fetch_one(&mut *tx)
                .await?;
                if in_flight >= max_in_flight {
                    return Err(StoreError::QuotaExceeded(format!(
                        "team {} has {in_flight} runs queued or running, its quota is \
                         {max_in_flight}",
                        new.team
                    )));
                }
                let row: RunRow = Self::timed_as(
                    "INSERT INTO runs (id, team, client_request_id, name, status, spec_json, \
                     created_at, updated_at) \
                     VALUES ($2, $3, $4, $5, 'queued', $6, {now}, {now}) RETURNING *",
                )
                .bind(Id(Uuid::new_v4()))
                .bind(&new.team)
                .bind(&new.client_request_id)
                .bind(&new.name)
                .bind(Json(&new.spec_json))
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| map_db_missing(e, "team", &new.team))?;
                tx.commit().await?;
                let run = Run::from(row);
                tracing::info!(
                    run_id = %run.id, team = %run.team, name = %run.name, in_flight,
                    "created run"
                );
                Ok((run, true))
            }

            async fn get_run(&self, id: Uuid) -> Result<Run> {
                self.fetch_run(id)
                    .await?
                    .ok_or_else(|| StoreError::not_found("run", id))
            }

            async fn list_runs(
                &self,
                team: Option<&str>,
                limit: i64,
                offset: i64,
            ) -> Result<Vec<Run>> {
                // Two texts rather than `$1 IS NULL OR team = $1`, so that
                // each gets its own plan (the team's uses its index).
                let query = match team {
                    Some(team) => sqlx::query_as(
                        "SELECT * FROM runs WHERE team = $3 \
                         ORDER BY created_at DESC, id LIMIT $1 OFFSET $2",
                    )
                    .bind(limit.max(0))
                    .bind(offset.max(0))
                    .bind(team),
                    None => sqlx::query_as(
                        "SELECT * FROM runs ORDER BY created_at DESC, id LIMIT $1 OFFSET $2",
                    )
                    .bind(limit.max(0))
                    .bind(offset.max(0)),
                };
                let rows: Vec<RunRow> = query.fetch_all(&self.pool).await?;
                Ok(rows.into_iter().map(Run::from).collect())
            }

            async fn list_run_pages(
                &self,
                team: Option<&str>,
                limit: i64,
                offset: i64,
            ) -> Result<Vec<RunPage>> {
                let runs = self.list_runs(team, limit, offset).await?;
                if runs.is_empty() {
                    return Ok(Vec::new());
                }
                let ids: Vec<String> = runs.iter().map(|r| r.id.to_string()).collect();
                let summaries: Vec<SummaryRow> = sqlx::query_as(
                    $dialect.sql("SELECT * FROM run_summary WHERE id IN ({each_id $1})"),
                )
                .bind(Json(&ids))
                .fetch_all(&self.pool)
                .await?;
                let choices: Vec<ChoiceRow> = sqlx::query_as($dialect.sql(
                    "SELECT run_id, criterion, k, acc, asr, ra FROM pruning_choices \
                     WHERE run_id IN ({each_id $1}) ORDER BY criterion",
                ))
                .bind(Json(&ids))
                .fetch_all(&self.pool)
                .await?;
                let artifacts: Vec<ArtifactRow> = sqlx::query_as($dialect.sql(
                    "SELECT * FROM artifacts WHERE run_id IN ({each_id $1}) ORDER BY name",
                ))
                .bind(Json(&ids))
                .fetch_all(&self.pool)
                .await?;
                let jobs: Vec<JobRow> = sqlx::query_as($dialect.sql(
                    "SELECT * FROM stage_jobs WHERE run_id IN ({each_id $1}) \
                     ORDER BY created_at, id",
                ))
                .bind(Json(&ids))
                .fetch_all(&self.pool)
                .await?;

                let at: std::collections::HashMap<Uuid, usize> =
                    runs.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
                let mut pages: Vec<RunPage> = runs
                    .into_iter()
                    .map(|run| RunPage {
                        run,
                        summary: None,
                        choices: Vec::new(),
                        artifacts: Vec::new(),
                        jobs: Vec::new(),
                    })
                    .collect();
                // Each kind comes in its per-run order, so pushing keeps it.
                for r in summaries {
                    let r = RunSummary::from(r);
                    if let Some(&i) = at.get(&r.id) {
                        pages[i].summary = Some(r);
                    }
                }
                for r in choices {
                    if let Some(&i) = at.get(&r.run_id.0) {
                        pages[i].choices.push(r.choice);
                    }
                }
                for r in artifacts {
                    let r = ArtifactRecord::from(r);
                    if let Some(&i) = at.get(&r.run_id) {
                        pages[i].artifacts.push(r);
                    }
                }
                for r in jobs {
                    let r = Job::from(r);
                    if let Some(&i) = at.get(&r.run_id) {
                        pages[i].jobs.push(r);
                    }
                }
                Ok(pages)
            }

            async fn count_runs(&self, team: &str, statuses: &[RunStatus]) -> Result<i64> {
                if statuses.is_empty() {
                    return Ok(0);
                }
                let statuses: Vec<&str> = statuses.iter().map(RunStatus::as_str).collect();
                Ok(sqlx::query_scalar($dialect.sql(
                    "SELECT count(*) FROM runs WHERE team = $1 AND status IN ({each $2})",
                ))
                .bind(team)
                .bind(Json(&statuses))
                .fetch_one(&self.pool)
                .await?)
            }

            async fn set_run_status(
                &self,
                id: Uuid,
                status: RunStatus,
                error: Option<String>,
            ) -> Result<Run> {
                self.set_status(id, None, status, error).await
            }

            async fn cancel_run(&self, id: Uuid) -> Result<Run> {
                let mut tx = self.write_tx().await?;
                let cancelled: Option<RunRow> = Self::timed_as(
                    "UPDATE runs SET status = 'cancelled', updated_at = {now} \
                     WHERE id = $2 AND status IN ('queued', 'running') RETURNING *",
                )
                .bind(Id(id))
                .fetch_optional(&mut *tx)
                .await?;
                let run = match cancelled {
                    Some(row) => Run::from(row),
                    None => {
                        let row: Option<RunRow> = sqlx::query_as("SELECT * FROM runs WHERE id = $1")
                            .bind(Id(id))
                            .fetch_optional(&mut *tx)
                            .await?;
                        let run = Run::from(row.ok_or_else(|| StoreError::not_found("run", id))?);
                        if run.status != RunStatus::Cancelled {
                            return Err(StoreError::FailedPrecondition(format!(
                                "run {id} already {}",
                                run.status
                            )));
                        }
                        run
                    }
                };
                // Also on a repeated cancel: a job enqueued since is cancelled too.
                let jobs = Self::timed(
                    "UPDATE stage_jobs SET status = 'cancelled', updated_at = {now} \
                     WHERE run_id = $2 AND status IN ('queued', 'leased')",
                )
                .bind(Id(id))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                tracing::info!(run_id = %id, jobs = jobs.rows_affected(), "run cancelled");
                self.changed(id, crate::changes::ChangeKind::Run).await;
                Ok(run)
            }

            async fn claim_run(
                &self,
                run_id: Uuid,
                driver_id: &str,
                lease: Duration,
            ) -> Result<Option<Uuid>> {
                let token = Uuid::new_v4();
                // One statement: on Postgres a concurrent claimer waits for the
                // row and then re-checks the lease, so only one wins.
                let claimed = Self::timed(
                    "UPDATE runs SET driver_id = $2, driver_token = $3, \
                     driver_expires_at = {later $4} \
                     WHERE id = $5 AND status IN ('queued', 'running') \
                       AND (driver_token IS NULL OR driver_expires_at < {now})",
                )
                .bind(driver_id)
                .bind(Id(token))
                .bind(Later(lease))
                .bind(Id(run_id))
                .execute(&self.pool)
                .await?;
                if claimed.rows_affected() == 0 {
                    self.get_run(run_id).await?;
                    return Ok(None);
                }
                tracing::info!(%run_id, driver = driver_id, "claimed the drive of a run");
                Ok(Some(token))
            }

            async fn claim_runs(
                &self,
                driver_id: &str,
                lease: Duration,
                limit: i64,
            ) -> Result<Vec<(Run, Uuid)>> {
                if limit <= 0 {
                    return Ok(Vec::new());
                }
                let mut tx = self.write_tx().await?;
                // Locks the claimable runs, skipping those that concurrent
                // claimers hold (SQLite: the write transaction excludes them).
                let ids: Vec<(Id,)> = Self::timed_as(
                    "SELECT id FROM runs WHERE status IN ('queued', 'running') \
                       AND (driver_token IS NULL OR driver_expires_at < {now}) \
                     ORDER BY created_at, id LIMIT $2 {skip_locked}",
                )
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
                let mut out = Vec::with_capacity(ids.len());
                for (id,) in ids {
                    let token = Uuid::new_v4();
                    let row: RunRow = Self::timed_as(
                        "UPDATE runs SET driver_id = $2, driver_token = $3, \
                         driver_expires_at = {later $4} WHERE id = $5 RETURNING *",
                    )
                    .bind(driver_id)
                    .bind(Id(token))
                    .bind(Later(lease))
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?;
                    out.push((Run::from(row), token));
                }
                tx.commit().await?;
                if !out.is_empty() {
                    tracing::info!(
                        runs = out.len(), driver = driver_id, "claimed the drive of runs"
                    );
                }
                Ok(out)
            }

            async fn renew_run(&self, run_id: Uuid, token: Uuid, lease: Duration) -> Result<()> {
                let renewed = Self::timed(
                    "UPDATE runs SET driver_expires_at = {later $2} \
                     WHERE id = $3 AND driver_token = $4",
                )
                .bind(Later(lease))
                .bind(Id(run_id))
                .bind(Id(token))
                .execute(&self.pool)
                .await?;
                if renewed.rows_affected() == 0 {
                    self.get_run(run_id).await?;
                    return Err(StoreError::DriveLost { run_id });
                }
                Ok(())
            }

            async fn release_run(&self, run_id: Uuid, token: Uuid) -> Result<()> {
                let released = sqlx::query(
                    "UPDATE runs SET driver_id = NULL, driver_token = NULL, \
                     driver_expires_at = NULL WHERE id = $1 AND driver_token = $2",
                )
                .bind(Id(run_id))
                .bind(Id(token))
                .execute(&self.pool)
                .await?;
                if released.rows_affected() > 0 {
                    tracing::info!(%run_id, "released the drive of a run");
                }
                Ok(())
            }

            async fn set_run_status_fenced(
                &self,
                id: Uuid,
                token: Uuid,
                status: RunStatus,
                error: Option<String>,
            ) -> Result<Run> {
                self.set_status(id, Some(token), status, error).await
            }

            async fn enqueue_job(&self, job: NewJob) -> Result<(Job, bool)> {
                validate_job(&job)?;
                let inserted: Option<JobRow> = Self::timed_as(
                    "INSERT INTO stage_jobs (id, run_id, stage, status, payload, attempts, \
                     max_attempts, run_after, created_at, updated_at) \
                     VALUES ($2, $3, $4, 'queued', $5, 0, $6, {now}, {now}, {now}) \
                     ON CONFLICT (run_id, stage) DO NOTHING RETURNING *",
                )
                .bind(Id(Uuid::new_v4()))
                .bind(Id(job.run_id))
                .bind(&job.stage)
                .bind(Json(&job.payload))
                .bind(job.max_attempts)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| map_db(e, Some(job.run_id)))?;
                if let Some(row) = inserted {
                    let j = Job::from(row);
                    tracing::debug!(
                        job_id = %j.id, run_id = %j.run_id, stage = %j.stage, "enqueued job"
                    );
                    // idle workers wake on it
                    self.changed(j.run_id, crate::changes::ChangeKind::Job).await;
                    return Ok((j, true));
                }
                let row: JobRow =
                    sqlx::query_as("SELECT * FROM stage_jobs WHERE run_id = $1 AND stage = $2")
                        .bind(Id(job.run_id))
                        .bind(&job.stage)
                        .fetch_one(&self.pool)
                        .await?;
                Ok((Job::from(row), false))
            }

            async fn lease_job(
                &self,
                worker_id: &str,
                stages: &[String],
                lease: Duration,
            ) -> Result<Option<Job>> {
                let expired = Self::timed(
                    "UPDATE stage_jobs SET status = 'failed', updated_at = {now}, \
                     error = COALESCE(error || '; ', '') || $2, error_code = $3, \
                     error_field = NULL \
                     WHERE status = 'leased' AND lease_expires_at < {now} \
                       AND attempts >= max_attempts AND stage IN ({each $4})",
                )
                .bind($crate::sql::LEASE_EXPIRED)
                .bind(JobFailure::LEASE_EXPIRED_CODE)
                .bind(Json(stages))
                .execute(&self.pool)
                .await?;
                if expired.rows_affected() > 0 {
                    tracing::warn!(
                        jobs = expired.rows_affected(),
                        "failed jobs whose lease expired with no attempts left"
                    );
                }
                // One statement: a runnable job, locked (skipping rows other
                // leasers hold) and leased. Fair across teams: the team with
                // the fewest jobs running now goes first, and within it the
                // oldest job (one team's hundred queued runs do not starve
                // another team's one).
                let row: Option<JobRow> = Self::timed_as(
                    "UPDATE stage_jobs SET status = 'leased', attempts = attempts + 1, \
                     lease_token = $2, leased_by = $3, lease_expires_at = {later $4}, \
                     updated_at = {now} \
                     WHERE id = ( \
                       SELECT cand.id FROM stage_jobs AS cand \
                       WHERE cand.stage IN ({each $5}) \
                         AND ((cand.status = 'queued' AND cand.run_after <= {now}) \
                           OR (cand.status = 'leased' AND cand.lease_expires_at < {now} \
                               AND cand.attempts < cand.max_attempts)) \
                       ORDER BY ( \
                           SELECT count(*) FROM stage_jobs AS busy \
                           JOIN runs AS busy_run ON busy_run.id = busy.run_id \
                           WHERE busy.status = 'leased' AND busy.lease_expires_at >= {now} \
                             AND busy_run.team = \
                               (SELECT team FROM runs WHERE runs.id = cand.run_id)), \
                         cand.created_at, cand.id \
                       LIMIT 1 {skip_locked}) \
                     RETURNING *",
                )
                .bind(Id(Uuid::new_v4()))
                .bind(worker_id)
                .bind(Later(lease))
                .bind(Json(stages))
                .fetch_optional(&self.pool)
                .await?;
                let job = row.map(Job::from);
                if let Some(j) = &job {
                    tracing::info!(
                        job_id = %j.id, stage = %j.stage, attempt = j.attempts,
                        worker = worker_id, "leased job"
                    );
                }
                Ok(job)
            }

            async fn next_lease_at(
                &self,
                stages: &[String],
            ) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
                let (at,): (Option<chrono::DateTime<chrono::Utc>>,) = sqlx::query_as($dialect.sql(
                    "SELECT min(t) FROM ( \
                       SELECT run_after AS t FROM stage_jobs \
                       WHERE status = 'queued' AND stage IN ({each $1}) \
                       UNION ALL \
                       SELECT lease_expires_at AS t FROM stage_jobs \
                       WHERE status = 'leased' AND stage IN ({each $1})) AS soon",
                ))
                .bind(Json(stages))
                .fetch_one(&self.pool)
                .await?;
                Ok(at)
            }

            async fn heartbeat(
                &self,
                job_id: Uuid,
                lease_token: Uuid,
                lease: Duration,
                progress: Option<(f64, String)>,
            ) -> Result<Job> {
                let (p, msg) = progress.unzip();
                let row: Option<JobRow> = Self::timed_as(
                    "UPDATE stage_jobs SET lease_expires_at = {later $2}, updated_at = {now}, \
                     progress = COALESCE($3, progress), \
                     progress_message = COALESCE($4, progress_message) \
                     WHERE id = $5 AND lease_token = $6 AND status = 'leased' RETURNING *",
                )
                .bind(Later(lease))
                .bind(p)
                .bind(msg)
                .bind(Id(job_id))
                .bind(Id(lease_token))
                .fetch_optional(&self.pool)
                .await?;
                match row {
                    Some(row) => Ok(Job::from(row)),
                    None => Err(self.lease_lost(job_id).await),
                }
            }

            async fn complete_job(
                &self,
                job_id: Uuid,
                lease_token: Uuid,
                result: Value,
            ) -> Result<Job> {
                let row: Option<JobRow> = Self::timed_as(
                    "UPDATE stage_jobs SET status = 'succeeded', result = $2, error = NULL, \
                     error_code = NULL, error_field = NULL, progress = 1.0, \
                     lease_expires_at = NULL, updated_at = {now} \
                     WHERE id = $3 AND lease_token = $4 AND status = 'leased' RETURNING *",
                )
                .bind(Json(&result))
                .bind(Id(job_id))
                .bind(Id(lease_token))
                .fetch_optional(&self.pool)
                .await?;
                match row {
                    Some(row) => {
                        tracing::info!(job_id = %job_id, "job succeeded");
                        let j = Job::from(row);
                        self.changed(j.run_id, crate::changes::ChangeKind::Job).await;
                        Ok(j)
                    }
                    // Repeating the completion with the same token is a no-op.
                    None => match self.fetch_job(job_id).await? {
                        Some(j)
                            if j.status == JobStatus::Succeeded
                                && j.lease_token == Some(lease_token) =>
                        {
                            Ok(j)
                        }
                        Some(_) => Err(StoreError::LeaseLost { job_id }),
                        None => Err(StoreError::not_found("job", job_id)),
                    },
                }
            }

            async fn fail_job(
                &self,
                job_id: Uuid,
                lease_token: Uuid,
                error: &JobFailure,
                backoff: Duration,
            ) -> Result<Job> {
                self.end_attempt(job_id, lease_token, error, Some(backoff))
                    .await
            }

            async fn abort_job(
                &self,
                job_id: Uuid,
                lease_token: Uuid,
                error: &JobFailure,
            ) -> Result<Job> {
                self.end_attempt(job_id, lease_token, error, None).await
            }

            async fn release_job(&self, job_id: Uuid, lease_token: Uuid) -> Result<Job> {
                // The attempt that this lease counted is given back.
                let row: Option<JobRow> = Self::timed_as(
                    "UPDATE stage_jobs SET status = 'queued', attempts = attempts - 1, \
                     run_after = {now}, lease_token = NULL, leased_by = NULL, \
                     lease_expires_at = NULL, updated_at = {now} \
                     WHERE id = $2 AND lease_token = $3 AND status = 'leased' RETURNING *",
                )
                .bind(Id(job_id))
                .bind(Id(lease_token))
                .fetch_optional(&self.pool)
                .await?;
                let Some(row) = row else {
                    return Err(self.lease_lost(job_id).await);
                };
                let j = Job::from(row);
                tracing::info!(job_id = %job_id, attempts = j.attempts, "job released");
                self.changed(j.run_id, crate::changes::ChangeKind::Job).await;
                Ok(j)
            }

            async fn get_job(&self, id: Uuid) -> Result<Job> {
                self.fetch_job(id)
                    .await?
                    .ok_or_else(|| StoreError::not_found("job", id))
            }

            async fn list_jobs(&self, run_id: Uuid) -> Result<Vec<Job>> {
                let rows: Vec<JobRow> = sqlx::query_as(
                    "SELECT * FROM stage_jobs WHERE run_id = $1 ORDER BY created_at, id",
                )
                .bind(Id(run_id))
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(Job::from).collect())
            }

            async fn record_metric(
                &self,
                fence: Option<&Fence>,
                run_id: Uuid,
                stage: &str,
                name: &str,
                step: i64,
                value: f64,
            ) -> Result<()> {
                let mut tx = self.write_tx().await?;
                Self::check_fence(&mut tx, fence, run_id).await?;
                Self::timed(
                    "INSERT INTO metrics (run_id, stage, name, step, value, recorded_at) \
                     VALUES ($2, $3, $4, $5, $6, {now}) \
                     ON CONFLICT (run_id, stage, name, step) \
                     DO UPDATE SET value = excluded.value, recorded_at = excluded.recorded_at",
                )
                .bind(Id(run_id))
                .bind(stage)
                .bind(name)
                .bind(step)
                .bind(value)
                .execute(&mut *tx)
                .await
                .map_err(|e| map_db(e, Some(run_id)))?;
                self.commit_fenced("record_metric", fence, tx).await?;
                Ok(())
            }

            async fn list_metrics(&self, run_id: Uuid) -> Result<Vec<Metric>> {
                let rows: Vec<MetricRow> = sqlx::query_as(
                    "SELECT * FROM metrics WHERE run_id = $1 ORDER BY stage, name, step",
                )
                .bind(Id(run_id))
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(Metric::from).collect())
            }

            async fn put_neuron_stats(
                &self,
                fence: Option<&Fence>,
                run_id: Uuid,
                rows: &[NeuronStat],
            ) -> Result<()> {
                for r in rows {
                    r.validate()?;
                }
                // the last value of each key, as row-by-row upserts would
                // leave it (one statement cannot update a row twice)
                let mut last = std::collections::BTreeMap::new();
                for r in rows {
                    last.insert((&r.layer, &r.model, &r.input, &r.norm, r.channel), r.value);
                }
                let last: Vec<_> = last.into_iter().collect();
                let mut tx = self.write_tx().await?;
                Self::check_fence(&mut tx, fence, run_id).await?;
                // a few multi-row statements, not one round trip per row
                for chunk in last.chunks($crate::sql::ROWS_PER_INSERT) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO neuron_stats \
                         (run_id, layer, model, input, norm, channel, value) ",
                    );
                    q.push_values(chunk, |mut b, ((layer, model, input, norm, channel), value)| {
                        b.push_bind(Id(run_id))
                            .push_bind(*layer)
                            .push_bind(*model)
                            .push_bind(*input)
                            .push_bind(*norm)
                            .push_bind(*channel)
                            .push_bind(*value);
                    });
                    q.push(
                        " ON CONFLICT (run_id, layer, model, input, norm, channel) \
                         DO UPDATE SET value = excluded.value",
                    );
                    q.build()
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| map_db(e, Some(run_id)))?;
                }
                self.commit_fenced("put_neuron_stats", fence, tx).await?;
                Ok(())
            }

            async fn list_neuron_stats(&self, run_id: Uuid) -> Result<Vec<NeuronStat>> {
                Ok(sqlx::query_as(
                    "SELECT layer, model, input, norm, channel, value FROM neuron_stats_v \
                     WHERE run_id = $1 ORDER BY layer, model, input, norm, channel",
                )
                .bind(Id(run_id))
                .fetch_all(&self.pool)
                .await?)
            }

            async fn put_pruning_curve(
                &self,
                fence: Option<&Fence>,
                run_id: Uuid,
                criterion: &str,
                points: &[CurvePoint],
            ) -> Result<()> {
                let mut last = std::collections::BTreeMap::new();
                for p in points {
                    last.insert(p.k, p);
                }
                let last: Vec<_> = last.into_values().collect();
                let mut tx = self.write_tx().await?;
                Self::check_fence(&mut tx, fence, run_id).await?;
                for chunk in last.chunks($crate::sql::ROWS_PER_INSERT) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO pruning_curves (run_id, criterion, k, acc, asr, ra) ",
                    );
                    q.push_values(chunk, |mut b, p| {
                        b.push_bind(Id(run_id))
                            .push_bind(criterion)
                            .push_bind(p.k)
                            .push_bind(p.acc)
                            .push_bind(p.asr)
                            .push_bind(p.ra);
                    });
                    q.push(
                        " ON CONFLICT (run_id, criterion, k) \
                         DO UPDATE SET acc = excluded.acc, asr = excluded.asr, ra = excluded.ra",
                    );
                    q.build()
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| map_db(e, Some(run_id)))?;
                }
                self.commit_fenced("put_pruning_curve", fence, tx).await?;
                Ok(())
            }

            async fn set_pruning_choice(
                &self,
                fence: Option<&Fence>,
                run_id: Uuid,
                criterion: &str,
                point: CurvePoint,
            ) -> Result<()> {
                let mut tx = self.write_tx().await?;
                Self::check_fence(&mut tx, fence, run_id).await?;
                sqlx::query(
                    "INSERT INTO pruning_choices (run_id, criterion, k, acc, asr, ra) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (run_id, criterion) DO UPDATE SET \
                     k = excluded.k, acc = excluded.acc, asr = excluded.asr, ra = excluded.ra",
                )
                .bind(Id(run_id))
                .bind(criterion)
                .bind(point.k)
                .bind(point.acc)
                .bind(point.asr)
                .bind(point.ra)
                .execute(&mut *tx)
                .await
                .map_err(|e| map_db(e, Some(run_id)))?;
                self.commit_fenced("set_pruning_choice", fence, tx).await?;
                Ok(())
            }

            async fn list_pruning_curves(&self, run_id: Uuid) -> Result<Vec<PruningCurve>> {
                let rows: Vec<CurveRow> = sqlx::query_as(
                    "SELECT criterion, k, acc, asr, ra, chosen FROM pruning_curves_v \
                     WHERE run_id = $1 ORDER BY criterion, k",
                )
                .bind(Id(run_id))
                .fetch_all(&self.pool)
                .await?;
                let mut out = Vec::new();
                for r in rows {
                    $crate::push_curve_point(&mut out, r.criterion, r.point, r.chosen);
                }
                Ok(out)
            }

            async fn list_pruning_choices(&self, run_id: Uuid) -> Result<Vec<PruningChoice>> {
                Ok(sqlx::query_as(
                    "SELECT criterion, k, acc, asr, ra FROM pruning_choices \
                     WHERE run_id = $1 ORDER BY criterion",
                )
                .bind(Id(run_id))
                .fetch_all(&self.pool)
                .await?)
            }

            async fn record_artifact(
                &self,
                fence: Option<&Fence>,
                rec: ArtifactRecord,
            ) -> Result<()> {
                validate_sha256(&rec.sha256)?;
                let mut tx = self.write_tx().await?;
                Self::check_fence(&mut tx, fence, rec.run_id).await?;
                Self::timed(
                    "INSERT INTO artifacts \
                     (run_id, name, uri, sha256, size, content_type, created_at) \
                     VALUES ($2, $3, $4, $5, $6, $7, {now}) \
                     ON CONFLICT (run_id, name) DO UPDATE SET uri = excluded.uri, \
                     sha256 = excluded.sha256, size = excluded.size, \
                     content_type = excluded.content_type",
                )
                .bind(Id(rec.run_id))
                .bind(&rec.name)
                .bind(&rec.uri)
                .bind(rec.sha256.to_ascii_lowercase())
                .bind(rec.size as i64)
                .bind(&rec.content_type)
                .execute(&mut *tx)
                .await
                .map_err(|e| map_db(e, Some(rec.run_id)))?;
                self.commit_fenced("record_artifact", fence, tx).await?;
                Ok(())
            }

            async fn put_scan_result(
                &self,
                fence: Option<&Fence>,
                run_id: Uuid,
                r: &ScanResult,
            ) -> Result<()> {
                if !ScanResult::VERDICTS.contains(&r.verdict.as_str()) {
                    return Err(StoreError::invalid(
                        "verdict",
                        format!(
                            "{:?} is not one of {:?}",
                            r.verdict,
                            ScanResult::VERDICTS
                        ),
                    ));
                }
                let mut tx = self.write_tx().await?;
                Self::check_fence(&mut tx, fence, run_id).await?;
                Self::timed(
                    "INSERT INTO scan_results (run_id, model, verdict, suspect_label, \
                     anomaly_index, clean_acc, repaired, acc_before, asr_before, acc_after, \
                     asr_after, pruned_channels, met, updated_at) \
                     VALUES ($2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, {now}) \
                     ON CONFLICT (run_id) DO UPDATE SET model = excluded.model, \
                     verdict = excluded.verdict, suspect_label = excluded.suspect_label, \
                     anomaly_index = excluded.anomaly_index, clean_acc = excluded.clean_acc, \
                     repaired = excluded.repaired, acc_before = excluded.acc_before, \
                     asr_before = excluded.asr_before, acc_after = excluded.acc_after, \
                     asr_after = excluded.asr_after, pruned_channels = excluded.pruned_channels, \
                     met = excluded.met, updated_at = excluded.updated_at",
                )
                .bind(Id(run_id))
                .bind(&r.model)
                .bind(&r.verdict)
                .bind(r.suspect_label)
                .bind(r.anomaly_index)
                .bind(r.clean_acc)
                .bind(r.repaired)
                .bind(r.acc_before)
                .bind(r.asr_before)
                .bind(r.acc_after)
                .bind(r.asr_after)
                .bind(r.pruned_channels)
                .bind(r.met)
                .execute(&mut *tx)
                .await
                .map_err(|e| map_db(e, Some(run_id)))?;
                self.commit_fenced("put_scan_result", fence, tx).await?;
                self.changed(run_id, crate::changes::ChangeKind::Event).await;
                Ok(())
            }

            async fn get_scan_result(&self, run_id: Uuid) -> Result<ScanResult> {
                let row: Option<ScanResult> = sqlx::query_as(
                    "SELECT model, verdict, suspect_label, anomaly_index, clean_acc, repaired, \
                     acc_before, asr_before, acc_after, asr_after, pruned_channels, met \
                     FROM scan_results WHERE run_id = $1",
                )
                .bind(Id(run_id))
                .fetch_optional(&self.pool)
                .await?;
                row.ok_or_else(|| StoreError::not_found("scan result", run_id))
            }

            async fn get_artifact(&self, run_id: Uuid, name: &str) -> Result<ArtifactRecord> {
                let row: Option<ArtifactRow> =
                    sqlx::query_as("SELECT * FROM artifacts WHERE run_id = $1 AND name = $2")
                        .bind(Id(run_id))
                        .bind(name)
                        .fetch_optional(&self.pool)
                        .await?;
                row.map(ArtifactRecord::from)
                    .ok_or_else(|| StoreError::not_found("artifact", format!("{run_id}/{name}")))
            }

            async fn list_artifacts(&self, run_id: Uuid) -> Result<Vec<ArtifactRecord>> {
                let rows: Vec<ArtifactRow> =
                    sqlx::query_as("SELECT * FROM artifacts WHERE run_id = $1 ORDER BY name")
                        .bind(Id(run_id))
                        .fetch_all(&self.pool)
                        .await?;
                Ok(rows.into_iter().map(ArtifactRecord::from).collect())
            }

            async fn delete_artifact(
                &self,
                fence: Option<&Fence>,
                run_id: Uuid,
                name: &str,
            ) -> Result<Option<ArtifactRecord>> {
                let mut tx = self.write_tx().await?;
                Self::check_fence(&mut tx, fence, run_id).await?;
                let row: Option<ArtifactRow> = sqlx::query_as(
                    "DELETE FROM artifacts WHERE run_id = $1 AND name = $2 RETURNING *",
                )
                .bind(Id(run_id))
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
                self.commit_fenced("delete_artifact", fence, tx).await?;
                let rec = row.map(ArtifactRecord::from);
                if let Some(r) = &rec {
                    tracing::info!(%run_id, name, uri = %r.uri, "deleted artifact record");
                }
                Ok(rec)
            }

            async fn append_event(
                &self,
                fence: Option<&Fence>,
                run_id: Uuid,
                stage: &str,
                kind: &str,
                message: &str,
                progress: Option<f64>,
            ) -> Result<i64> {
                let mut tx = self.write_tx().await?;
                // The event lock first, then the job's row: a transaction
                // holding a job row lock never waits for the event lock.
                if let Some(lock) = $dialect.event_lock {
                    sqlx::query(lock).execute(&mut *tx).await?;
                }
                Self::check_fence(&mut tx, fence, run_id).await?;
                let (seq,): (i64,) = Self::timed_as(
                    "INSERT INTO run_events (run_id, stage, kind, message, progress, created_at) \
                     VALUES ($2, $3, $4, $5, $6, {now}) RETURNING seq",
                )
                .bind(Id(run_id))
                .bind(stage)
                .bind(kind)
                .bind(message)
                .bind(progress)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| map_db(e, Some(run_id)))?;
                self.commit_fenced("append_event", fence, tx).await?;
                self.changed(run_id, crate::changes::ChangeKind::Event).await;
                Ok(seq)
            }

            async fn list_events(&self, run_id: Uuid, after_seq: i64) -> Result<Vec<RunEvent>> {
                let rows: Vec<EventRow> = sqlx::query_as(
                    "SELECT * FROM run_events WHERE run_id = $1 AND seq > $2 ORDER BY seq",
                )
                .bind(Id(run_id))
                .bind(after_seq)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(RunEvent::from).collect())
            }

            async fn create_team(&self, name: &str) -> Result<Team> {
                validate_team_name(name)?;
                let team: Option<Team> = Self::timed_as(
                    "INSERT INTO teams (name, created_at) VALUES ($2, {now}) \
                     ON CONFLICT (name) DO NOTHING RETURNING name, created_at",
                )
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
                let team = team.ok_or_else(|| {
                    StoreError::Conflict(format!("team {name:?} already exists"))
                })?;
                tracing::info!(team = name, "created team");
                Ok(team)
            }

            async fn list_teams(&self) -> Result<Vec<Team>> {
                Ok(
                    sqlx::query_as("SELECT name, created_at FROM teams ORDER BY name")
                        .fetch_all(&self.pool)
                        .await?,
                )
            }

            async fn create_api_key(
                &self,
                team: &str,
                name: &str,
                scopes: &[Scope],
                expires_at: Option<DateTime<Utc>>,
            ) -> Result<(ApiKey, String)> {
                if name.is_empty() || name.chars().count() > 128 {
                    return Err(StoreError::invalid(
                        "api_key.name",
                        "must be 1 to 128 characters",
                    ));
                }
                if scopes.is_empty() {
                    return Err(StoreError::invalid(
                        "api_key.scopes",
                        "a key needs at least one scope",
                    ));
                }
                let key = new_api_key()?;
                let row: ApiKeyRow = Self::timed_as(
                    "INSERT INTO api_keys (id, team, name, key_hash, prefix, scopes, \
                     created_at, expires_at) \
                     VALUES ($2, $3, $4, $5, $6, $7, {now}, $8) RETURNING *",
                )
                .bind(Id(Uuid::new_v4()))
                .bind(team)
                .bind(name)
                .bind(sha256_hex(key.as_bytes()))
                .bind(&key[..API_KEY_SHOWN])
                .bind(scopes_text(scopes))
                .bind(expires_at.map(At))
                .fetch_one(&self.pool)
                .await
                .map_err(|e| map_db_missing(e, "team", team))?;
                let k = ApiKey::from(row);
                tracing::info!(
                    key_id = %k.id, team, name, prefix = %k.prefix, "created api key"
                );
                Ok((k, key))
            }

            async fn list_api_keys(&self, team: Option<&str>) -> Result<Vec<ApiKey>> {
                let rows: Vec<ApiKeyRow> = sqlx::query_as(
                    "SELECT * FROM api_keys WHERE ($1 IS NULL OR team = $1) \
                     ORDER BY team, created_at, id",
                )
                .bind(team)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(ApiKey::from).collect())
            }

            async fn revoke_api_key(&self, id: Uuid) -> Result<ApiKey> {
                let row: Option<ApiKeyRow> = Self::timed_as(
                    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, {now}) \
                     WHERE id = $2 RETURNING *",
                )
                .bind(Id(id))
                .fetch_optional(&self.pool)
                .await?;
                let k = ApiKey::from(row.ok_or_else(|| StoreError::not_found("api key", id))?);
                tracing::info!(key_id = %id, team = %k.team, "revoked api key");
                Ok(k)
            }

            async fn set_api_key_expiry(
                &self,
                id: Uuid,
                expires_at: Option<DateTime<Utc>>,
            ) -> Result<ApiKey> {
                let row: Option<ApiKeyRow> =
                    sqlx::query_as("UPDATE api_keys SET expires_at = $1 WHERE id = $2 RETURNING *")
                        .bind(expires_at.map(At))
                        .bind(Id(id))
                        .fetch_optional(&self.pool)
                        .await?;
                let k = ApiKey::from(row.ok_or_else(|| StoreError::not_found("api key", id))?);
                tracing::info!(key_id = %id, team = %k.team, expires_at = ?k.expires_at, "set api key expiry");
                Ok(k)
            }

            async fn authenticate(&self, key: &str) -> Result<Option<Principal>> {
                if key.is_empty() || key.len() > $crate::sql::MAX_API_KEY_LEN {
                    return Ok(None);
                }
                let hash = sha256_hex(key.as_bytes());
                let row: Option<ApiKeyRow> = Self::timed_as(
                    "SELECT * FROM api_keys WHERE key_hash = $2 AND revoked_at IS NULL \
                     AND (expires_at IS NULL OR expires_at > {now})",
                )
                .bind(&hash)
                .fetch_optional(&self.pool)
                .await?;
                let Some(row) = row else {
                    return Ok(None);
                };
                if !constant_time_eq(row.key_hash.as_bytes(), hash.as_bytes()) {
                    return Ok(None);
                }
                let k = ApiKey::from(row);
                let stale = k.last_used_at.is_none_or(|t| {
                    Utc::now().signed_duration_since(t) >= $crate::sql::LAST_USED_PRECISION
                });
                if stale {
                    Self::timed("UPDATE api_keys SET last_used_at = {now} WHERE id = $2")
                        .bind(Id(k.id))
                        .execute(&self.pool)
                        .await?;
                }
                Ok(Some(Principal {
                    team: k.team,
                    key_id: k.id,
                    key_name: k.name,
                    scopes: k.scopes,
                }))
            }

            async fn run_summary(&self, run_id: Uuid) -> Result<RunSummary> {
                let row: Option<SummaryRow> =
                    sqlx::query_as("SELECT * FROM run_summary WHERE id = $1")
                        .bind(Id(run_id))
                        .fetch_optional(&self.pool)
                        .await?;
                row.map(RunSummary::from)
                    .ok_or_else(|| StoreError::not_found("run", run_id))
            }
        }
    };
}

pub(crate) use sql_store;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialect_expands_tokens() {
        let d = Dialect {
            now: "NOW",
            later: "LATER({})",
            each: "EACH({})",
            each_id: "IDS({})",
            skip_locked: "SKIP",
            share_lock: "SHARE",
            update_lock: "UPDATE",
            begin: "BEGIN",
            event_lock: None,
            notify: None,
        };
        let sql = d.sql("a = {now}, b = {later $3} WHERE x IN ({each $4}) {skip_locked}");
        assert_eq!(sql.0, "a = NOW, b = LATER($3) WHERE x IN (EACH($4)) SKIP");
        assert_eq!(d.sql("SELECT 1 {share_lock}").0, "SELECT 1 SHARE");
        assert_eq!(d.sql("SELECT 1 {update_lock}").0, "SELECT 1 UPDATE");
        assert_eq!(d.sql("id IN ({each_id $1})").0, "id IN (IDS($1))");
        assert_eq!(d.sql("SELECT 1").0, "SELECT 1");
    }
}
