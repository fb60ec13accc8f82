//! The records of the metadata store: runs, stage jobs and their leases,
//! results, artifacts, events, teams and API keys (the domain types the
//! repositories of [`crate::repos`] read and write; not models = networks,
//! which live in deadbolt-core).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::error::{Result, StoreError};

/// Metric names that the `run_summary` view reads (any stage; the value at
/// the highest step wins).
pub mod metric_names {
    pub const CLEAN_ACC: &str = "clean_acc";
    pub const BACKDOORED_ACC: &str = "backdoored_acc";
    pub const BACKDOORED_ASR: &str = "backdoored_asr";
}

/// Criterion whose chosen point the `run_summary` view reports.
pub const HEADLINE_CRITERION: &str = "linf";

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident, $field:literal { $($variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(&self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = StoreError;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($s => Ok($name::$variant),)+
                    other => Err(StoreError::invalid($field, format!("unknown value {other:?}"))),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = StoreError;
            fn try_from(s: String) -> Result<Self> {
                s.parse()
            }
        }
    };
}

string_enum!(
    /// Lifecycle of a run.
    RunStatus, "run.status" {
        Queued => "queued",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Cancelled => "cancelled",
    }
);

impl RunStatus {
    /// Succeeded, failed and cancelled runs do not change any more.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled
        )
    }
}

string_enum!(
    /// Lifecycle of a stage job.
    JobStatus, "job.status" {
        Queued => "queued",
        Leased => "leased",
        Succeeded => "succeeded",
        Failed => "failed",
        Cancelled => "cancelled",
    }
);

/// The runnable queued jobs of one stage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueStat {
    pub stage: String,
    pub queued: i64,
    /// Age of the oldest of them (0 when none).
    pub oldest_seconds: f64,
}

/// A run to create. `client_request_id` makes creation idempotent within
/// the team.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRun {
    /// The team that owns the run (it must exist; `local` always does).
    pub team: String,
    pub client_request_id: Option<String>,
    pub name: String,
    pub spec_json: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Run {
    pub id: Uuid,
    /// The team that owns the run.
    pub team: String,
    pub client_request_id: Option<String>,
    pub name: String,
    pub status: RunStatus,
    pub error: Option<String>,
    pub spec_json: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The driver (gateway replica) that holds or last held the drive lease
    /// of the run, if any (see `RunClaimRepo::claim_run`).
    pub driver_id: Option<String>,
    /// When that drive lease expires (or expired); None when released.
    pub driver_expires_at: Option<DateTime<Utc>>,
}

impl Run {
    /// The run's spec, typed: the one place a stored spec is decoded
    /// ([`deadbolt_spec::RunSpec::from_stored`]); one that does not decode
    /// is [`StoreError::Corrupt`] (DATA_LOSS).
    pub fn spec(&self) -> crate::Result<deadbolt_spec::RunSpec> {
        deadbolt_spec::RunSpec::from_stored(&self.spec_json).map_err(|e| {
            crate::StoreError::Corrupt {
                what: "spec",
                id: format!("run {}", self.id),
                reason: e.to_string(),
            }
        })
    }
}

/// A run with everything a listing shows of it, read for a whole page at
/// once (see `RunRepo::list_run_pages`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunPage {
    pub run: Run,
    /// The run's row of the `run_summary` view.
    pub summary: Option<RunSummary>,
    /// As `list_pruning_choices`: by criterion.
    pub choices: Vec<PruningChoice>,
    /// As `list_artifacts`: by name.
    pub artifacts: Vec<ArtifactRecord>,
    /// As `list_jobs`: oldest first.
    pub jobs: Vec<Job>,
}

/// The team that every store has: the embedded `deadbolt experiment` runs
/// as it, and runs and keys made before teams existed belong to it.
pub const LOCAL_TEAM: &str = "local";

/// A team: the owner of runs and API keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Team {
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// Checks a team name: 1 to 64 characters of `[a-z0-9-]`.
pub fn validate_team_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 64 {
        return Err(StoreError::invalid(
            "team",
            format!("{} characters (expected 1 to 64)", name.chars().count()),
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(StoreError::invalid(
            "team",
            format!("{name:?} (expected only a-z, 0-9 and -)"),
        ));
    }
    Ok(())
}

string_enum!(
    /// What an API key may do. `admin` implies every scope.
    Scope, "api_key.scopes" {
        Submit => "submit",
        Read => "read",
        Admin => "admin",
    }
);

/// An API key as listed: never the key itself, which is shown only once,
/// when it is created, and stored only as its sha256.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiKey {
    pub id: Uuid,
    pub team: String,
    pub name: String,
    /// Distinct, in the order of [`Scope::ALL`].
    pub scopes: Vec<Scope>,
    /// The first characters of the key (not secret), for operators to tell
    /// keys apart; empty for keys made before teams existed.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// When the key last authenticated (updated at most once a minute).
    pub last_used_at: Option<DateTime<Utc>>,
}

