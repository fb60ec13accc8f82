//! Bad input over gRPC, against one `deadbolt serve` process (every
//! service, SQLite, filesystem artifacts) shared by the tests of this file:
//! malformed specs get INVALID_ARGUMENT naming the field (BadRequest field
//! violations) and leave no run behind, unknown run ids NOT_FOUND, stage
//! calls out of turn change nothing; a corrupted checkpoint object fails
//! its job with a checksum error (DATA_LOSS, not retried) and the service
//! keeps serving (health SERVING, a following experiment succeeds).

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::analyzer_service_client::AnalyzerServiceClient;
use deadbolt_proto::v1::experiment_service_client::ExperimentServiceClient;
use deadbolt_proto::v1::poisoner_service_client::PoisonerServiceClient;
use deadbolt_proto::v1::trainer_service_client::TrainerServiceClient;
use deadbolt_proto::validate::field_violations;
use deadbolt_store::{JobStatus, NewRun, RunStatus};
use pb::submit_experiment_request::Spec;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The process every test of this file talks to.
struct Served {
    dir: tempfile::TempDir,
    all: Proc,
    /// The metadata store's URL (SQLite).
    db: String,
    /// The filesystem artifact store's root.
    art: PathBuf,
}

impl Served {
    /// The tiny spec as a remote client sends it (1 epoch, 1,200 images).
    fn spec_path(&self) -> PathBuf {
        tiny_spec(self.dir.path(), 1, 1200)
    }
    fn spec_toml(&self) -> String {
        std::fs::read_to_string(self.spec_path()).unwrap()
    }
    /// The tiny spec with the local MNIST path (runs made in the store).
    fn local_spec(&self) -> deadbolt_core::spec::ExperimentSpec {
        deadbolt_core::spec::ExperimentSpec::from_file(&tiny_spec_local(self.dir.path(), 1, 1200))
            .unwrap()
    }
    async fn gateway(&self) -> ExperimentServiceClient<Channel> {
        gateway(&self.all.url("gateway")).await
    }
    async fn trainer(&self) -> TrainerServiceClient<InternalChannel> {
        let f: Internal = internal;
        TrainerServiceClient::with_interceptor(channel(&self.all.url("trainer")).await, f)
    }
    async fn store(&self) -> std::sync::Arc<dyn deadbolt_store::MetadataStore> {
        deadbolt_store::connect(&self.db).await.unwrap()
    }
}

type Internal = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;
type InternalChannel = tonic::service::interceptor::InterceptedService<Channel, Internal>;

fn served() -> &'static Served {
    static SERVED: OnceLock<Result<Served, String>> = OnceLock::new();
    fixture::shared(&SERVED, || async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fixture::remove_at_exit(d);
        let db = format!("sqlite://{}", d.join("meta.db").display());
        let art = d.join("artifacts");
        std::fs::create_dir_all(d.join("work")).unwrap();
        let all = serve_all(
            d,
            &config(&db, &art.display().to_string(), &d.join("work"), ""),
        )
        .0;
        fixture::kill_at_exit(all.pid());
        Served { dir, all, db, art }
    })
}

/// The field of the first BadRequest violation of an INVALID_ARGUMENT.
fn first_field(s: &tonic::Status) -> String {
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    field_violations(s)
        .first()
        .map(|f| f.0.clone())
        .unwrap_or_default()
}

