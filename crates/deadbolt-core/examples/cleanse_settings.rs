//! Dev harness: Neural Cleanse settings on a model deadbolt did not train,
//! and the pruning curves its synthetic trigger gives.
//!
//!     source scripts/env.sh
//!     cargo run --release -p deadbolt-core --example cleanse_settings -- \
//!         MODEL_DIR DATA [CLEANSE_JSON]
//!
//! MODEL_DIR holds `model.safetensors` and `card.toml` (as
//! `scripts/byom_torch.py train --out MODEL_DIR` writes them); DATA is the
//! clean data (`deadbolt scan --data`; its test split is used).
//! CLEANSE_JSON sets `[scan.cleanse]` keys, e.g. `'{"steps": 600,
//! "adapt": false}'` (default: none, the defaults). Prints each label's mask
//! norm, attack success and anomaly index, and the flagged labels. When
//! MODEL_DIR also holds the real trigger (`trigger.safetensors`, target in
//! `--target`, default 3), prints for the l_inf, l_inf-diff and l1
//! rankings (made with the synthetic trigger, on 70% of the data) the ACC
//! and the ASR under the synthetic and under the real trigger for the
//! first 16 pruning counts, on the other 30%: how well the synthetic
//! trigger stands in for the real one.

use std::path::PathBuf;
use std::time::Instant;

use deadbolt_core::byom::scan;
use deadbolt_core::data::folder::Split;
use deadbolt_core::defense::cleanse::{self, CleanseSpec, Settings};
use deadbolt_core::defense::{prune, stats};
use deadbolt_core::progress::Silent;
use deadbolt_core::spec::Criterion;
use tch::Device;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut target = 3i64;
    let mut pos = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--target" {
            target = args
                .next()
                .and_then(|t| t.parse().ok())
                .ok_or("--target needs a label")?;
        } else {
            pos.push(a);
        }
    }
    let (dir, data) = match pos.as_slice() {
        [dir, data, ..] => (PathBuf::from(dir), PathBuf::from(data)),
        _ => {
            return Err("usage: cleanse_settings MODEL_DIR DATA [CLEANSE_JSON] [--target L]".into())
        }
    };
    let spec: CleanseSpec = serde_json::from_str(pos.get(2).map_or("{}", String::as_str))
        .map_err(|e| format!("CLEANSE_JSON: {e}"))?;
    let settings = Settings::byom(&spec)?;
    let s = scan::open(
        &dir.join("model.safetensors"),
        Some(&dir.join("card.toml")),
        &data,
        Split::Test,
        None,
        Device::Cpu,
    )?;
    let m = &s.loaded.model;

    let t = Instant::now();
    let r = cleanse::reverse_engineer(m, Some(&s.norm), &s.data, &settings, &Silent)?;
    println!(
        "{}: flagged {:?} in {:.1} s",
        dir.display(),
        r.summary.flagged_labels,
        t.elapsed().as_secs_f64()
    );
    println!("label  mask L1  success  anomaly");
    for l in &r.summary.labels {
        println!(
            "{:5}  {:7.1}  {:7.2}  {:7.2}",
            l.label, l.mask_l1, l.attack_success, l.anomaly_index
        );
    }

    let real_file = dir.join("trigger.safetensors");
    if !real_file.is_file() {
        return Ok(());
    }
    // the curves: ranked and reversed on a tuning part, measured on the rest
    let (tune, held) = s.data.stratified_split(0.3, 0x5917);
    let r = cleanse::reverse_engineer(m, Some(&s.norm), &tune, &settings, &Silent)?;
    let (label, trigger) = r.suspect();
    let classes = m.info.classes;
    let syn = cleanse::synthetic_attack(&s.norm.trigger_to_model(trigger), label, classes);
    let real_t = cleanse::load_trigger(&real_file)?;
    let real = cleanse::synthetic_attack(&s.norm.trigger_to_model(&real_t), target, classes);
    let layer = s.layer.as_str();
    let clean_stats = stats::collect(m, layer, &tune.images, 250)?;
    let triggered_stats = stats::collect(m, layer, &syn.trigger.apply(&tune.images), 250)?;
    let channels = clean_stats.channels as i64;
    let ks: Vec<usize> = prune::all_ks(channels).into_iter().take(16).collect();
    let syn_cache = prune::cache_features(m, layer, &held, &syn.triggered(&held))?;
    let real_cache = prune::cache_features(m, layer, &held, &real.triggered(&held))?;
    println!("suspect label {label}; real target {target}; layer {layer}");
    for c in [Criterion::Linf, Criterion::LinfDiff, Criterion::L1] {
        let rk = prune::rank(c, &clean_stats, &triggered_stats, 0)?;
        let a = prune::sweep_cached(m, &syn_cache, &rk.order, &ks)?;
        let b = prune::sweep_cached(m, &real_cache, &rk.order, &ks)?;
        println!("{}: order {:?}", c.as_str(), &rk.order[..ks.len()]);
        for (x, y) in a.iter().zip(&b) {
            println!(
                "  k {:2}  acc {:.3}  synthetic ASR {:.3}  real ASR {:.3}",
                x.k, x.acc, x.asr, y.asr
            );
        }
    }
    Ok(())
}
