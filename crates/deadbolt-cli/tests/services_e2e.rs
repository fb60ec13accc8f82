//! End to end over separate processes: poisoner, trainer, analyzer, pruner
//! and gateway each as its own `deadbolt serve --services X` on loopback,
//! Postgres (a fresh database) + S3 (moto_server). A tiny MNIST experiment
//! is submitted over gRPC; its figures read back from the Postgres views
//! (`run_summary`, `pruning_curves_v`) and its report read back from S3
//! must equal what `deadbolt experiment` (in-process services, SQLite +
//! local files) reports for the same spec and seed.
//!
//! Tolerance: exact equality. Same seeds, same CPU kernels, and the dataset
//! artifact carries the float32 tensors bit for bit, so nothing differs.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::analyzer_service_client::AnalyzerServiceClient;
use deadbolt_proto::v1::pruner_service_client::PrunerServiceClient;
use deadbolt_store::{ArtifactStore, HEADLINE_CRITERION};
use serde_json::Value;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_processes_on_postgres_and_s3_match_the_embedded_experiment() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // two epochs: the training jobs outlast a heartbeat (a sixth of the
    // lease), so each reports its progress at least once
    let spec = tiny_spec(d, 2, 1200);

    // the in-process reference, run alongside (the same spec with the local
    // path of the digits)
    let inproc_out = d.join("inproc");
    let mut inproc = Command::new(bin())
        .args(["experiment", "--quiet"])
        .arg(tiny_spec_local(d, 2, 1200))
        .arg("--out")
        .arg(&inproc_out)
        .stderr(std::fs::File::create(d.join("inproc.log")).unwrap())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();

    let pg = Pg::fresh().await;
    let moto = Moto::start("deadbolt");
    let art_url = "s3://deadbolt/e2e";
    let base = |name: &str, extra: &str| {
        let work = d.join(format!("work-{name}"));
        std::fs::create_dir_all(&work).unwrap();
        config(
            pg.url(),
            art_url,
            &work,
            &format!("{}\n{extra}", moto.config()),
        )
    };
    let stages: Vec<Proc> = ["poisoner", "trainer", "analyzer", "pruner"]
        .iter()
        .map(|s| serve(d, s, s, &base(s, "")))
        .collect();
    let peer_list: Vec<(&str, Vec<String>)> = stages
        .iter()
        .map(|p| (p.name.as_str(), vec![p.url(&p.name)]))
        .collect();
    let gw = serve(
        d,
        "gateway",
        "gateway",
        &base("gateway", &peers(&peer_list)),
    );

    let mut c = gateway(&gw.url("gateway")).await;
    let sub = submit_toml(&mut c, &spec, "e2e-1").await;
    assert!(sub.created);
    // idempotent per client_request_id
    assert_eq!(submit_toml(&mut c, &spec, "e2e-1").await.run_id, sub.run_id);

    // stray stage calls while the run is early in the pipeline: refused
    // with FAILED_PRECONDITION, nothing enqueued, the run goes on
    let run_id: uuid::Uuid = sub.run_id.parse().unwrap();
    let store = deadbolt_store::connect(pg.url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !store
        .list_jobs(run_id)
        .await
        .unwrap()
        .iter()
        .any(|j| j.stage == "data")
    {
        assert!(Instant::now() < deadline, "the data job never appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url_of = |svc: &str| stages.iter().find(|p| p.name == svc).unwrap().url(svc);
    let mut pruner =
        PrunerServiceClient::with_interceptor(channel(&url_of("pruner")).await, internal);
    let mut analyzer =
        AnalyzerServiceClient::with_interceptor(channel(&url_of("analyzer")).await, internal);
    let e = pruner
        .prune(pb::PruneRequest {
            run_id: sub.run_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = analyzer
        .analyze(pb::AnalyzeRequest {
            run_id: sub.run_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(!store
        .list_jobs(run_id)
        .await
        .unwrap()
        .iter()
        .any(|j| j.stage == "prune" || j.stage == "analyze"));
    let (events, run) = watch(&mut c, &sub.run_id, Duration::from_secs(240)).await;
    assert_eq!(
        run.status,
        pb::JobStatus::Succeeded as i32,
        "run failed: {}\n{}",
        run.error,
        stages
            .iter()
            .map(|p| p.log_tail())
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
    assert!(
        events.iter().any(|e| e.kind == "progress"),
        "progress events are streamed: {:?}",
        events
            .iter()
            .map(|e| (&e.stage, &e.kind, &e.message))
            .collect::<Vec<_>>()
    );
    assert!(events
        .iter()
        .any(|e| e.stage == "train-backdoored" && e.kind == "finished"));
    // the driver reads each stage's result: the prune job's chosen points
    assert!(
        events
            .iter()
            .any(|e| e.stage == "prune" && e.kind == "finished" && e.message.contains("linf k=")),
        "{:?}",
        events
            .iter()
            .map(|e| (&e.stage, &e.kind, &e.message))
            .collect::<Vec<_>>()
    );

    // the analyze job's result, replayed from the finished job: Grad-CAM
    // heatmaps with their overlays, the synthetic mask and pattern apart,
    // the statistics of the four settings
    let analysis = analyzer
        .analyze(pb::AnalyzeRequest {
            run_id: sub.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let cam = analysis.grad_cam.unwrap();
    assert!(!cam.heatmaps.is_empty());
    assert!(cam.heatmaps.iter().any(|h| h.triggered));
    assert!(cam.heatmaps.iter().all(|h| h.image.is_some()));
    assert_eq!(analysis.statistics.unwrap().settings.len(), 4);
    // the prune job's result: every criterion of the spec
    let pruned = pruner
        .prune(pb::PruneRequest {
            run_id: sub.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!pruned.criteria.is_empty());
    assert!(pruned.criteria.iter().all(|c| c.chosen.is_some()));
    let best = analysis.synthetic.unwrap().best.unwrap();
    let (mask, pattern) = (best.mask.unwrap(), best.pattern.unwrap());
    assert_ne!(mask.sha256, pattern.sha256);
    assert!(mask.uri.ends_with("mask.safetensors"), "{}", mask.uri);

    // figures from the Postgres views
    let summary = store.run_summary(run_id).await.unwrap();
    let curves = store.list_pruning_curves(run_id).await.unwrap();
    // the report from S3
    let s3 = ArtifactStore::from_url_with(art_url, &moto.options()).unwrap();
    let rec = store
        .get_artifact(run_id, "report/report.json")
        .await
        .unwrap();
    let s3_report: Value =
        serde_json::from_slice(&s3.get(&s3.ref_from_record(&rec).unwrap()).await.unwrap()).unwrap();

    let status = inproc.wait().unwrap();
    assert!(
        status.success(),
        "deadbolt experiment failed: {}",
        std::fs::read_to_string(d.join("inproc.log")).unwrap_or_default()
    );
    let local: Value =
        serde_json::from_str(&std::fs::read_to_string(inproc_out.join("report.json")).unwrap())
            .unwrap();

    let f = |v: &Value| v.as_f64().unwrap();
    assert_eq!(summary.clean_acc, Some(f(&local["clean_model"]["acc"])));
    assert_eq!(
        summary.backdoored_acc,
        Some(f(&local["backdoored_model"]["acc"]))
    );
    assert_eq!(
        summary.backdoored_asr,
        Some(f(&local["backdoored_model"]["asr"]))
    );
    let linf = summary.linf.expect("linf operating point in run_summary");
    let want = &local["pruning"][HEADLINE_CRITERION]["chosen"];
    assert_eq!(
        (linf.k, linf.acc, linf.asr, linf.ra),
        (
            want["k"].as_i64().unwrap(),
            f(&want["acc"]),
            f(&want["asr"]),
            f(&want["ra"])
        )
    );
    let criteria = local["pruning"].as_object().unwrap();
    assert_eq!(curves.len(), criteria.len());
    for c in &curves {
        let want = criteria[&c.criterion]["curve"].as_array().unwrap();
        assert_eq!(c.points.len(), want.len(), "{}", c.criterion);
        for (p, w) in c.points.iter().zip(want) {
            assert_eq!(
                (p.k, p.acc, p.asr, p.ra),
                (
                    w["k"].as_i64().unwrap(),
                    f(&w["acc"]),
                    f(&w["asr"]),
                    f(&w["ra"])
                ),
                "{} curve",
                c.criterion
            );
        }
        assert_eq!(c.chosen_k, criteria[&c.criterion]["chosen"]["k"].as_i64());
    }
    // the whole science part of the report agrees
    for key in [
        "clean_model",
        "backdoored_model",
        "separation",
        "channel_means",
        "gradcam",
        "data",
        "layer",
        "channels",
    ] {
        let (mut a, mut b) = (s3_report[key].clone(), local[key].clone());
        for v in [&mut a, &mut b] {
            if let Some(o) = v.as_object_mut() {
                o.remove("checkpoint");
                o.remove("train_seconds");
            }
        }
        assert_eq!(a, b, "report.{key}");
    }
    for table in ["pruning", "pruning_synthetic"] {
        for (c, r) in local[table].as_object().unwrap() {
            for key in [
                "order",
                "curve",
                "validation_curve",
                "chosen",
                "der",
                "pruned_channels",
            ] {
                assert_eq!(s3_report[table][c][key], r[key], "{table}.{c}.{key}");
            }
        }
    }
    let syn = &s3_report["synthetic_trigger"];
    assert_eq!(
        syn["flagged_labels"],
        local["synthetic_trigger"]["flagged_labels"]
    );
    assert_eq!(
        syn["suspect_label"],
        local["synthetic_trigger"]["suspect_label"]
    );
    // the same figures: the PNGs in S3 are byte-identical to the local ones
    for fig in ["hist_linf.png", "gradcam.png", "pruning_curves.png"] {
        let rec = store
            .get_artifact(run_id, &format!("report/{fig}"))
            .await
            .unwrap();
        let bytes = s3.get(&s3.ref_from_record(&rec).unwrap()).await.unwrap();
        assert_eq!(
            &bytes[..],
            &std::fs::read(inproc_out.join(fig)).unwrap()[..],
            "{fig}"
        );
    }
    drop(gw);
    drop(stages);
    pg.drop_db().await;
    eprintln!("e2e took {:.1} s", t0.elapsed().as_secs_f64());
}
