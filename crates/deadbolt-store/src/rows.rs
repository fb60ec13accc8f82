//! The row types of the metadata tables and views: decoded
//! (`sqlx::FromRow`) the same way from both backends, converted into the
//! records of [`crate::records`].

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::backend::Id;
use crate::records::*;

#[derive(sqlx::FromRow)]
pub(crate) struct RunRow {
    id: Id,
    team: String,
    client_request_id: Option<String>,
    name: String,
    #[sqlx(try_from = "String")]
    status: RunStatus,
    error: Option<String>,
    #[sqlx(json)]
    spec_json: Value,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    driver_id: Option<String>,
    driver_expires_at: Option<DateTime<Utc>>,
}

impl From<RunRow> for Run {
    fn from(r: RunRow) -> Run {
        Run {
            id: r.id.0,
            team: r.team,
            client_request_id: r.client_request_id,
            name: r.name,
            status: r.status,
            error: r.error,
            spec_json: r.spec_json,
            created_at: r.created_at,
            updated_at: r.updated_at,
            driver_id: r.driver_id,
            driver_expires_at: r.driver_expires_at,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct JobRow {
    id: Id,
    run_id: Id,
    stage: String,
    #[sqlx(try_from = "String")]
    status: JobStatus,
    #[sqlx(json)]
    payload: Value,
    #[sqlx(json(nullable))]
    result: Option<Value>,
    error: Option<String>,
    error_code: Option<String>,
    error_field: Option<String>,
    attempts: i32,
    max_attempts: i32,
    lease_token: Option<Id>,
    leased_by: Option<String>,
    lease_expires_at: Option<DateTime<Utc>>,
    run_after: DateTime<Utc>,
    progress: Option<f64>,
    progress_message: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<JobRow> for Job {
    fn from(r: JobRow) -> Job {
        Job {
            id: r.id.0,
            run_id: r.run_id.0,
            stage: r.stage,
            status: r.status,
            payload: r.payload,
            result: r.result,
            error: r.error.map(|message| JobFailure {
                code: r.error_code.unwrap_or_else(|| "unknown".into()),
                message,
                field: r.error_field,
            }),
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            lease_token: r.lease_token.map(Uuid::from),
            leased_by: r.leased_by,
            lease_expires_at: r.lease_expires_at,
            run_after: r.run_after,
            progress: r.progress,
            progress_message: r.progress_message,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct MetricRow {
    run_id: Id,
    stage: String,
    name: String,
    step: i64,
    value: f64,
}

impl From<MetricRow> for Metric {
    fn from(r: MetricRow) -> Metric {
        Metric {
            run_id: r.run_id.0,
            stage: r.stage,
            name: r.name,
            step: r.step,
            value: r.value,
        }
    }
}

/// A row of the `pruning_curves_v` view.
#[derive(sqlx::FromRow)]
pub(crate) struct CurveRow {
    pub criterion: String,
    pub chosen: bool,
    #[sqlx(flatten)]
    pub point: CurvePoint,
}

/// A row of `pruning_choices` with its run.
#[derive(sqlx::FromRow)]
pub(crate) struct ChoiceRow {
    pub run_id: Id,
    #[sqlx(flatten)]
    pub choice: PruningChoice,
}

#[derive(sqlx::FromRow)]
pub(crate) struct ArtifactRow {
    run_id: Id,
    name: String,
    uri: String,
    sha256: String,
    #[sqlx(try_from = "i64")]
    size: u64,
    content_type: Option<String>,
}

impl From<ArtifactRow> for ArtifactRecord {
    fn from(r: ArtifactRow) -> ArtifactRecord {
        ArtifactRecord {
            run_id: r.run_id.0,
            name: r.name,
            uri: r.uri,
            sha256: r.sha256,
            size: r.size,
            content_type: r.content_type,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct EventRow {
    seq: i64,
    run_id: Id,
    stage: String,
    kind: String,
    message: String,
    progress: Option<f64>,
    created_at: DateTime<Utc>,
}

impl From<EventRow> for RunEvent {
    fn from(r: EventRow) -> RunEvent {
        RunEvent {
            seq: r.seq,
            run_id: r.run_id.0,
            stage: r.stage,
            kind: r.kind,
            message: r.message,
            progress: r.progress,
            created_at: r.created_at,
        }
    }
}

/// The space-separated scopes of an API key.
pub(crate) struct ScopeList(Vec<Scope>);

impl TryFrom<String> for ScopeList {
    type Error = crate::StoreError;
    fn try_from(s: String) -> crate::Result<Self> {
        let scopes = s
            .split_ascii_whitespace()
            .map(str::parse)
            .collect::<crate::Result<Vec<Scope>>>()?;
        Ok(ScopeList(normalize_scopes(&scopes)))
    }
}

/// A row of `api_keys`: the key's hash stays here.
#[derive(sqlx::FromRow)]
pub(crate) struct ApiKeyRow {
    id: Id,
    team: String,
    name: String,
    pub key_hash: String,
    prefix: String,
    #[sqlx(try_from = "String")]
    scopes: ScopeList,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyRow> for ApiKey {
    fn from(r: ApiKeyRow) -> ApiKey {
        ApiKey {
            id: r.id.0,
            team: r.team,
            name: r.name,
            scopes: r.scopes.0,
            prefix: r.prefix,
            created_at: r.created_at,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
            last_used_at: r.last_used_at,
        }
    }
}

/// A row of the `run_summary` view.
#[derive(sqlx::FromRow)]
pub(crate) struct SummaryRow {
    id: Id,
    name: String,
    #[sqlx(try_from = "String")]
    status: RunStatus,
    error: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    clean_acc: Option<f64>,
    backdoored_acc: Option<f64>,
    backdoored_asr: Option<f64>,
    linf_k: Option<i64>,
    linf_acc: Option<f64>,
    linf_asr: Option<f64>,
    linf_ra: Option<f64>,
}

impl From<SummaryRow> for RunSummary {
    fn from(r: SummaryRow) -> RunSummary {
        let linf = match (r.linf_k, r.linf_acc, r.linf_asr, r.linf_ra) {
            (Some(k), Some(acc), Some(asr), Some(ra)) => Some(CurvePoint { k, acc, asr, ra }),
            _ => None,
        };
        RunSummary {
            id: r.id.0,
            name: r.name,
            status: r.status,
            error: r.error,
            created_at: r.created_at,
            updated_at: r.updated_at,
            clean_acc: r.clean_acc,
            backdoored_acc: r.backdoored_acc,
            backdoored_asr: r.backdoored_asr,
            linf,
        }
    }
}
