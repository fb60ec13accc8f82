//! The repositories of the metadata store: one trait per entity, each with
//! a handful of methods (in the manner of InfluxDB IOx's `iox_catalog`).
//! [`crate::MetadataStore`] is all of them together, so callers keep one
//! `Arc<dyn MetadataStore>` and bring the methods into scope with
//! `use deadbolt_store::repos::*;`.
//!
//! Implemented once, over SQL ([`crate::sql::SqlStore`]), by
//! [`crate::PgStore`] (production) and [`crate::SqliteStore`] (embedded
//! default); both pass the same test suite.
//!
//! Fencing: the writes a stage job makes (metrics, neuron statistics,
//! pruning curves and choices, scan results, artifact records, events)
//! take a `fence: Option<&Fence>`. With `Some`, the write is refused with
//! [`StoreError::LeaseLost`](crate::StoreError::LeaseLost) (and changes
//! nothing) unless the job is leased with that token when the write
//! commits: the check and the write are one transaction that locks the
//! job's row first (`FOR SHARE` on Postgres; a `BEGIN IMMEDIATE` write
//! transaction on SQLite), so a lease cannot change hands between them.
//! NotFound for an unknown job; Invalid if the job belongs to another run.
//! `None` is an unfenced write (the gateway, tests).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::changes::Change;
use crate::error::Result;
use crate::records::*;

/// The store itself: which backend, whether it answers, its pool.
#[async_trait]
pub trait Health: Send + Sync {
    /// "postgres" or "sqlite".
    fn backend(&self) -> &'static str;
    /// Round-trips to the database (for health checks).
    async fn ping(&self) -> Result<()>;
    /// (connections, idle connections) of the pool.
    fn pool_stats(&self) -> (u32, u32);
}

