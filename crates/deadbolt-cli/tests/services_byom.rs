//! Bring your own model over gRPC (every service in one `deadbolt serve`
//! process, Postgres, S3 on loopback, shared by the tests of this file):
//! two MNIST CNNs trained **in PyTorch** (`scripts/byom_torch.py`, the
//! project's torch virtualenv), a clean one and one backdoored with a 4x4
//! random binary patch at rows 3-6, columns 12-15 relabelled to 3 (a
//! trigger deadbolt's own trigger code cannot make), are uploaded with
//! `deadbolt upload model`, the defender's 1,000 clean digits with
//! `deadbolt upload dataset` (as IDX files, and 500 of them as an image
//! folder `<class>/<n>.png`). Three runs: a scan of the clean model on the
//! image folder (`SubmitScan`, no repair), a scan + repair of the clean
//! model, and a scan + repair of the backdoored one (`deadbolt submit-scan
//! --repair`).
//!
//! - hostile or over-limit requests are refused naming their field;
//! - the three runs succeed, and a stage call of the other run kind is
//!   FAILED_PRECONDITION;
//! - the `scan_summary` view (Postgres) says `backdoored`, label 3, for the
//!   backdoored model and not `backdoored` for the clean one, with the
//!   repair's figures equal to the run's repair report; a repair of the
//!   clean model never counts as met (the scan found no backdoor to remove);
//! - `deadbolt report` downloads the repaired model; PyTorch loads it and,
//!   on test digits the repair never saw, with the real trigger it never
//!   saw: ASR <= 5% and ACC at most 2 points below the original model's.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use deadbolt_proto::v1 as pb;
use deadbolt_test_support::specs::mnist_dir;
use deadbolt_test_support::torch::byom_torch as py;
use tonic::Code;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The served cluster with the two models and the data uploaded.
struct Byom {
    dir: tempfile::TempDir,
    pg: Pg,
    _moto: std::sync::Arc<Moto>,
    all: Proc,
    /// The config file of the serving process (for `deadbolt report`).
    cfg: PathBuf,
    /// The PyTorch models' folders (weights, card, the real trigger).
    backdoored: PathBuf,
    /// The test digits the repair never sees.
    test: PathBuf,
    t0: Instant,
}

impl Byom {
    fn url(&self) -> String {
        self.all.url("gateway")
    }

    /// `deadbolt report RUN` into `<dir>/<into>`; the folder and its
    /// `scan/report.json`.
    fn download(&self, run: &str, into: &str) -> (PathBuf, serde_json::Value) {
        let got = self.dir.path().join(into);
        cli(&[
            "report",
            run,
            "--out",
            &s(&got),
            "--gateway",
            &self.url(),
            "--config",
            &s(&self.cfg),
        ]);
        let scan = std::fs::read_to_string(got.join("scan/report.json")).unwrap();
        (got, serde_json::from_str(&scan).unwrap())
    }
}

fn byom() -> &'static Byom {
    static BYOM: OnceLock<Result<Byom, String>> = OnceLock::new();
    fixture::shared(&BYOM, || async {
        let t0 = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fixture::remove_at_exit(d);

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
        let backdoored = train(
            "backdoored",
            &deadbolt_test_support::torch::RANDOM_PATCH_BACKDOOR,
        );
        let clean = train("clean", &[]);
        println!("models trained in {:.1} s", t0.elapsed().as_secs_f64());

        // every service in one process, on Postgres and S3
        let pg = Pg::fresh().await;
        pg.drop_at_exit();
        let (moto, art_url) = s3_bucket("byom");
        let work = d.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let cfg_text = config(pg.url(), &art_url, &work, &moto.config());
        let (all, cfg) = serve_all(d, &cfg_text);
        fixture::kill_at_exit(all.pid());
        let url = all.url("gateway");

        // uploads with the CLI: the two models (weights + card) and the data
        for (name, m) in [("vendor-bd", &backdoored), ("vendor-clean", &clean)] {
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
        Byom {
            dir,
            pg,
            _moto: moto,
            all,
            cfg,
            backdoored,
            test,
            t0,
        }
    })
}

