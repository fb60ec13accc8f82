//! Bring your own model over gRPC (every service in one `deadbolt serve`
//! process, Postgres, S3 on loopback): two MNIST CNNs trained **in
//! PyTorch** (`scripts/byom_torch.py`, the project's torch virtualenv), a
//! clean one and one backdoored with a 4x4 random binary patch at rows
//! 3-6, columns 12-15 relabelled to 3 (a trigger deadbolt's own trigger
//! code cannot make), are uploaded with `deadbolt upload model`, the
//! defender's 1,000 clean digits with `deadbolt upload dataset` (as IDX
//! files, and 500 of them as an image folder `<class>/<n>.png`).
//!
//! - a scan run of the clean model on the image folder (`SubmitScan`, no
//!   repair) and a scan +
//!   repair run of the backdoored one (`deadbolt submit-scan --repair`)
//!   succeed;
//! - the `scan_summary` view (Postgres) says `backdoored`, label 3, for the
//!   second and not `backdoored` for the first, with the repair's figures
//!   equal to the run's repair report; a repair of the clean model never
//!   counts as met (the scan found no backdoor to remove);
//! - `deadbolt report` downloads the repaired model; PyTorch loads it and,
//!   on test digits the repair never saw, with the real trigger it never
//!   saw: ASR <= 5% and ACC at most 2 points below the original model's;
//! - hostile or over-limit requests are refused naming their field, and a
//!   stage call of the other run kind is FAILED_PRECONDITION.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use deadbolt_proto::v1 as pb;
use deadbolt_test_support::specs::mnist_dir;
use tonic::Code;

use deadbolt_test_support::torch::byom_torch as py;

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[derive(Debug, sqlx::FromRow)]
struct SummaryRow {
    name: String,
    status: String,
    model: String,
    verdict: String,
    suspect_label: Option<i64>,
    anomaly_index: Option<f64>,
    repaired: bool,
    acc_before: Option<f64>,
    asr_before: Option<f64>,
    acc_after: Option<f64>,
    asr_after: Option<f64>,
    pruned_channels: Option<i64>,
    met: Option<bool>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_pytorch_models_are_scanned_and_repaired_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t0 = std::time::Instant::now();

    // the data and two models trained in PyTorch
    let mnist = mnist_dir();
    if !deadbolt_core::data::mnist::idx_files_present(&mnist) {
        deadbolt_core::data::mnist::fetch_mnist(&mnist, None).unwrap();
    }
    let data = d.join("data");
    py(&[
        "prepare",
        "--mnist",
        &s(&mnist),
        "--out",
        &s(&data),
        "--defender",
        "1000",
    ]);
    let (defender, test) = (data.join("defender"), data.join("test"));
    let train = |name: &str, extra: &[&str]| -> PathBuf {
        let out = d.join(name);
        let (m, t, o) = (s(&mnist), s(&test), s(&out));
        let mut args = vec!["train", "--mnist", &m, "--test", &t, "--out", &o];
        args.extend_from_slice(extra);
        println!("{name}: {}", py(&args));
        out
    };
    let bd = train(
        "backdoored",
        &deadbolt_test_support::torch::RANDOM_PATCH_BACKDOOR,
    );
    let clean = train("clean", &[]);
    println!("models trained in {:.1} s", t0.elapsed().as_secs_f64());

    // every service in one process, on Postgres and S3
    let pg = Pg::fresh().await;
    let moto = Moto::shared();
    let bucket = format!("byom-{}", uuid::Uuid::new_v4().simple());
    moto.create_bucket(&bucket);
    let work = d.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let cfg_text = config(pg.url(), &format!("s3://{bucket}/a"), &work, &moto.config());
    let (all, cfg) = serve_all(d, &cfg_text);
    let url = all.url("gateway");

