//! The stage-job worker on a real (SQLite, in-memory) store: a panic or a
//! deterministic error fails the job after one attempt with a structured
//! failure; a transient error is retried; a stage call for a run that is
//! not at that stage is refused and changes nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadbolt_runtime::stage::run_stage;
use deadbolt_runtime::{Handlers, JobContext, JobError, Stage, StageKind, Work, Worker};
use deadbolt_store::{ArtifactStore, Job, JobStatus, MetadataStore, NewJob, NewRun, RunStatus};
use serde::{Deserialize, Serialize};
use tonic::Code;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Input {
    mode: String,
}

struct Probe;
impl Stage for Probe {
    const KIND: StageKind = StageKind::Data;
    type Input = Input;
    type Output = u32;
}

/// Panics, fails for good, or fails once and then succeeds, as told.
struct ProbeWork(Arc<AtomicUsize>);

impl Work<Probe> for ProbeWork {
    fn run(&self, _ctx: &JobContext, input: Input) -> Result<u32, JobError> {
        let calls = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        match input.mode.as_str() {
            "panic" => panic!("boom in the stage"),
            "invalid" => Err(JobError::invalid("training.epochs", "must be at least 1")),
            "flaky" if calls == 1 => Err(JobError::transient("connection reset")),
            _ => Ok(calls as u32),
        }
    }
}

async fn setup() -> (Arc<dyn MetadataStore>, ArtifactStore, tempfile::TempDir) {
    let store = deadbolt_store::connect("sqlite::memory:").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let artifacts = ArtifactStore::local(&dir.path().join("artifacts")).unwrap();
    (store, artifacts, dir)
}

fn worker(
    store: &Arc<dyn MetadataStore>,
    artifacts: &ArtifactStore,
    dir: &std::path::Path,
    calls: Arc<AtomicUsize>,
) -> Worker {
    Worker {
        service: "poisoner",
        worker_id: "test-worker".into(),
        handlers: Handlers::new().with::<Probe, _>(ProbeWork(calls)),
        store: store.clone(),
        artifacts: artifacts.clone(),
        lease: Duration::from_secs(30),
        heartbeat: Duration::from_millis(200),
        poll: Duration::from_millis(20),
        work_root: dir.to_path_buf(),
        drain: deadbolt_runtime::Drain::new(),
        drain_deadline: Duration::from_secs(5),
        keep_epochs: 2,
    }
}

/// A stage call refused with `code`, having enqueued nothing.
async fn refused<S: Stage<Input = Input, Output = u32>>(
    store: &Arc<dyn MetadataStore>,
    run: Uuid,
    code: Code,
) -> tonic::Status {
    let input = Input { mode: "ok".into() };
    let e = run_stage::<S>(store.as_ref(), run, input, 3, Duration::from_millis(20))
        .await
        .unwrap_err();
    assert_eq!(e.code(), code, "{e:?}");
    assert!(store.list_jobs(run).await.unwrap().is_empty());
    e
}

/// A minimal experiment spec (the probe stages read nothing of it).
fn experiment() -> deadbolt_spec::RunSpec {
    deadbolt_spec::RunSpec::Experiment(
        deadbolt_spec::ExperimentSpec::from_toml_str("[dataset]\nkind = \"mnist\"\n").unwrap(),
    )
}

async fn run_with(store: &Arc<dyn MetadataStore>, mode: &str) -> Uuid {
    let (run, _) = store
        .create_run(NewRun {
            client_request_id: None,
            team: deadbolt_store::LOCAL_TEAM.into(),
            name: mode.into(),
            spec_json: experiment().to_stored(),
        })
        .await
        .unwrap();
    run.id
}

async fn job_of(store: &Arc<dyn MetadataStore>, run: Uuid, mode: &str) -> Job {
    store
        .enqueue_job(NewJob {
            run_id: run,
            stage: "data".into(),
            payload: serde_json::json!({ "mode": mode }),
            max_attempts: 3,
        })
        .await
        .unwrap()
        .0
}

