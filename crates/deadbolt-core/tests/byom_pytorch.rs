//! Bring your own model, end to end, on models deadbolt did not train.
//!
//! `scripts/byom_torch.py` trains two small CNNs **in PyTorch** (the
//! project's torch virtualenv) on the real MNIST digits: a clean one, and
//! one backdoored with a 4x4 random binary patch at rows 3-6, columns 12-15
//! (top centre, not a corner; deadbolt's trigger code makes only solid,
//! checkerboard or image patches) relabelled to 3 at a 10% rate, inputs
//! normalised with MNIST's mean/std. It exports both as safetensors
//! state_dicts with a model card. The test split of the digits is divided
//! into a defender's clean set (an image folder of PNGs here) and a test
//! set that scan and repair never see.
//!
//! - `scan` says `backdoored`, label 3, for the second model and not
//!   `backdoored` for the first;
//! - `repair` of the second: on the unseen test set, ASR with the real
//!   trigger (which the repair never sees) <= 5% and ACC at most 2 points
//!   below the original model's;
//! - the repaired safetensors load in PyTorch (strict `load_state_dict`)
//!   and PyTorch's predictions equal deadbolt's on 200 test images.
//!
//! `DEADBOLT_BYOM_SEED` picks the training seed (default 0);
//! `DEADBOLT_TEST_OUT` keeps the work folder (and reuses trained models).

use std::path::{Path, PathBuf};

use deadbolt_core::byom::card::{self, ModelCard};
use deadbolt_core::byom::repair::{self, RepairOptions};
use deadbolt_core::byom::scan::{self, ScanOptions, Verdict};
use deadbolt_core::data::folder::Split;
use deadbolt_core::data::idx;
use deadbolt_core::defense::cleanse::load_trigger;
use deadbolt_core::progress::Silent;
use tch::Device;

const TARGET: i64 = 3;