    // uploads with the CLI: the two models (weights + card) and the data
    for (name, m) in [("vendor-bd", &bd), ("vendor-clean", &clean)] {
        cli(&[
            "upload",
            "model",
            name,
            &s(&m.join("model.safetensors")),
            &s(&m.join("card.toml")),
            "--gateway",
            &url,
        ]);
    }
    let mut files: Vec<String> = std::fs::read_dir(&defender)
        .unwrap()
        .map(|e| s(&e.unwrap().path()))
        .collect();
    files.sort();
    let mut args = vec!["upload", "dataset", "clean-digits"];
    args.extend(files.iter().map(String::as_str));
    args.extend(["--gateway", &url]);
    cli(&args);
    // every other one of the same digits (500) as an image folder
    // (<class>/<n>.png), for the clean model's scan
    let folder = d.join("folder");
    let digits = deadbolt_core::data::folder::load_clean(
        &defender,
        deadbolt_core::data::folder::Split::All,
        &[],
        (1, 28, 28),
        10,
    )
    .unwrap()
    .data;
    let written = deadbolt_core::data::folder::write_image_folder(&digits, &folder, 2).unwrap();
    assert_eq!(written, 500);
    cli(&[
        "upload",
        "dataset",
        "clean-folder",
        &s(&folder),
        "--gateway",
        &url,
    ]);

