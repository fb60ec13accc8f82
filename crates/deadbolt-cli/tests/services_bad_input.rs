//! Bad input over gRPC: malformed specs get INVALID_ARGUMENT naming the
//! field (BadRequest field violations), unknown run ids NOT_FOUND; a
//! corrupted checkpoint object fails its job with a checksum error
//! (DATA_LOSS, not retried) and the service keeps serving (health SERVING,
//! a following experiment succeeds).

mod common;

use std::time::{Duration, Instant};

use common::*;
use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::analyzer_service_client::AnalyzerServiceClient;
use deadbolt_proto::v1::poisoner_service_client::PoisonerServiceClient;
use deadbolt_proto::v1::trainer_service_client::TrainerServiceClient;
use deadbolt_proto::validate::field_violations;
use deadbolt_store::{JobStatus, NewRun, RunStatus};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn field_of(s: &tonic::Status) -> String {
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    field_violations(s)
        .first()
        .map(|f| f.0.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_a_corrupted_checkpoint_fails_only_its_job() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec_path = tiny_spec(d, 1, 1200);
    let db = format!("sqlite://{}", d.join("meta.db").display());
    let art = d.join("artifacts");
    std::fs::create_dir_all(d.join("work")).unwrap();
    let all = serve_all(
        d,
        &config(&db, &art.display().to_string(), &d.join("work"), ""),
    )
    .0;
    let mut c = gateway(&all.url("gateway")).await;

    // ---- malformed specs ----
    let spec =
        deadbolt_core::spec::ExperimentSpec::from_file(&tiny_spec_local(d, 1, 1200)).unwrap();
    let mut p = deadbolt_runtime::convert::spec_to_proto(&spec);
    p.attack.as_mut().unwrap().rate = 1.5;
    let submit = |s: pb::submit_experiment_request::Spec| pb::SubmitExperimentRequest {
        client_request_id: String::new(),
        spec: Some(s),
    };
    let e = c
        .submit_experiment(submit(pb::submit_experiment_request::Spec::Structured(
            p.clone(),
        )))
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "spec.attack.rate");
    p.attack.as_mut().unwrap().rate = 0.1;
    p.defense.as_mut().unwrap().criteria = vec![42];
    let e = c
        .submit_experiment(submit(pb::submit_experiment_request::Spec::Structured(p)))
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "spec.defense.criteria");
    let text = std::fs::read_to_string(&spec_path).unwrap();
    let e = c
        .submit_experiment(submit(pb::submit_experiment_request::Spec::SpecToml(
            text.replace("epochs = 1", "epochs = 0"),
        )))
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "spec.training.epochs");
    let e = c
        .submit_experiment(submit(pb::submit_experiment_request::Spec::SpecToml(
            text.replace("[training]", "[training]\nbogus = 1"),
        )))
        .await
        .unwrap_err();
    assert!(field_of(&e).starts_with("spec.training"), "{e:?}");
    let e = c
        .submit_experiment(submit(pb::submit_experiment_request::Spec::SpecToml(
            text.replace("epochs = 1", "epochs = -3"),
        )))
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "spec.training.epochs");
    let e = c
        .submit_experiment(pb::SubmitExperimentRequest::default())
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "spec");

    // ---- remote specs name no server path and stay within the limits ----
    let probe = d.join("must-not-be-created");
    let probes = [
        (
            text.replace(
                "path = \"mnist\"",
                &format!("path = \"{}\"", probe.display()),
            ),
            "spec.dataset.path",
        ),
        (
            text.replace("path = \"mnist\"", "path = \"/etc\""),
            "spec.dataset.path",
        ),
        (
            text.replace(
                "[attack.trigger]\nkind = \"patch\"",
                "[attack.trigger]\nkind = \"patch\"\npattern = { image = \"/etc/hostname\" }",
            ),
            "spec.attack.trigger.pattern",
        ),
        (
            text.replace("epochs = 1", "epochs = 1000000"),
            "spec.training.epochs",
        ),
        (
            text.replace("batch_size = 64", "batch_size = 100000000"),
            "spec.training.batch_size",
        ),
        (
            text.replace(
                "name = \"tiny-badnets\"",
                &format!("name = \"{}\"", "x".repeat(3000)),
            ),
            "spec.name",
        ),
    ];
    let mut answers = Vec::new();
    for (toml, field) in probes {
        assert_ne!(toml, text, "the probe for {field} changed nothing");
        let e = c
            .submit_experiment(submit(pb::submit_experiment_request::Spec::SpecToml(toml)))
            .await
            .unwrap_err();
        assert_eq!(field_of(&e), field, "{e:?}");
        answers.push((field, e.message().to_string()));
    }
    // the answer does not depend on whether the path exists on the server
    assert_eq!(answers[0].1, answers[1].1);
    assert!(answers[3].1.contains("limit"), "{}", answers[3].1);
    assert!(!probe.exists(), "a remote spec created a server folder");
    let listed = c
        .list_experiments(pb::ListExperimentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.runs.is_empty(), "a refused spec left a run behind");

    // ---- unknown and malformed run ids ----
    let unknown = uuid::Uuid::new_v4().to_string();
    let e = c
        .get_experiment(pb::GetExperimentRequest {
            run_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .watch_experiment(pb::WatchExperimentRequest {
            run_id: unknown.clone(),
            after_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .cancel_experiment(pb::CancelExperimentRequest {
            run_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .get_experiment(pb::GetExperimentRequest {
            run_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "run_id");
    // only the gateway may call a stage service
    let e = TrainerServiceClient::connect(all.url("trainer"))
        .await
        .unwrap()
        .train(pb::TrainRequest {
            run_id: unknown.clone(),
            tag: pb::ModelTag::Clean as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let mut trainer =
        TrainerServiceClient::with_interceptor(channel(&all.url("trainer")).await, internal);
    let train = |run_id: &str, tag: pb::ModelTag| pb::TrainRequest {
        run_id: run_id.into(),
        tag: tag as i32,
    };
    let e = trainer
        .train(train(&unknown, pb::ModelTag::Clean))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // ---- a corrupted checkpoint ----
    // a run driven stage by stage over the stage RPCs (no gateway driver)
    let store = deadbolt_store::connect(&db).await.unwrap();
    let (run, _) = store
        .create_run(NewRun {
            client_request_id: None,
            team: deadbolt_store::LOCAL_TEAM.into(),
            name: "corrupt".into(),
            spec_json: serde_json::to_value(&spec).unwrap(),
        })
        .await
        .unwrap();
    let id = run.id.to_string();
    let e = trainer
        .train(train(&id, pb::ModelTag::Unspecified))
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "tag");
    // a stage call for a run that is not running changes nothing
    let e = trainer
        .train(train(&id, pb::ModelTag::Clean))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(store.list_jobs(run.id).await.unwrap().is_empty());
    store
        .set_run_status(run.id, RunStatus::Running, None)
        .await
        .unwrap();
    // nor one for a later stage than the run is at
    let e = trainer
        .train(train(&id, pb::ModelTag::Clean))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(store.list_jobs(run.id).await.unwrap().is_empty());
    let mut poisoner =
        PoisonerServiceClient::with_interceptor(channel(&all.url("poisoner")).await, internal);
    let r = poisoner
        .poison(pb::PoisonRequest { run_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(r.poisoned_count > 0);
    trainer
        .train(train(&id, pb::ModelTag::Clean))
        .await
        .unwrap();
    trainer
        .train(train(&id, pb::ModelTag::Backdoored))
        .await
        .unwrap();
    // overwrite the clean model's bytes in the artifact store
    let rec = store
        .get_artifact(run.id, "clean/model.safetensors")
        .await
        .unwrap();
    let key = rec.uri.split(&format!("runs/{}/", run.id)).nth(1).unwrap();
    let file = art.join("runs").join(run.id.to_string()).join(key);
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let mut analyzer =
        AnalyzerServiceClient::with_interceptor(channel(&all.url("analyzer")).await, internal);
    let e = analyzer
        .analyze(pb::AnalyzeRequest { run_id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("checksum mismatch"), "{}", e.message());
    let job = store
        .list_jobs(run.id)
        .await
        .unwrap()
        .into_iter()
        .find(|j| j.stage == "analyze")
        .unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.attempts, 1, "a checksum error is not retried");
    let failure = job.error.unwrap();
    assert_eq!(failure.code, "data_loss");
    assert!(failure.message.contains("checksum mismatch"), "{failure:?}");

    // ---- the services keep serving ----
    for (svc, name) in [
        ("analyzer", "deadbolt.v1.AnalyzerService"),
        ("trainer", "deadbolt.v1.TrainerService"),
        ("gateway", "deadbolt.v1.ExperimentService"),
        ("gateway", ""),
    ] {
        let ch = tonic::transport::Endpoint::from_shared(all.url(svc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut h = HealthClient::new(ch);
        let s = h
            .check(HealthCheckRequest {
                service: name.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.status, ServingStatus::Serving as i32, "{svc} {name}");
    }
    let sub = submit_toml(&mut c, &spec_path, "after-corruption").await;
    let (_, done) = watch(&mut c, &sub.run_id, Duration::from_secs(180)).await;
    assert_eq!(
        done.status,
        pb::JobStatus::Succeeded as i32,
        "{}\n{}",
        done.error,
        all.log_tail()
    );
    assert!(done
        .artifacts
        .iter()
        .any(|a| a.name == "report/report.json"));
    eprintln!("bad-input test took {:.1} s", t0.elapsed().as_secs_f64());
}
