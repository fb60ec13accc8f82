//! Benchmark: the pruning sweep over every k = 0..=C for every criterion,
//! with cached activations (features once per evaluation set, only the head
//! per k) vs re-running the whole model per k.
//!
//!     source scripts/env.sh
//!     cargo run --release -p deadbolt-core --example sweep -- [RUN_DIR]
//!
//! RUN_DIR is an experiment folder (`deadbolt experiment ... --out RUN_DIR`
//! or the real-data test's `DEADBOLT_TEST_OUT`); its `backdoored/`
//! checkpoint is used, and trained there (default spec) when missing.
//! Prints both timings and the ratio.

use std::path::PathBuf;
use std::time::Instant;

use deadbolt_core::analysis::stats;
use deadbolt_core::experiment;
use deadbolt_core::model::Model;
use deadbolt_core::progress::Silent;
use deadbolt_core::prune;
use deadbolt_core::spec::{Criterion, ExperimentSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("runs/bench-sweep"));
    let mut spec = ExperimentSpec::from_file(&root.join("examples/mnist-badnets.toml"))?;
    if spec.dataset.path.is_none() && std::env::var_os("DEADBOLT_DATA_DIR").is_none() {
        spec.dataset.path = Some(root.join("data/mnist"));
    }
    let data = experiment::stage_data(&spec)?;
    let attack = data.attack.as_ref().ok_or("the spec has no attack")?;
    let ckpt = dir.join("backdoored");
    if !ckpt.join("model.safetensors").is_file() {
        eprintln!("training a backdoored model into {}", ckpt.display());
        experiment::stage_train(
            &spec,
            &data.poisoned.data,
            &data.test,
            Some(attack),
            &ckpt,
            &Silent,
        )?;
    }
    let device = deadbolt_core::device::resolve(spec.training.device)?;
    let (mut model, _) = Model::load(&ckpt, device)?;
    let layer = experiment::resolve_layer(&spec, &model)?;
    let channels = model.layer(&layer)?.channels;
    let ks = prune::all_ks(channels);
    let imgs = experiment::stats_sample(&spec, &data.val).images;
    let clean = stats::collect(&model, &layer, &imgs, 250)?;
    let trig = stats::collect(&model, &layer, &attack.trigger.apply(&imgs), 250)?;
    let orders: Vec<(Criterion, Vec<i64>)> = Criterion::ALL
        .iter()
        .map(|c| Ok((*c, prune::rank(*c, &clean, &trig, 0)?.order)))
        .collect::<deadbolt_core::Result<_>>()?;
    let test_trig = attack.triggered(&data.test);
    println!(
        "device {}, layer {layer} ({channels} channels), {} criteria x {} k, {} clean + {} triggered test images",
        deadbolt_core::device::describe(device),
        orders.len(),
        ks.len(),
        data.test.len(),
        test_trig.len()
    );

    let t = Instant::now();
    let cache = prune::cache_features(&model, &layer, &data.test, &test_trig)?;
    let mut cached = Vec::new();
    for (_, order) in &orders {
        cached.push(prune::sweep_cached(&model, &cache, order, &ks)?);
    }
    let t_cached = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut naive = Vec::new();
    for (_, order) in &orders {
        naive.push(prune::sweep_naive(
            &mut model, &layer, &data.test, &test_trig, order, &ks,
        )?);
    }
    let t_naive = t.elapsed().as_secs_f64();

    let mut max_diff = 0f64;
    for (a, b) in cached.iter().flatten().zip(naive.iter().flatten()) {
        max_diff = max_diff
            .max((a.acc - b.acc).abs())
            .max((a.asr - b.asr).abs());
    }
    println!("cached sweep (features once, head per k): {t_cached:.3} s");
    println!("naive sweep (whole model per k):          {t_naive:.3} s");
    println!(
        "speed-up: {:.1}x (max |difference| of ACC/ASR between the two: {max_diff:.2e})",
        t_naive / t_cached
    );
    Ok(())
}