    // refusals name their field
    let mut c = gateway(&url).await;
    let submit = |model: &str, data: &str, options: &str| pb::SubmitScanRequest {
        client_request_id: String::new(),
        model: model.into(),
        data: data.into(),
        repair: true,
        options_toml: options.into(),
        name: String::new(),
    };
    for (req, field) in [
        (submit("upload:nope", "upload:clean-digits", ""), "model"),
        (submit("upload:vendor-bd", "/etc", ""), "data"),
        (
            submit(
                "upload:vendor-bd",
                "upload:clean-digits",
                "[repair]\nfine_tune_epochs = 100000\n",
            ),
            "options_toml.repair.fine_tune_epochs",
        ),
        (
            submit(
                "upload:vendor-bd",
                "upload:clean-digits",
                "device = \"cuda\"\n",
            ),
            "options_toml.device",
        ),
        (
            // typed and range-checked at submit, as the stages read them
            submit(
                "upload:vendor-bd",
                "upload:clean-digits",
                "[repair]\ncriterion = \"l7\"\n",
            ),
            "options_toml.repair.criterion",
        ),
        (
            submit(
                "upload:vendor-bd",
                "upload:clean-digits",
                "[scan.cleanse]\nanomaly_threshold = -1.0\n",
            ),
            "options_toml.scan.cleanse.anomaly_threshold",
        ),
    ] {
        let e = c.submit_scan(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert_eq!(field_of(&e), vec![field.to_string()], "{e:?}");
    }

    // the clean model: a scan run over gRPC, on the image folder
    let clean_run = c
        .submit_scan(pb::SubmitScanRequest {
            client_request_id: "clean-scan".into(),
            model: "upload:vendor-clean".into(),
            data: "upload:clean-folder".into(),
            repair: false,
            options_toml: String::new(),
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    // ... and scanned and repaired: the repair cannot count as met when
    // the scan found no backdoor
    let clean_repair = c
        .submit_scan(pb::SubmitScanRequest {
            client_request_id: "clean-repair".into(),
            model: "upload:vendor-clean".into(),
            data: "upload:clean-digits".into(),
            repair: true,
            options_toml: String::new(),
            name: "vendor-clean-repair".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    // the backdoored one: scan and repair, submitted with the CLI
    let out = cli(&[
        "submit-scan",
        "--model",
        "upload:vendor-bd",
        "--data",
        "upload:clean-digits",
        "--repair",
        "--gateway",
        &url,
    ]);
    let bd_run = serde_json::from_str::<serde_json::Value>(out.lines().last().unwrap()).unwrap()
        ["run_id"]
        .as_str()
        .unwrap()
        .to_string();

    for id in [&clean_run, &clean_repair, &bd_run] {
        let (events, run) = watch(&mut c, id, Duration::from_secs(900)).await;
        assert_eq!(
            run.status,
            pb::JobStatus::Succeeded as i32,
            "{events:#?}\n{}",
            all.log_tail()
        );
    }
    println!("runs done after {:.1} s", t0.elapsed().as_secs_f64());

    // an experiment stage call on a scan run changes nothing
    let mut trainer =
        deadbolt_proto::v1::trainer_service_client::TrainerServiceClient::with_interceptor(
            channel(&all.url("trainer")).await,
            internal,
        );
    let e = trainer
        .train(pb::TrainRequest {
            run_id: bd_run.clone(),
            tag: pb::ModelTag::Clean as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // the dashboards' view
    let db = sqlx::PgPool::connect(pg.url()).await.unwrap();
    let rows: Vec<SummaryRow> = sqlx::query_as(
        "SELECT name, status, model, verdict, suspect_label, anomaly_index, repaired, \
         acc_before, asr_before, acc_after, asr_after, pruned_channels, met \
         FROM scan_summary ORDER BY model, repaired",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    println!("{rows:#?}");
    assert_eq!(rows.len(), 3, "{rows:?}");
    let (b, k, kr) = (&rows[0], &rows[1], &rows[2]);
    assert_eq!(
        (b.model.as_str(), k.model.as_str()),
        ("vendor-bd", "vendor-clean")
    );
    assert_eq!(
        (b.name.as_str(), b.status.as_str()),
        ("vendor-bd", "succeeded")
    );
    assert_eq!(b.verdict, "backdoored");
    assert_eq!(b.suspect_label, Some(3));
    assert!(b.anomaly_index.unwrap() > 2.0, "{b:?}");
    assert!(b.repaired && b.met.is_some() && b.pruned_channels.is_some());
    assert_ne!(k.verdict, "backdoored", "{k:?}");
    assert!(!k.repaired && k.met.is_none() && k.acc_after.is_none());
    assert_eq!(kr.name, "vendor-clean-repair");
    assert_eq!(kr.verdict, k.verdict);
    assert!(kr.repaired && kr.acc_after.is_some(), "{kr:?}");
    assert_eq!(
        kr.met,
        Some(false),
        "a repair of a model the scan cleared met: {kr:?}"
    );

    // the repaired model and reports, downloaded and sha256-checked
    let download = |run: &str, dir: &str| -> (PathBuf, serde_json::Value) {
        let got = d.join(dir);
        cli(&[
            "report",
            run,
            "--out",
            &s(&got),
            "--gateway",
            &url,
            "--config",
            &s(&cfg),
        ]);
        let scan = std::fs::read_to_string(got.join("scan/report.json")).unwrap();
        (got, serde_json::from_str(&scan).unwrap())
    };
    let (got, scan) = download(&bd_run, "got");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(got.join("repair/report.json")).unwrap())
            .unwrap();
    let fig = |k: &str, m: &str| report[k][m]["value"].as_f64().unwrap();
    assert_eq!(b.acc_before, Some(fig("original", "acc")));
    assert_eq!(b.asr_before, Some(fig("original", "asr")));
    assert_eq!(b.acc_after, Some(fig("repaired", "acc")));
    assert_eq!(b.asr_after, Some(fig("repaired", "asr")));
    assert_eq!(b.pruned_channels, report["k"].as_i64());
    assert_eq!(scan["verdict"], "backdoored");
    // the clean model's scan read the image folder, classes kept
    let (_, scan) = download(&clean_run, "got-clean");
    assert_eq!(scan["data"]["source"], "image-folder", "{}", scan["data"]);
    assert_eq!(scan["data"]["images"], 500);
    assert_ne!(scan["verdict"], "backdoored");

    // PyTorch on the repaired model, test digits and the real trigger the
    // repair never saw
    let trigger = s(&bd.join("trigger.safetensors"));
    let eval = |model: &Path, card: &Path| {
        py(&[
            "evaluate",
            "--model",
            &s(model),
            "--card",
            &s(card),
            "--data",
            &s(&test),
            "--trigger",
            &trigger,
            "--target",
            "3",
        ])
    };
    let before = eval(&bd.join("model.safetensors"), &bd.join("card.toml"));
    let after = eval(
        &got.join("repair/model.safetensors"),
        &got.join("repair/card.toml"),
    );
    println!("unseen test set, real trigger: {before} -> {after}");
    let (acc0, asr0) = (
        before["acc"].as_f64().unwrap(),
        before["asr"].as_f64().unwrap(),
    );
    let (acc1, asr1) = (
        after["acc"].as_f64().unwrap(),
        after["asr"].as_f64().unwrap(),
    );
    assert!(asr0 >= 0.95, "the PyTorch backdoor did not take: {before}");
    assert!(asr1 <= 0.05, "real-trigger ASR after the repair: {after}");
    assert!(acc0 - acc1 <= 0.02, "ACC {acc0} -> {acc1}");
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
}
