//! Benchmark: the pruning sweep over every k = 0..=C for every criterion,
//! with cached activations (features once per evaluation set, then per k
//! either the incremental update of the head's pre-activations, which is
//! what `sweep_cached` does for the default layer, or the whole head) vs
//! re-running the whole model per k.
//!
//!     source scripts/env.sh
//!     cargo run --release -p deadbolt-core --example sweep -- [RUN_DIR] [--repeats R]
//!
//! RUN_DIR is an experiment folder (`deadbolt experiment ... --out RUN_DIR`
//! or the real-data test's `DEADBOLT_TEST_OUT`); its `backdoored/`
//! checkpoint is used, and trained there (default spec) when missing.
//! The three sweeps run interleaved R times (default 3); prints each one's
//! median and range, the ratios of the medians, and the largest difference
//! of ACC/ASR/RA between the cached sweeps and the naive one.

use std::path::PathBuf;
use std::time::Instant;

use deadbolt_core::defense::prune;
use deadbolt_core::defense::stats;
use deadbolt_core::model::Model;
use deadbolt_core::pipeline::experiment;
use deadbolt_core::progress::Silent;
use deadbolt_core::spec::{Criterion, ExperimentSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut dir = root.join("runs/bench-sweep");
    let mut repeats = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--repeats" => {
                repeats = args
                    .next()
                    .and_then(|r| r.parse().ok())
                    .filter(|&r| r > 0)
                    .ok_or("--repeats needs a positive count")?
            }
            _ => dir = PathBuf::from(a),
        }
    }
    let mut spec = ExperimentSpec::from_file(&root.join("examples/mnist-badnets.toml"))?;
    if spec.dataset.path.is_none() && std::env::var_os("DEADBOLT_DATA_DIR").is_none() {
        spec.dataset.path = Some(root.join("data/mnist"));
    }
    // a named folder is read as given: fill it first when it is missing
    if let Some(dir) = spec.dataset.path.as_deref() {
        if !deadbolt_core::data::mnist::idx_files_present(dir) {
            deadbolt_core::data::mnist::fetch_mnist(dir, None)?;
        }
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

    let mut times: [Vec<f64>; 3] = Default::default();
    let mut max_diff = [0f64; 2];
    for _ in 0..repeats {
        // cached, incremental (what `sweep_cached` does for this layer)
        let t = Instant::now();
        let cache = prune::cache_features(&model, &layer, &data.test, &test_trig)?;
        let mut incremental = Vec::new();
        for (_, order) in &orders {
            incremental.push(prune::sweep_cached(&model, &cache, order, &ks)?);
        }
        times[0].push(t.elapsed().as_secs_f64());
        drop(cache);

        // cached, the whole head per k
        let t = Instant::now();
        let cache = prune::cache_features(&model, &layer, &data.test, &test_trig)?;
        let mut heads = Vec::new();
        for (_, order) in &orders {
            heads.push(prune::sweep_cached_heads(&model, &cache, order, &ks)?);
        }
        times[1].push(t.elapsed().as_secs_f64());
        drop(cache);

        let t = Instant::now();
        let mut naive = Vec::new();
        for (_, order) in &orders {
            naive.push(prune::sweep_naive(
                &mut model, &layer, &data.test, &test_trig, order, &ks,
            )?);
        }
        times[2].push(t.elapsed().as_secs_f64());

        for (i, cached) in [&incremental, &heads].into_iter().enumerate() {
            for (a, b) in cached.iter().flatten().zip(naive.iter().flatten()) {
                max_diff[i] = max_diff[i]
                    .max((a.acc - b.acc).abs())
                    .max((a.asr - b.asr).abs())
                    .max((a.ra - b.ra).abs());
            }
        }
    }
    let summary = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        (s[s.len() / 2], s[0], s[s.len() - 1])
    };
    let labels = [
        "cached, incremental (sweep_cached)",
        "cached, head per k",
        "naive, whole model per k",
    ];
    let med: Vec<f64> = times
        .iter()
        .zip(labels)
        .map(|(v, label)| {
            let (m, lo, hi) = summary(v);
            println!("{label:36} median {m:7.3} s  (range {lo:.3}..{hi:.3}, {repeats} runs)");
            m
        })
        .collect();
    println!(
        "speed-up vs naive: incremental {:.1}x, head per k {:.1}x",
        med[2] / med[0],
        med[2] / med[1]
    );
    println!(
        "max |difference| of ACC/ASR/RA vs naive: incremental {:.2e}, head per k {:.2e}",
        max_diff[0], max_diff[1]
    );
    Ok(())
}