async fn until_done(store: &Arc<dyn MetadataStore>, id: Uuid) -> Job {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = store.get_job(id).await.unwrap();
        if matches!(j.status, JobStatus::Succeeded | JobStatus::Failed) {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} did not finish: {j:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_stage_fails_its_job_after_one_attempt() {
    let (store, artifacts, dir) = setup().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let w = tokio::spawn(worker(&store, &artifacts, dir.path(), calls.clone()).run());
    let run = run_with(&store, "panic").await;
    let job = job_of(&store, run, "panic").await;
    let done = until_done(&store, job.id).await;
    w.abort();
    assert_eq!(done.status, JobStatus::Failed);
    assert_eq!(done.attempts, 1, "a panic is not retried");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let f = done.error.expect("a structured failure");
    assert_eq!(f.code, "internal");
    assert!(f.message.contains("boom in the stage"), "{f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deterministic_errors_fail_once_and_transient_ones_retry() {
    let (store, artifacts, dir) = setup().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let w = tokio::spawn(worker(&store, &artifacts, dir.path(), calls.clone()).run());

    let run = run_with(&store, "invalid").await;
    let job = job_of(&store, run, "invalid").await;
    let done = until_done(&store, job.id).await;
    assert_eq!((done.status, done.attempts), (JobStatus::Failed, 1));
    let f = done.error.unwrap();
    assert_eq!(f.code, "invalid_argument");
    assert_eq!(f.field.as_deref(), Some("training.epochs"));

    calls.store(0, Ordering::SeqCst);
    let run = run_with(&store, "flaky").await;
    let job = job_of(&store, run, "flaky").await;
    let done = until_done(&store, job.id).await;
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.attempts, 2, "a transient error is retried");
    w.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_calls_are_refused_unless_the_run_is_at_that_stage() {
    let (store, artifacts, dir) = setup().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let run = run_with(&store, "ok").await;
    let input = Input { mode: "ok".into() };
    // queued (not yet driven): refused, nothing enqueued
    refused::<Probe>(&store, run, Code::FailedPrecondition).await;

    // a later stage than the run is at: refused as well
    store
        .set_run_status(run, RunStatus::Running, None)
        .await
        .unwrap();
    struct Later;
    impl Stage for Later {
        const KIND: StageKind = StageKind::Prune;
        type Input = Input;
        type Output = u32;
    }
    refused::<Later>(&store, run, Code::FailedPrecondition).await;

    // a stage the run's kind does not have: refused
    struct ScanProbe;
    impl Stage for ScanProbe {
        const KIND: StageKind = StageKind::Scan;
        type Input = Input;
        type Output = u32;
    }
    let e = refused::<ScanProbe>(&store, run, Code::FailedPrecondition).await;
    assert!(e.message().contains("stage scan cannot run"), "{e:?}");

    // a stored spec that does not decode: DATA_LOSS, nothing enqueued
    let (bad, _) = store
        .create_run(NewRun {
            client_request_id: None,
            team: deadbolt_store::LOCAL_TEAM.into(),
            name: "bad".into(),
            spec_json: serde_json::json!({"scan": 3}),
        })
        .await
        .unwrap();
    store
        .set_run_status(bad.id, RunStatus::Running, None)
        .await
        .unwrap();
    refused::<Probe>(&store, bad.id, Code::DataLoss).await;

    // at the stage: runs, and the typed output comes back
    let w = tokio::spawn(worker(&store, &artifacts, dir.path(), calls.clone()).run());
    let out = run_stage::<Probe>(
        store.as_ref(),
        run,
        input.clone(),
        3,
        Duration::from_millis(20),
    )
    .await
    .unwrap();
    assert_eq!(out, 1);
    w.abort();
    // once the run is over, the finished stage still answers (a replay)
    store
        .set_run_status(run, RunStatus::Cancelled, None)
        .await
        .unwrap();
    let again = run_stage::<Probe>(store.as_ref(), run, input, 3, Duration::from_millis(20))
        .await
        .unwrap();
    assert_eq!(again, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