/// Who a request comes from: the team and key that an API key authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Principal {
    pub team: String,
    pub key_id: Uuid,
    pub key_name: String,
    pub scopes: Vec<Scope>,
}

impl Principal {
    /// Whether the key has scope `s` (`admin` implies every scope).
    pub fn has(&self, s: Scope) -> bool {
        self.scopes.iter().any(|&k| k == s || k == Scope::Admin)
    }
}

/// Scopes in the order of [`Scope::ALL`], each once.
pub(crate) fn normalize_scopes(scopes: &[Scope]) -> Vec<Scope> {
    Scope::ALL
        .iter()
        .copied()
        .filter(|s| scopes.contains(s))
        .collect()
}

/// The scopes as stored: space-separated.
pub(crate) fn scopes_text(scopes: &[Scope]) -> String {
    normalize_scopes(scopes)
        .iter()
        .map(Scope::as_str)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A stage job to enqueue; one per (run_id, stage).
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub run_id: Uuid,
    pub stage: String,
    pub payload: Value,
    pub max_attempts: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub id: Uuid,
    pub run_id: Uuid,
    pub stage: String,
    pub status: JobStatus,
    pub payload: Value,
    pub result: Option<Value>,
    /// Why the last attempt failed (kept while the job waits for a retry).
    pub error: Option<JobFailure>,
    /// Leases taken so far (the current one included).
    pub attempts: i32,
    pub max_attempts: i32,
    pub lease_token: Option<Uuid>,
    pub leased_by: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub run_after: DateTime<Utc>,
    pub progress: Option<f64>,
    pub progress_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Job {
    /// The fence of the job's current lease (None unless leased).
    pub fn fence(&self) -> Option<Fence> {
        match (self.status, self.lease_token) {
            (JobStatus::Leased, Some(lease_token)) => Some(Fence {
                job_id: self.id,
                lease_token,
            }),
            _ => None,
        }
    }
}

/// The lease a write of a stage job is made under. The store refuses a
/// fenced write ([`StoreError::LeaseLost`]) unless the job is leased with
/// this token at the moment of the write (checked in the same transaction,
/// with the job's row locked), so a worker whose lease expired and was taken
/// over can never overwrite the new holder's rows. A fenced write must be to
/// the job's own run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fence {
    pub job_id: Uuid,
    pub lease_token: Uuid,
}

/// Why a job attempt failed, as structured data (never as text to parse back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFailure {
    /// A lowercase gRPC code name: `invalid_argument`, `data_loss`,
    /// `internal`, `unavailable`, `cancelled`, `failed_precondition`,
    /// `aborted`, ...
    pub code: String,
    pub message: String,
    /// The request or spec field at fault, when there is one.
    pub field: Option<String>,
}