/// Runs: creation (idempotent per team and `client_request_id`, within
/// quotas), reads, status changes, cancellation and the dashboard summary.
#[async_trait]
pub trait RunRepo: Send + Sync {
    /// Creates a run of `new.team`; the same `client_request_id` in the same
    /// team returns the existing run with `created == false` (Conflict if its
    /// name or spec differs; the message does not name the existing run).
    /// Other teams may use the same `client_request_id`. NotFound for an
    /// unknown team.
    async fn create_run(&self, new: NewRun) -> Result<(Run, bool)>;
    /// [`Self::create_run`] within the team's quota: QuotaExceeded
    /// (RESOURCE_EXHAUSTED) when `max_in_flight` of the team's runs are
    /// queued or running. Exact under concurrency (the team's submits are
    /// serialized by a lock on its row); a retry with a known
    /// `client_request_id` answers its run even at quota.
    async fn create_run_within(&self, new: NewRun, max_in_flight: i64) -> Result<(Run, bool)>;
    /// Any team's run: callers serving a team check `run.team`.
    async fn get_run(&self, id: Uuid) -> Result<Run>;
    /// The runs of `team` (of every team with None, for operators), newest
    /// first.
    async fn list_runs(&self, team: Option<&str>, limit: i64, offset: i64) -> Result<Vec<Run>>;
    /// [`Self::list_runs`] with each run's summary, pruning choices,
    /// artifacts and jobs (each as its per-run read returns it), in five
    /// queries for the whole page, whatever its size.
    async fn list_run_pages(
        &self,
        team: Option<&str>,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<RunPage>>;
    /// How many runs of `team` have one of `statuses` (0 when it is empty),
    /// for quotas.
    async fn count_runs(&self, team: &str, statuses: &[RunStatus]) -> Result<i64>;
    /// Sets the status (and error) of a run, as a compare-and-set in SQL: a
    /// finished run (succeeded, failed, cancelled) never changes, a running
    /// run does not go back to queued; anything else is allowed. A refused
    /// change is FailedPrecondition, naming the run's status.
    async fn set_run_status(
        &self,
        id: Uuid,
        status: RunStatus,
        error: Option<String>,
    ) -> Result<Run>;
    /// Marks a queued or running run cancelled, and its queued and leased
    /// jobs cancelled. Idempotent on a cancelled run; FailedPrecondition on a
    /// succeeded or failed one ("run X already succeeded").
    async fn cancel_run(&self, id: Uuid) -> Result<Run>;
    /// The run's row of the `run_summary` view.
    async fn run_summary(&self, run_id: Uuid) -> Result<RunSummary>;
}

/// The drive leases of runs: one driver (gateway replica) at a time drives
/// a run, and another takes it over after the lease expires.
#[async_trait]
pub trait RunClaimRepo: Send + Sync {
    /// Takes the drive of the run for `lease` if it is not terminal and has
    /// no driver or an expired one: returns the new drive token, or None if
    /// a driver (any driver, `driver_id` included) holds a live lease or the
    /// run is terminal. NotFound for an unknown run.
    async fn claim_run(
        &self,
        run_id: Uuid,
        driver_id: &str,
        lease: Duration,
    ) -> Result<Option<Uuid>>;
    /// Claims up to `limit` non-terminal runs without a live drive lease,
    /// oldest first, each with its own token. Concurrent claimers never
    /// claim the same run (Postgres: `FOR NO KEY UPDATE SKIP LOCKED`).
    async fn claim_runs(
        &self,
        driver_id: &str,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<(Run, Uuid)>>;
    /// Extends the drive lease; DriveLost if `token` is no longer the run's
    /// drive token (another driver claimed it after it expired, or it was
    /// released). NotFound for an unknown run.
    async fn renew_run(&self, run_id: Uuid, token: Uuid, lease: Duration) -> Result<()>;
    /// Clears the driver if `token` is current; Ok (and no change) if it is
    /// not, or the run is unknown.
    async fn release_run(&self, run_id: Uuid, token: Uuid) -> Result<()>;
    /// [`RunRepo::set_run_status`] (the same compare-and-set) that also
    /// requires `token` to be the run's current drive token, in the same
    /// statement: DriveLost if it is not (checked before the status),
    /// FailedPrecondition for a refused transition, NotFound for an unknown
    /// run.
    async fn set_run_status_fenced(
        &self,
        id: Uuid,
        token: Uuid,
        status: RunStatus,
        error: Option<String>,
    ) -> Result<Run>;
}

/// The stage-job queue: enqueue, lease with heartbeats, end an attempt.
#[async_trait]
pub trait JobRepo: Send + Sync {
    /// Idempotent per (run_id, stage): returns the existing job with
    /// `created == false`.
    async fn enqueue_job(&self, job: NewJob) -> Result<(Job, bool)>;
    /// Leases the oldest runnable job of one of `stages`: queued with
    /// `run_after <= now`, or leased with an expired lease. Increments
    /// `attempts` and sets a fresh lease token. Jobs whose lease expired with
    /// no attempts left are marked failed instead (code `unavailable`, a
    /// message saying "lease expired").
    async fn lease_job(
        &self,
        worker_id: &str,
        stages: &[String],
        lease: Duration,
    ) -> Result<Option<Job>>;
    /// When [`Self::lease_job`] may next find work among `stages` without
    /// a new job being enqueued: the earliest `run_after` of their queued
    /// jobs (a retry waiting out its backoff) or `lease_expires_at` of their
    /// leased ones (a worker that may have died), by the store's clock; None
    /// when there are neither. An idle worker sleeps until then, or until a
    /// job change wakes it.
    async fn next_lease_at(&self, stages: &[String]) -> Result<Option<DateTime<Utc>>>;
    /// Extends the lease; LeaseLost if the token is stale or the job is no
    /// longer leased.
    async fn heartbeat(
        &self,
        job_id: Uuid,
        lease_token: Uuid,
        lease: Duration,
        progress: Option<(f64, String)>,
    ) -> Result<Job>;
    /// Marks the job succeeded. Repeating it with the same token is a no-op.
    async fn complete_job(&self, job_id: Uuid, lease_token: Uuid, result: Value) -> Result<Job>;
    /// Records `error` and requeues the job after `backoff` if attempts
    /// remain, else marks it failed. Invalid if `error.code` is not a
    /// lowercase code name.
    async fn fail_job(
        &self,
        job_id: Uuid,
        lease_token: Uuid,
        error: &JobFailure,
        backoff: Duration,
    ) -> Result<Job>;
    /// Marks the job failed with `error` now, whatever attempts remain
    /// (errors that a retry cannot fix, e.g. a corrupted input artifact).
    async fn abort_job(&self, job_id: Uuid, lease_token: Uuid, error: &JobFailure) -> Result<Job>;
    /// Gives a leased job back without using up an attempt (graceful drain):
    /// the job is queued again, runnable at once, its lease cleared and
    /// `attempts` decremented. LeaseLost if the token is stale or the job is
    /// not leased; NotFound for an unknown job.
    async fn release_job(&self, job_id: Uuid, lease_token: Uuid) -> Result<Job>;
    async fn get_job(&self, id: Uuid) -> Result<Job>;
    /// Oldest first.
    async fn list_jobs(&self, run_id: Uuid) -> Result<Vec<Job>>;
    /// Runnable queued jobs per stage (for the queue gauges).
    async fn queue_stats(&self) -> Result<Vec<QueueStat>>;
}

/// What the stages find: metrics, neuron statistics, pruning curves and
/// choices, scan results. Every write is fenced (see the module docs).
#[async_trait]
pub trait ResultRepo: Send + Sync {
    /// Upsert on (run_id, stage, name, step).
    async fn record_metric(
        &self,
        fence: Option<&Fence>,
        run_id: Uuid,
        stage: &str,
        name: &str,
        step: i64,
        value: f64,
    ) -> Result<()>;
    async fn list_metrics(&self, run_id: Uuid) -> Result<Vec<Metric>>;
    /// Upsert on (run_id, layer, model, input, norm, channel), all rows in
    /// one transaction.
    async fn put_neuron_stats(
        &self,
        fence: Option<&Fence>,
        run_id: Uuid,
        rows: &[NeuronStat],
    ) -> Result<()>;
    /// Read from the `neuron_stats_v` view.
    async fn list_neuron_stats(&self, run_id: Uuid) -> Result<Vec<NeuronStat>>;
    /// Upsert on (run_id, criterion, k), all points in one transaction.
    async fn put_pruning_curve(
        &self,
        fence: Option<&Fence>,
        run_id: Uuid,
        criterion: &str,
        points: &[CurvePoint],
    ) -> Result<()>;
    /// Upsert on (run_id, criterion).
    async fn set_pruning_choice(
        &self,
        fence: Option<&Fence>,
        run_id: Uuid,
        criterion: &str,
        point: CurvePoint,
    ) -> Result<()>;
    /// Read from the `pruning_curves_v` view, by criterion then k.
    async fn list_pruning_curves(&self, run_id: Uuid) -> Result<Vec<PruningCurve>>;
    async fn list_pruning_choices(&self, run_id: Uuid) -> Result<Vec<PruningChoice>>;
    /// The run's scan verdict and repair figures. Upsert on run_id (the
    /// repair stage rewrites the row the scan stage wrote).
    async fn put_scan_result(
        &self,
        fence: Option<&Fence>,
        run_id: Uuid,
        result: &ScanResult,
    ) -> Result<()>;
    /// NotFound when the run has no scan result (yet).
    async fn get_scan_result(&self, run_id: Uuid) -> Result<ScanResult>;
}

/// The records of a run's artifacts (the bytes are in
/// [`crate::ArtifactStore`]).
#[async_trait]
pub trait ArtifactRepo: Send + Sync {
    /// Upsert on (run_id, name). Fenced.
    async fn record_artifact(&self, fence: Option<&Fence>, rec: ArtifactRecord) -> Result<()>;
    async fn get_artifact(&self, run_id: Uuid, name: &str) -> Result<ArtifactRecord>;
    async fn list_artifacts(&self, run_id: Uuid) -> Result<Vec<ArtifactRecord>>;
    /// Removes the record of artifact `name` of the run and returns it, so
    /// that the caller can delete the object
    /// ([`crate::ArtifactStore::delete`]); Ok(None) when there was none.
    /// Fenced.
    async fn delete_artifact(
        &self,
        fence: Option<&Fence>,
        run_id: Uuid,
        name: &str,
    ) -> Result<Option<ArtifactRecord>>;
}

/// Progress events and change notifications.
#[async_trait]
pub trait EventRepo: Send + Sync {
    /// Returns the event's seq, monotonic across the store. Fenced.
    async fn append_event(
        &self,
        fence: Option<&Fence>,
        run_id: Uuid,
        stage: &str,
        kind: &str,
        message: &str,
        progress: Option<f64>,
    ) -> Result<i64>;
    /// Events with seq > `after_seq`, in seq order.
    async fn list_events(&self, run_id: Uuid, after_seq: i64) -> Result<Vec<RunEvent>>;
    /// Notifications of run changes (see [`crate::changes`]): the id of a
    /// run whose events, jobs or status changed, and which of them, from
    /// any process sharing the database on Postgres, from this process on
    /// SQLite.
    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change>;
}

/// Who may do what: teams and their API keys.
#[async_trait]
pub trait AccessRepo: Send + Sync {
    /// Creates a team. Invalid (field `team`) unless the name is 1 to 64
    /// characters of `[a-z0-9-]`; Conflict if it exists (`local` always
    /// does).
    async fn create_team(&self, name: &str) -> Result<Team>;
    /// By name.
    async fn list_teams(&self) -> Result<Vec<Team>>;
    /// Creates an API key of `team` with `scopes` (at least one) that
    /// expires at `expires_at` (never with None). Returns the key's record
    /// and the key itself: `dbk_` and 64 hex digits (32 bytes from the OS
    /// RNG), shown only here; the store keeps only its sha256 and its first
    /// characters ([`ApiKey::prefix`]). NotFound for an unknown team.
    async fn create_api_key(
        &self,
        team: &str,
        name: &str,
        scopes: &[Scope],
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<(ApiKey, String)>;
    /// The keys of `team` (of every team with None), by team then age.
    async fn list_api_keys(&self, team: Option<&str>) -> Result<Vec<ApiKey>>;
    /// Revokes the key for good; idempotent (the first revocation time
    /// stays). NotFound for an unknown key.
    async fn revoke_api_key(&self, id: Uuid) -> Result<ApiKey>;
    /// Sets (or with None clears) the key's expiry. NotFound for an unknown
    /// key.
    async fn set_api_key_expiry(
        &self,
        id: Uuid,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<ApiKey>;
    /// The team and scopes of `key`, or None for an unknown, revoked or
    /// expired key. Looks the key up by its sha256 and compares the hashes
    /// in constant time; records the use in `last_used_at` (at most once a
    /// minute). Never logs the key.
    async fn authenticate(&self, key: &str) -> Result<Option<Principal>>;
}

#[cfg(test)]
mod tests {
    /// Each repository stays small: at most 12 methods per trait.
    #[test]
    fn every_repository_has_at_most_12_methods() {
        let src = include_str!("repos.rs");
        let mut traits = 0;
        for block in src.split("\npub trait ").skip(1) {
            let name = block.split([':', ' ']).next().unwrap_or_default();
            let body = block.split("\n}\n").next().unwrap_or_default();
            let methods = body.matches("    fn ").count() + body.matches("    async fn ").count();
            assert!(methods > 0, "{name}: no methods found");
            assert!(methods <= 12, "{name} has {methods} methods");
            traits += 1;
        }
        assert_eq!(traits, 8);
    }
}