/// Submits `spec` (whose name is `name`), expects INVALID_ARGUMENT naming
/// `field` (`prefix*`: a field that starts with `prefix`), and that no run
/// named `name` was left behind; the refusal.
async fn refused(spec: Spec, name: &str, field: &str) -> tonic::Status {
    let mut c = served().gateway().await;
    let e = c
        .submit_experiment(pb::SubmitExperimentRequest {
            client_request_id: String::new(),
            spec: Some(spec),
        })
        .await
        .unwrap_err();
    match field.strip_suffix('*') {
        Some(prefix) => assert!(first_field(&e).starts_with(prefix), "{e:?}"),
        None => assert_eq!(first_field(&e), field, "{e:?}"),
    }
    let listed = c
        .list_experiments(pb::ListExperimentsRequest {
            page_size: 500,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.runs.iter().all(|r| r.name != name),
        "a refused spec left a run behind: {name}"
    );
    e
}

/// The tiny spec as TOML edited by `edit` (which must change it), then
/// named `name` (unless the edit renamed it); refused naming `field`.
async fn refused_toml(name: &str, edit: impl Fn(&str) -> String, field: &str) -> tonic::Status {
    let text = served().spec_toml();
    let edited = edit(&text);
    assert_ne!(edited, text, "the probe for {field} changed nothing");
    let named = edited.replace("name = \"tiny-badnets\"", &format!("name = \"{name}\""));
    refused(Spec::SpecToml(named), name, field).await
}

/// The tiny spec as a structured message named `name`, edited by `edit`;
/// refused naming `field`.
async fn refused_structured(name: &str, edit: impl Fn(&mut pb::ExperimentSpec), field: &str) {
    let mut p = deadbolt_runtime::convert::spec_to_proto(&served().local_spec());
    p.name = name.into();
    edit(&mut p);
    refused(Spec::Structured(p), name, field).await;
}

/// A test that the tiny spec, edited by `$edit` (TOML text, or the
/// structured message), is refused naming `$field` and leaves no run.
macro_rules! refused {
    ($test:ident, toml: $edit:expr, $field:literal) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            refused_toml(stringify!($test), $edit, $field).await;
        }
    };
    ($test:ident, structured: $edit:expr, $field:literal) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            refused_structured(stringify!($test), $edit, $field).await;
        }
    };
}

// ---- malformed specs ----

refused!(a_poison_rate_above_one_names_spec_attack_rate,
    structured: |p| p.attack.as_mut().unwrap().rate = 1.5, "spec.attack.rate");
refused!(an_unknown_criterion_names_spec_defense_criteria,
    structured: |p| p.defense.as_mut().unwrap().criteria = vec![42], "spec.defense.criteria");
refused!(zero_epochs_name_spec_training_epochs,
    toml: |t| t.replace("epochs = 1", "epochs = 0"), "spec.training.epochs");
refused!(an_unknown_key_names_its_table,
    toml: |t| t.replace("[training]", "[training]\nbogus = 1"), "spec.training*");
refused!(negative_epochs_name_spec_training_epochs,
    toml: |t| t.replace("epochs = 1", "epochs = -3"), "spec.training.epochs");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_without_a_spec_names_spec() {
    let e = served()
        .gateway()
        .await
        .submit_experiment(pb::SubmitExperimentRequest::default())
        .await
        .unwrap_err();
    assert_eq!(first_field(&e), "spec");
}

// ---- remote specs name no server path and stay within the limits ----

refused!(a_trigger_image_on_the_server_names_spec_attack_trigger_pattern,
    toml: |t| t.replace(
        "[attack.trigger]\nkind = \"patch\"",
        "[attack.trigger]\nkind = \"patch\"\npattern = { image = \"/etc/hostname\" }",
    ),
    "spec.attack.trigger.pattern");