impl JobFailure {
    /// The code that a job whose lease expired with no attempts left fails with.
    pub const LEASE_EXPIRED_CODE: &'static str = "unavailable";

    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        JobFailure {
            code: code.into(),
            message: message.into(),
            field: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.code.is_empty()
            || !self
                .code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            return Err(StoreError::invalid(
                "job_failure.code",
                format!("{:?} is not a lowercase gRPC code name", self.code),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for JobFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(field) = &self.field {
            write!(f, " (field {field})")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metric {
    pub run_id: Uuid,
    pub stage: String,
    pub name: String,
    pub step: i64,
    pub value: f64,
}

/// One channel's statistic in one of the paper's four settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct NeuronStat {
    pub layer: String,
    /// "clean" or "backdoored".
    pub model: String,
    /// "clean" or "triggered".
    pub input: String,
    /// "l1", "l2", "linf" or "mean".
    pub norm: String,
    pub channel: i32,
    pub value: f64,
}

impl NeuronStat {
    pub(crate) fn validate(&self) -> Result<()> {
        if !matches!(self.model.as_str(), "clean" | "backdoored") {
            return Err(StoreError::invalid(
                "neuron_stat.model",
                format!("{:?} (expected clean or backdoored)", self.model),
            ));
        }
        if !matches!(self.input.as_str(), "clean" | "triggered") {
            return Err(StoreError::invalid(
                "neuron_stat.input",
                format!("{:?} (expected clean or triggered)", self.input),
            ));
        }
        if !matches!(self.norm.as_str(), "l1" | "l2" | "linf" | "mean") {
            return Err(StoreError::invalid(
                "neuron_stat.norm",
                format!("{:?} (expected l1, l2, linf or mean)", self.norm),
            ));
        }
        Ok(())
    }
}

/// One point of a pruning sweep: `k` channels pruned.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct CurvePoint {
    pub k: i64,
    pub acc: f64,
    pub asr: f64,
    pub ra: f64,
}

/// A criterion's sweep, points ordered by k, read from `pruning_curves_v`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PruningCurve {
    pub criterion: String,
    pub points: Vec<CurvePoint>,
    /// k of the chosen operating point, when it lies on the curve.
    pub chosen_k: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct PruningChoice {
    pub criterion: String,
    #[sqlx(flatten)]
    pub point: CurvePoint,
}

/// The verdict on a model a team brought (a scan run), and when the run
/// repaired it, the figures before and after (on the held-out part of the
/// clean data; ASR with the synthetic trigger). One row per run; the
/// `scan_summary` view joins it with its run for dashboards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ScanResult {
    /// The model's upload name.
    pub model: String,
    /// `backdoored`, `clean` or `inconclusive`.
    pub verdict: String,
    pub suspect_label: Option<i64>,
    pub anomaly_index: Option<f64>,
    /// The model's accuracy on the clean data the scan used.
    pub clean_acc: f64,
    pub repaired: bool,
    pub acc_before: Option<f64>,
    pub asr_before: Option<f64>,
    pub acc_after: Option<f64>,
    pub asr_after: Option<f64>,
    pub pruned_channels: Option<i64>,
    /// Whether the repair met its budget (None for a scan without repair).
    pub met: Option<bool>,
}

impl ScanResult {
    pub const VERDICTS: [&'static str; 3] = ["backdoored", "clean", "inconclusive"];
}

/// An artifact as recorded in the metadata store (the checksum is the truth).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    pub run_id: Uuid,
    pub name: String,
    pub uri: String,
    pub sha256: String,
    pub size: u64,
    pub content_type: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunEvent {
    /// Monotonic across the store.
    pub seq: i64,
    pub run_id: Uuid,
    pub stage: String,
    pub kind: String,
    pub message: String,
    pub progress: Option<f64>,
    pub created_at: DateTime<Utc>,
}

/// A row of the `run_summary` view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    pub id: Uuid,
    pub name: String,
    pub status: RunStatus,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub clean_acc: Option<f64>,
    pub backdoored_acc: Option<f64>,
    pub backdoored_asr: Option<f64>,
    /// The chosen point of the `linf` criterion.
    pub linf: Option<CurvePoint>,
}

pub(crate) fn validate_job(job: &NewJob) -> Result<()> {
    if job.stage.is_empty() {
        return Err(StoreError::invalid("job.stage", "must not be empty"));
    }
    if job.max_attempts < 1 {
        return Err(StoreError::invalid("job.max_attempts", "must be >= 1"));
    }
    Ok(())
}

pub(crate) fn validate_sha256(sha: &str) -> Result<()> {
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(StoreError::invalid(
            "artifact.sha256",
            format!("{sha:?} is not a hex sha256"),
        ));
    }
    Ok(())
}

/// sha256 of `data` as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// How API keys begin.
pub const API_KEY_PREFIX: &str = "dbk_";

/// How many leading characters of a key are kept (not secret) as
/// [`ApiKey::prefix`]: `dbk_` and 8 hex digits, 32 of the key's 256 bits.
pub(crate) const API_KEY_SHOWN: usize = 12;

/// A new API key: `dbk_` and 64 hex digits, 32 bytes from the OS RNG.
pub(crate) fn new_api_key() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        StoreError::Database(sqlx::Error::Io(std::io::Error::other(format!(
            "the OS random number generator failed: {e}"
        ))))
    })?;
    Ok(format!("{API_KEY_PREFIX}{}", hex::encode(bytes)))
}

/// Whether `a` and `b` are equal, in time that depends only on their lengths.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
