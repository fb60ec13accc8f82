//! The seed's defense on real MNIST digits with the default spec
//! (`examples/mnist-badnets.toml`, with `fine_tune_epochs = 2`): trains a clean and a backdoored BadNet
//! CNN, analyses, reverse-engineers the trigger and prunes with every
//! criterion. The IDX files are fetched by `fetch_mnist` into
//! `$DEADBOLT_DATA_DIR/mnist` (default `<workspace>/data/mnist`) when
//! missing (`data::load` reads a named folder as given). Set
//! `DEADBOLT_TEST_OUT` to keep the run folder (and reuse its checkpoints).

use std::path::PathBuf;

use deadbolt_core::progress::Silent;
use deadbolt_core::spec::{Criterion, ExperimentSpec};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn linf_pruning_removes_the_badnets_backdoor_on_real_mnist() {
    let _ = tracing_subscriber_init();
    let mut spec =
        ExperimentSpec::from_file(&workspace().join("examples/mnist-badnets.toml")).unwrap();
    let data = std::env::var_os("DEADBOLT_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("data"));
    spec.dataset.path = Some(data.join("mnist"));
    let dir = data.join("mnist");
    if !deadbolt_core::data::mnist::idx_files_present(&dir) {
        deadbolt_core::data::mnist::fetch_mnist(&dir, None).unwrap();
    }
    // the defense as delivered: k chosen with the fine-tuning in the loop.
    // Choosing k from the pruning-only validation curve met the test target
    // on 8 of 12 training seeds (scripts/experiment-seeds.sh), and on one
    // CPU (AMD, MKL's zen kernels) the default seed's choice lands at 5.06%
    // test ASR; with the fine-tuned search 24 of 24 (seeds 0-11, real and
    // synthetic trigger)
    spec.defense.fine_tune_epochs = 2;
    let keep = std::env::var_os("DEADBOLT_TEST_OUT").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let out = keep.unwrap_or_else(|| tmp.path().to_path_buf());
    let r = deadbolt_core::pipeline::experiment::run(&spec, &out, &Silent).unwrap();

    let line = |name: &str, p: &deadbolt_core::eval::CurvePoint, k_t: Option<usize>| {
        println!(
            "{name:<24} k={:>2} acc={:.4} asr={:.4} ra={:.4} (k for asr<=5% on test: {k_t:?})",
            p.k, p.acc, p.asr, p.ra
        )
    };
    println!(
        "clean model: acc={:.4} asr={:.4}; backdoored: acc={:.4} asr={:.4} ra={:.4}",
        r.clean_model.acc,
        r.clean_model.asr.unwrap(),
        r.backdoored_model.acc,
        r.backdoored_model.asr.unwrap(),
        r.backdoored_model.ra.unwrap()
    );
    for (n, s) in &r.separation {
        println!(
            "separation {:<5} max ratio {:.2} (channel {}), {} channels >= 2x, {} outliers",
            n.as_str(),
            s.max_ratio,
            s.top_channel,
            s.above_threshold,
            s.outliers
        );
    }
    println!(
        "synthetic trigger: flagged {:?}, anomaly index {:?}",
        r.synthetic_trigger.summary.flagged_labels, r.synthetic_trigger.summary.anomaly_index
    );
    for (c, p) in &r.pruning {
        line(c.as_str(), &p.chosen, p.k_for_target_asr);
    }
    for (c, p) in &r.pruning_synthetic {
        line(
            &format!("{} (synthetic)", c.as_str()),
            &p.chosen,
            p.k_for_target_asr,
        );
    }
    println!("gradcam: {:?}", r.gradcam.mass_in_trigger);
    println!("timings: {:?}", r.timings);

    assert!(out.join("report.json").is_file() && out.join("report.md").is_file());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    for key in [
        "/clean_model/acc",
        "/backdoored_model/asr",
        "/separation/linf/max_ratio",
        "/synthetic_trigger/flagged_labels",
        "/pruning/linf/curve/3/asr",
        "/pruning/linf/chosen/k",
    ] {
        assert!(json.pointer(key).is_some(), "report.json lacks {key}");
    }

    let base = r.backdoored_model.acc;
    assert!(
        r.backdoored_model.asr.unwrap() > 0.9,
        "the attack did not take"
    );
    let linf = &r.pruning[&Criterion::Linf];
    let repaired = linf.fine_tuned.expect("fine-tuned figures");
    println!(
        "linf + fine-tuning      k={:>2} acc={:.4} asr={:.4} ra={:.4}",
        repaired.k, repaired.acc, repaired.asr, repaired.ra
    );
    assert!(repaired.asr <= 0.05, "linf + fine-tuning ASR {repaired:?}");
    assert!(
        base - repaired.acc <= 0.02,
        "linf + fine-tuning ACC drop {repaired:?} from {base}"
    );
    // the paper's claim about the ranking itself: a few l_inf-ranked
    // channels carry the backdoor (the pruning-only test curve)
    let k = linf
        .k_for_target_asr
        .expect("l_inf pruning reaches the ASR target");
    assert!(k <= 8, "linf needs {k} channels");
    // pruning alone, k chosen on the validation curve as with
    // fine_tune_epochs = 0: within the ACC budget on test with few
    // channels (its test ASR is the figure that moves with the CPU, above)
    let alone = deadbolt_core::defense::prune::choose_k(
        &linf.validation_curve,
        spec.defense.target_asr,
        spec.defense.max_acc_drop,
    )
    .unwrap();
    let at = linf.curve[alone.k];
    println!(
        "linf, pruning alone     k={:>2} acc={:.4} asr={:.4} ra={:.4}",
        at.k, at.acc, at.asr, at.ra
    );
    assert!(alone.k <= 8, "linf pruned {} channels", alone.k);
    assert!(base - at.acc <= 0.02, "linf ACC drop {at:?} from {base}");
    assert!(
        at.asr < 0.5 * r.backdoored_model.asr.unwrap(),
        "linf pruning alone left ASR {at:?}"
    );
    // linf needs no more channels than l1, l2 and fine-pruning for the same ASR
    let need = |c: Criterion| r.pruning[&c].k_for_target_asr.unwrap_or(usize::MAX);
    for c in [Criterion::L1, Criterion::L2, Criterion::FinePruning] {
        assert!(
            need(Criterion::Linf) <= need(c),
            "linf needs {} channels, {} needs {}",
            need(Criterion::Linf),
            c.as_str(),
            need(c)
        );
    }
    let sep = |n: &str| {
        r.separation
            .iter()
            .find(|(k, _)| k.as_str() == n)
            .unwrap()
            .1
            .max_ratio
    };
    assert!(
        sep("linf") > sep("l1") && sep("linf") > sep("l2"),
        "separations {:?}",
        r.separation.keys()
    );
    assert!(
        r.synthetic_trigger
            .summary
            .flagged_labels
            .contains(&spec.attack.as_ref().unwrap().target),
        "synthetic trigger flagged {:?}",
        r.synthetic_trigger.summary.flagged_labels
    );
}

fn tracing_subscriber_init() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init()
}