/// The three runs, finished (the clean model's scan and repair is only
/// in `done`).
struct Runs {
    /// The clean model's scan on the image folder.
    clean_scan: String,
    /// The backdoored model's scan and repair.
    backdoored: String,
    /// Each run's final state: (run id, the run, its events).
    done: Vec<(String, pb::Run, Vec<pb::RunEvent>)>,
}

fn runs() -> &'static Runs {
    static RUNS: OnceLock<Result<Runs, String>> = OnceLock::new();
    fixture::shared(&RUNS, || async {
        let b = byom();
        let url = b.url();
        let mut c = gateway(&url).await;
        let clean_scan = c
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
        // the backdoored one, submitted with the CLI
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
        let backdoored = serde_json::from_str::<serde_json::Value>(out.lines().last().unwrap())
            .unwrap()["run_id"]
            .as_str()
            .unwrap()
            .to_string();
        let mut done = Vec::new();
        for id in [&clean_scan, &clean_repair, &backdoored] {
            let (events, run) = watch(&mut c, id, Duration::from_secs(900)).await;
            done.push((id.clone(), run, events));
        }
        println!("runs done after {:.1} s", b.t0.elapsed().as_secs_f64());
        Runs {
            clean_scan,
            backdoored,
            done,
        }
    })
}

/// [`runs`], which must all have succeeded (`the_three_runs_succeed` says
/// why not).
fn succeeded() -> &'static Runs {
    let r = runs();
    assert!(
        r.done
            .iter()
            .all(|(_, run, _)| run.status == pb::JobStatus::Succeeded as i32),
        "a run failed: see the_three_runs_succeed"
    );
    r
}

// ---- refusals name their field ----

async fn refused_scan(model: &str, data: &str, options: &str, field: &str) {
    let e = gateway(&byom().url())
        .await
        .submit_scan(pb::SubmitScanRequest {
            client_request_id: String::new(),
            model: model.into(),
            data: data.into(),
            repair: true,
            options_toml: options.into(),
            name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(field_of(&e), vec![field.to_string()], "{e:?}");
}

/// A test that a scan of `$model` on `$data` with `$options` is refused
/// naming `$field`.
macro_rules! refused_scan {
    ($test:ident, $model:literal, $data:literal, $options:literal, $field:literal) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            refused_scan($model, $data, $options, $field).await;
        }
    };
}

refused_scan!(
    a_scan_of_a_model_never_uploaded_names_model,
    "upload:nope",
    "upload:clean-digits",
    "",
    "model"
);
refused_scan!(
    a_scan_naming_a_server_path_names_data,
    "upload:vendor-bd",
    "/etc",
    "",
    "data"
);
refused_scan!(
    fine_tune_epochs_over_the_limit_name_their_option,
    "upload:vendor-bd",
    "upload:clean-digits",
    "[repair]\nfine_tune_epochs = 100000\n",
    "options_toml.repair.fine_tune_epochs"
);
refused_scan!(
    a_device_option_names_options_toml_device,
    "upload:vendor-bd",
    "upload:clean-digits",
    "device = \"cuda\"\n",
    "options_toml.device"
);
// typed and range-checked at submit, as the stages read them
refused_scan!(
    an_unknown_repair_criterion_is_refused_at_submit,
    "upload:vendor-bd",
    "upload:clean-digits",
    "[repair]\ncriterion = \"l7\"\n",
    "options_toml.repair.criterion"
);
refused_scan!(
    a_negative_anomaly_threshold_is_refused_at_submit,
    "upload:vendor-bd",
    "upload:clean-digits",
    "[scan.cleanse]\nanomaly_threshold = -1.0\n",
    "options_toml.scan.cleanse.anomaly_threshold"
);