refused!(a_batch_size_over_the_limit_names_spec_training_batch_size,
    toml: |t| t.replace("batch_size = 64", "batch_size = 100000000"), "spec.training.batch_size");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_path_is_refused_alike_whether_it_exists() {
    let probe = served().dir.path().join("must-not-be-created");
    let missing = refused_toml(
        "path-missing",
        |t| {
            t.replace(
                "path = \"mnist\"",
                &format!("path = \"{}\"", probe.display()),
            )
        },
        "spec.dataset.path",
    )
    .await;
    let existing = refused_toml(
        "path-etc",
        |t| t.replace("path = \"mnist\"", "path = \"/etc\""),
        "spec.dataset.path",
    )
    .await;
    // the answer does not depend on whether the path exists on the server
    assert_eq!(missing.message(), existing.message());
    assert!(!probe.exists(), "a remote spec created a server folder");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_over_the_limit_are_refused_naming_the_limit() {
    let e = refused_toml(
        "epochs-1e6",
        |t| t.replace("epochs = 1", "epochs = 1000000"),
        "spec.training.epochs",
    )
    .await;
    assert!(e.message().contains("limit"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_over_the_limit_names_spec_name() {
    let long = "x".repeat(3000);
    refused_toml(
        &long,
        |t| t.replace("name = \"tiny-badnets\"", &format!("name = \"{long}\"")),
        "spec.name",
    )
    .await;
}

// ---- unknown and malformed run ids ----

fn unknown_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_run_is_not_found_by_get_watch_and_cancel() {
    let mut c = served().gateway().await;
    let run_id = unknown_id();
    let get = pb::GetExperimentRequest {
        run_id: run_id.clone(),
    };
    let watch = pb::WatchExperimentRequest {
        run_id: run_id.clone(),
        after_seq: 0,
    };
    let cancel = pb::CancelExperimentRequest { run_id };
    for (method, answer) in [
        ("get", c.get_experiment(get).await.err()),
        ("watch", c.watch_experiment(watch).await.err()),
        ("cancel", c.cancel_experiment(cancel).await.err()),
    ] {
        let e = answer.unwrap_or_else(|| panic!("{method} of an unknown run succeeded"));
        assert_eq!(e.code(), Code::NotFound, "{method}: {e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_run_id_names_run_id() {
    let e = served()
        .gateway()
        .await
        .get_experiment(pb::GetExperimentRequest {
            run_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(first_field(&e), "run_id");
}

// ---- stage services ----

fn train(run_id: &str, tag: pb::ModelTag) -> pb::TrainRequest {
    pb::TrainRequest {
        run_id: run_id.into(),
        tag: tag as i32,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_call_without_the_internal_credential_is_unauthenticated() {
    // only the gateway may call a stage service
    let e = TrainerServiceClient::connect(served().all.url("trainer"))
        .await
        .unwrap()
        .train(train(&unknown_id(), pb::ModelTag::Clean))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_call_for_an_unknown_run_is_not_found() {
    let e = served()
        .trainer()
        .await
        .train(train(&unknown_id(), pb::ModelTag::Clean))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

/// A run of the tiny spec made straight in the store (no gateway submit),
/// for stage calls made by the test itself: the test holds the run's drive
/// (for an hour), so the gateway's claim loop never drives it. A run the
/// claim loop took between its creation and the test's claim is cancelled
/// and another made.
async fn stored_run(name: &str) -> deadbolt_store::Run {
    let store = served().store().await;
    for _ in 0..5 {
        let (run, _) = store
            .create_run(NewRun {
                client_request_id: None,
                team: deadbolt_store::LOCAL_TEAM.into(),
                name: name.into(),
                spec_json: serde_json::to_value(served().local_spec()).unwrap(),
            })
            .await
            .unwrap();
        let held = store
            .claim_run(run.id, "test-stage-by-stage", Duration::from_secs(3600))
            .await
            .unwrap();
        if held.is_some() {
            return run;
        }
        store.cancel_run(run.id).await.unwrap();
    }
    panic!("the gateway claimed each of 5 runs before the test could");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_call_without_a_model_tag_names_tag() {
    let run = stored_run("no-tag").await;
    let e = served()
        .trainer()
        .await
        .train(train(&run.id.to_string(), pb::ModelTag::Unspecified))
        .await
        .unwrap_err();
    assert_eq!(first_field(&e), "tag");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_call_for_a_run_not_running_changes_nothing() {
    let run = stored_run("not-running").await;
    let e = served()
        .trainer()
        .await
        .train(train(&run.id.to_string(), pb::ModelTag::Clean))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let store = served().store().await;
    assert!(store.list_jobs(run.id).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_call_ahead_of_the_runs_stage_changes_nothing() {
    let run = stored_run("ahead").await;
    let store = served().store().await;
    store
        .set_run_status(run.id, RunStatus::Running, None)
        .await
        .unwrap();
    // training before the data stage
    let e = served()
        .trainer()
        .await
        .train(train(&run.id.to_string(), pb::ModelTag::Clean))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(store.list_jobs(run.id).await.unwrap().is_empty());
}

// ---- a corrupted checkpoint ----

/// What the analysis of a run whose clean model's bytes were overwritten
/// answered, and its job.
struct Corrupted {
    code: Code,
    message: String,
    job: deadbolt_store::Job,
}

/// A run driven stage by stage over the stage RPCs by the test (data,
/// both models; the gateway does not drive it),
/// the clean model's object overwritten in the artifact store, then its
/// analysis called. Once per test binary.
fn corrupted() -> &'static Corrupted {
    static CORRUPTED: OnceLock<Result<Corrupted, String>> = OnceLock::new();
    fixture::shared(&CORRUPTED, || async {
        let s = served();
        let store = s.store().await;
        let run = stored_run("corrupt").await;
        store
            .set_run_status(run.id, RunStatus::Running, None)
            .await
            .unwrap();
        let id = run.id.to_string();
        let mut poisoner = PoisonerServiceClient::with_interceptor(
            channel(&s.all.url("poisoner")).await,
            internal,
        );
        let r = poisoner
            .poison(pb::PoisonRequest { run_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert!(r.poisoned_count > 0);
        let mut trainer = s.trainer().await;
        for tag in [pb::ModelTag::Clean, pb::ModelTag::Backdoored] {
            trainer.train(train(&id, tag)).await.unwrap();
        }
        // overwrite the clean model's bytes in the artifact store
        let rec = store
            .get_artifact(run.id, "clean/model.safetensors")
            .await
            .unwrap();
        let key = rec.uri.split(&format!("runs/{}/", run.id)).nth(1).unwrap();
        let file = s.art.join("runs").join(run.id.to_string()).join(key);
        let mut bytes = std::fs::read(&file).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0xff;
        std::fs::write(&file, bytes).unwrap();
        let mut analyzer = AnalyzerServiceClient::with_interceptor(
            channel(&s.all.url("analyzer")).await,
            internal,
        );
        let e = analyzer
            .analyze(pb::AnalyzeRequest { run_id: id.clone() })
            .await
            .unwrap_err();
        let job = job_of(store.as_ref(), run.id, "analyze")
            .await
            .expect("the analysis job");
        Corrupted {
            code: e.code(),
            message: e.message().to_string(),
            job,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_checkpoint_is_data_loss_naming_the_checksum() {
    let c = corrupted();
    assert_eq!(c.code, Code::DataLoss, "{}", c.message);
    assert!(c.message.contains("checksum mismatch"), "{}", c.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checksum_error_fails_its_job_without_a_retry() {
    let job = &corrupted().job;
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.attempts, 1, "a checksum error is not retried");
    let failure = job.error.as_ref().unwrap();
    assert_eq!(failure.code, "data_loss");
    assert!(failure.message.contains("checksum mismatch"), "{failure:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_stay_serving_after_a_corrupted_checkpoint() {
    corrupted();
    for (svc, name) in [
        ("analyzer", "deadbolt.v1.AnalyzerService"),
        ("trainer", "deadbolt.v1.TrainerService"),
        ("gateway", "deadbolt.v1.ExperimentService"),
        ("gateway", ""),
    ] {
        let mut h = HealthClient::new(channel(&served().all.url(svc)).await);
        let s = h
            .check(HealthCheckRequest {
                service: name.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.status, ServingStatus::Serving as i32, "{svc} {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_experiment_after_a_corrupted_checkpoint_succeeds() {
    corrupted();
    let t0 = Instant::now();
    let s = served();
    let mut c = s.gateway().await;
    let sub = submit_toml(&mut c, &s.spec_path(), "after-corruption").await;
    let (_, done) = watch(&mut c, &sub.run_id, Duration::from_secs(180)).await;
    assert_succeeded(&done, &s.all.log_tail());
    assert!(done
        .artifacts
        .iter()
        .any(|a| a.name == "report/report.json"));
    eprintln!(
        "the run after the corruption took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