use deadbolt_test_support::torch::byom_torch as py;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn mnist_dir() -> PathBuf {
    let dir = std::env::var_os("DEADBOLT_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("data"))
        .join("mnist");
    if !deadbolt_core::data::mnist::idx_files_present(&dir) {
        deadbolt_core::data::mnist::fetch_mnist(&dir, None).unwrap();
    }
    dir
}

/// ACC and ASR (real trigger, image space) of a model on IDX test files.
fn acc_asr(
    model: &deadbolt_core::model::Model,
    card: &ModelCard,
    dir: &Path,
    trigger: &Path,
) -> (f64, f64) {
    let x = idx::read_images(&dir.join("t10k-images-idx3-ubyte")).unwrap();
    let y = idx::read_labels(&dir.join("t10k-labels-idx1-ubyte")).unwrap();
    let norm = card.normalizer();
    let p = repair::predict_images(model, &norm, &x);
    let acc = deadbolt_core::eval::share_equal(&p, &y);
    let t = load_trigger(trigger).unwrap();
    let keep = y.ne(TARGET).nonzero().squeeze_dim(1);
    let xt = t.apply(&x.index_select(0, &keep));
    let p = repair::predict_images(model, &norm, &xt);
    let asr = deadbolt_core::eval::share_equal(&p, &p.full_like(TARGET));
    (acc, asr)
}

#[test]
fn pytorch_models_scanned_and_repaired_on_real_mnist() {
    tch::set_num_threads(2);
    let seed: u64 = std::env::var("DEADBOLT_BYOM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let keep = std::env::var_os("DEADBOLT_TEST_OUT").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let work = keep.unwrap_or_else(|| tmp.path().to_path_buf());
    let mnist = mnist_dir();
    let s = |p: &Path| p.display().to_string();
    let t0 = std::time::Instant::now();

    // data: the defender's clean images (PNG folder) and an unseen test set
    let data = work.join("data");
    if !data.join("test/t10k-images-idx3-ubyte").is_file() {
        py(&[
            "prepare",
            "--mnist",
            &s(&mnist),
            "--out",
            &s(&data),
            "--defender",
            "1000",
        ]);
    }
    let folder = data.join("defender-png");
    if !folder.join("9").is_dir() {
        let defender = deadbolt_core::data::folder::load_clean(
            &data.join("defender"),
            Split::Test,
            &[],
            (1, 28, 28),
            10,
        )
        .unwrap();
        deadbolt_core::data::folder::write_image_folder(&defender.data, &folder, 1).unwrap();
    }
    let test = data.join("test");

    // two models trained in PyTorch
    let seed_s = seed.to_string();
    let train = |name: &str, extra: &[&str]| -> PathBuf {
        let dir = work.join(format!("{name}-{seed}"));
        if !dir.join("metrics.json").is_file() {
            let (m, t, d) = (s(&mnist), s(&test), s(&dir));
            let mut args = vec![
                "train", "--mnist", &m, "--test", &t, "--seed", &seed_s, "--out", &d,
            ];
            args.extend_from_slice(extra);
            let m = py(&args);
            println!("{name}: {m}");
        }
        dir
    };
    let clean = train("clean", &[]);
    let bd = train(
        "backdoored",
        &deadbolt_test_support::torch::RANDOM_PATCH_BACKDOOR,
    );
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bd.join("metrics.json")).unwrap()).unwrap();
    assert!(
        metrics["asr"].as_f64().unwrap() >= 0.95 && metrics["acc"].as_f64().unwrap() >= 0.95,
        "the PyTorch backdoor did not take: {metrics}"
    );
    println!("models ready after {:.1} s", t0.elapsed().as_secs_f64());

    // scan both
    let open = |dir: &Path| {
        scan::open(
            &dir.join("model.safetensors"),
            Some(&dir.join("card.toml")),
            &folder,
            Split::Test,
            None,
            Device::Cpu,
        )
        .unwrap()
    };
    let opts = ScanOptions::default();
    let t = std::time::Instant::now();
    let rc = scan::scan(
        &open(&clean),
        &opts,
        &work.join(format!("scan-clean-{seed}")),
        &Silent,
    )
    .unwrap();
    println!(
        "scan clean: {} {:?} anomaly {:?} ({:.1} s)",
        rc.verdict.as_str(),
        rc.reasons,
        rc.reverse.anomaly_index,
        t.elapsed().as_secs_f64()
    );
    let t = std::time::Instant::now();
    let subject = open(&bd);
    let rb = scan::scan(
        &subject,
        &opts,
        &work.join(format!("scan-bd-{seed}")),
        &Silent,
    )
    .unwrap();
    println!(
        "scan backdoored: {} {:?} anomaly {:?} ({:.1} s)",
        rb.verdict.as_str(),
        rb.reasons,
        rb.reverse.anomaly_index,
        t.elapsed().as_secs_f64()
    );
    assert_ne!(rc.verdict, Verdict::Backdoored, "{:#?}", rc.reasons);
    assert_eq!(rb.verdict, Verdict::Backdoored, "{:#?}", rb.reasons);
    assert_eq!(
        rb.suspect_labels.first(),
        Some(&TARGET),
        "{:#?}",
        rb.reasons
    );
    for f in ["report.json", "report.md", "gradcam.png", "triggers.png"] {
        assert!(
            work.join(format!("scan-bd-{seed}")).join(f).is_file(),
            "{f}"
        );
    }

    // repair the backdoored one, judged on the unseen test set with the real trigger
    let t = std::time::Instant::now();
    let out = work.join(format!("repair-{seed}"));
    let rr = repair::repair(&subject, &RepairOptions::default(), &out, &Silent).unwrap();
    println!(
        "repair: met {} k {} channels {:?}; held-out ACC {} -> {}, synthetic ASR {} -> {} ({:.1} s)",
        rr.met(),
        rr.k,
        rr.pruned_channels,
        rr.original.acc,
        rr.repaired.acc,
        rr.original.asr,
        rr.repaired.asr,
        t.elapsed().as_secs_f64()
    );
    let card = ModelCard::from_file(&bd.join("card.toml")).unwrap();
    let trigger = bd.join("trigger.safetensors");
    let (acc0, asr0) = acc_asr(&subject.loaded.model, &card, &test, &trigger);
    let repaired = card::load_model(&out.join("model.safetensors"), &card, Device::Cpu).unwrap();
    let (acc1, asr1) = acc_asr(&repaired.model, &card, &test, &trigger);
    println!(
        "unseen test set, real trigger: ACC {:.2}% -> {:.2}%, ASR {:.2}% -> {:.2}%",
        100.0 * acc0,
        100.0 * acc1,
        100.0 * asr0,
        100.0 * asr1
    );
    assert!(asr0 >= 0.95, "{asr0}");
    assert!(asr1 <= 0.05, "real-trigger ASR after repair {asr1}");
    assert!(acc0 - acc1 <= 0.02, "ACC {acc0} -> {acc1}");
    assert!(rr.met(), "{:?}", rr.outcome);

    // PyTorch loads the repaired model unchanged and predicts as deadbolt does
    let preds = out.join("torch_predictions.json");
    py(&[
        "predict",
        "--model",
        &s(&out.join("model.safetensors")),
        "--card",
        &s(&out.join("card.toml")),
        "--data",
        &s(&test),
        "--n",
        "200",
        "--out",
        &s(&preds),
    ]);
    let torch: Vec<i64> = serde_json::from_str(&std::fs::read_to_string(&preds).unwrap()).unwrap();
    let x = idx::read_images(&test.join("t10k-images-idx3-ubyte"))
        .unwrap()
        .narrow(0, 0, 200);
    let ours: Vec<i64> = Vec::try_from(repair::predict_images(
        &repaired.model,
        &card.normalizer(),
        &x,
    ))
    .unwrap();
    assert_eq!(torch.len(), 200);
    assert_eq!(
        torch, ours,
        "PyTorch and deadbolt disagree on the repaired model"
    );
    let e = py(&[
        "evaluate",
        "--model",
        &s(&out.join("model.safetensors")),
        "--card",
        &s(&out.join("card.toml")),
        "--data",
        &s(&test),
        "--trigger",
        &s(&trigger),
        "--target",
        "3",
    ]);
    println!("PyTorch on the repaired model: {e}");
    assert!((e["acc"].as_f64().unwrap() - acc1).abs() < 1e-9, "{e}");
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
}