// ---- the runs ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_runs_succeed() {
    for (id, run, events) in &runs().done {
        assert_eq!(
            run.status,
            pb::JobStatus::Succeeded as i32,
            "run {id}: {}\n{events:#?}\n{}",
            run.error,
            byom().all.log_tail()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_experiment_stage_call_on_a_scan_run_is_failed_precondition() {
    let run_id = succeeded().backdoored.clone();
    let mut trainer =
        deadbolt_proto::v1::trainer_service_client::TrainerServiceClient::with_interceptor(
            channel(&byom().all.url("trainer")).await,
            internal,
        );
    let e = trainer
        .train(pb::TrainRequest {
            run_id,
            tag: pb::ModelTag::Clean as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
}

// ---- the dashboards' view ----

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

/// The `scan_summary` rows of the three runs: the backdoored model's
/// repair, the clean model's scan, the clean model's repair.
async fn summary() -> [SummaryRow; 3] {
    succeeded();
    let db = sqlx::PgPool::connect(byom().pg.url()).await.unwrap();
    let rows: Vec<SummaryRow> = sqlx::query_as(
        "SELECT name, status, model, verdict, suspect_label, anomaly_index, repaired, \
         acc_before, asr_before, acc_after, asr_after, pruned_channels, met \
         FROM scan_summary ORDER BY model, repaired",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    db.close().await;
    println!("{rows:#?}");
    let rows: [SummaryRow; 3] = rows
        .try_into()
        .unwrap_or_else(|r: Vec<SummaryRow>| panic!("not 3 rows: {r:?}"));
    assert_eq!(
        (rows[0].model.as_str(), rows[1].model.as_str()),
        ("vendor-bd", "vendor-clean")
    );
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backdoored_model_is_found_backdoored_with_label_3() {
    let [b, _, _] = summary().await;
    assert_eq!(
        (b.name.as_str(), b.status.as_str()),
        ("vendor-bd", "succeeded")
    );
    assert_eq!(b.verdict, "backdoored");
    assert_eq!(b.suspect_label, Some(3));
    assert!(b.anomaly_index.unwrap() > 2.0, "{b:?}");
    assert!(b.repaired && b.met.is_some() && b.pruned_channels.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clean_model_is_not_found_backdoored() {
    let [_, k, _] = summary().await;
    assert_ne!(k.verdict, "backdoored", "{k:?}");
    assert!(!k.repaired && k.met.is_none() && k.acc_after.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_of_a_model_the_scan_cleared_never_counts_as_met() {
    let [_, k, kr] = summary().await;
    assert_eq!(kr.name, "vendor-clean-repair");
    assert_eq!(kr.verdict, k.verdict);
    assert!(kr.repaired && kr.acc_after.is_some(), "{kr:?}");
    assert_eq!(
        kr.met,
        Some(false),
        "a repair of a model the scan cleared met: {kr:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_shows_the_repair_reports_figures() {
    let [b, _, _] = summary().await;
    // the repaired model and reports, downloaded and sha256-checked
    let (got, scan) = byom().download(&succeeded().backdoored, "got-view");
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clean_models_scan_reads_the_image_folder() {
    let (_, scan) = byom().download(&succeeded().clean_scan, "got-clean");
    // classes kept
    assert_eq!(scan["data"]["source"], "image-folder", "{}", scan["data"]);
    assert_eq!(scan["data"]["images"], 500);
    assert_ne!(scan["verdict"], "backdoored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repaired_model_defeats_the_real_trigger_in_pytorch() {
    let b = byom();
    let (got, _) = b.download(&succeeded().backdoored, "got-torch");
    // PyTorch on the repaired model, test digits and the real trigger the
    // repair never saw
    let bd = &b.backdoored;
    let trigger = s(&bd.join("trigger.safetensors"));
    let eval = |model: &Path, card: &Path| {
        py(&[
            "evaluate",
            "--model",
            &s(model),
            "--card",
            &s(card),
            "--data",
            &s(&b.test),
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
    println!("total {:.1} s", b.t0.elapsed().as_secs_f64());
}
