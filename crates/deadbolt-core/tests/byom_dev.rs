//! Dev harness (ignored): NC settings on a PyTorch model dir.
use std::path::PathBuf;

use deadbolt_core::card::ModelCard;
use deadbolt_core::cleanse::{self, CleanseSpec};
use deadbolt_core::data::folder::Split;
use deadbolt_core::progress::Silent;
use deadbolt_core::scan;
use tch::Device;

#[test]
#[ignore]
fn nc_settings() {
    tch::set_num_threads(2);
    let dir = PathBuf::from(std::env::var("BYOM_MODEL").unwrap());
    let data = PathBuf::from(std::env::var("BYOM_DATA").unwrap());
    let spec: CleanseSpec =
        serde_json::from_str(&std::env::var("BYOM_NC").unwrap_or("{}".into())).unwrap();
    let s = scan::open(
        &dir.join("model.safetensors"),
        Some(&dir.join("card.toml")),
        &data,
        Split::Test,
        None,
        Device::Cpu,
    )
    .unwrap();
    let _ = ModelCard::from_file(&dir.join("card.toml")).unwrap();
    let t = std::time::Instant::now();
    let r = cleanse::reverse_engineer(&s.loaded.model, &s.norm, &s.data, &spec, &Silent).unwrap();
    let norms: Vec<String> = r
        .summary
        .labels
        .iter()
        .map(|l| format!("{:.1}", l.mask_l1))
        .collect();
    let succ: Vec<String> = r
        .summary
        .labels
        .iter()
        .map(|l| format!("{:.2}", l.attack_success))
        .collect();
    let idx: Vec<String> = r
        .summary
        .anomaly_index
        .iter()
        .map(|a| format!("{a:.2}"))
        .collect();
    println!(
        "RESULT {} flagged {:?} norms {:?} success {:?} anomaly {:?} {:.1}s",
        dir.display(),
        r.summary.flagged_labels,
        norms,
        succ,
        idx,
        t.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore]
fn repair_curves() {
    use deadbolt_core::analysis::reverse::{load_trigger, synthetic_attack};
    use deadbolt_core::analysis::stats;
    use deadbolt_core::prune;
    use deadbolt_core::spec::Criterion;
    tch::set_num_threads(2);
    let dir = PathBuf::from(std::env::var("BYOM_MODEL").unwrap());
    let data = PathBuf::from(std::env::var("BYOM_DATA").unwrap());
    let spec: CleanseSpec =
        serde_json::from_str(&std::env::var("BYOM_NC").unwrap_or("{}".into())).unwrap();
    let s = scan::open(
        &dir.join("model.safetensors"),
        Some(&dir.join("card.toml")),
        &data,
        Split::Test,
        None,
        Device::Cpu,
    )
    .unwrap();
    let m = &s.loaded.model;
    let (tune, held) = s.data.stratified_split(0.3, 0x5917);
    let r = cleanse::reverse_engineer(m, &s.norm, &tune, &spec, &Silent).unwrap();
    let label = r.suspect().0;
    println!("label {label} anomaly {:?}", r.summary.anomaly_index);
    let syn = synthetic_attack(
        &s.norm.trigger_to_model(&r.triggers[label as usize]),
        label,
        10,
    );
    let real_t = load_trigger(&dir.join("trigger.safetensors")).unwrap();
    let real = synthetic_attack(&s.norm.trigger_to_model(&real_t), 3, 10);
    let imgs = tune.images.shallow_clone();
    let cs = stats::collect(m, "conv2", &imgs, 250).unwrap();
    let ts = stats::collect(m, "conv2", &syn.trigger.apply(&imgs), 250).unwrap();
    let ks = prune::all_ks(32);
    let syn_cache = prune::cache_features(m, "conv2", &held, &syn.triggered(&held)).unwrap();
    let real_cache = prune::cache_features(m, "conv2", &held, &real.triggered(&held)).unwrap();
    for c in [Criterion::Linf, Criterion::LinfDiff, Criterion::L1] {
        let rk = prune::rank(c, &cs, &ts, 0).unwrap();
        let a = prune::sweep_cached(m, &syn_cache, &rk.order, &ks).unwrap();
        let b = prune::sweep_cached(m, &real_cache, &rk.order, &ks).unwrap();
        println!("{} order {:?}", c.as_str(), &rk.order[..12]);
        for k in 0..16 {
            println!(
                "  k {k:2} acc {:.3} syn {:.3} real {:.3}",
                a[k].acc, a[k].asr, b[k].asr
            );
        }
    }
}

#[test]
#[ignore]
fn finetune_curves() {
    use deadbolt_core::analysis::reverse::{load_trigger, synthetic_attack};
    use deadbolt_core::analysis::stats;
    use deadbolt_core::data::Dataset;
    use deadbolt_core::prune;
    use deadbolt_core::spec::{Criterion, TrainingSpec};
    use tch::{Kind, Tensor};
    tch::set_num_threads(2);
    let dir = PathBuf::from(std::env::var("BYOM_MODEL").unwrap());
    let data = PathBuf::from(std::env::var("BYOM_DATA").unwrap());
    let s = scan::open(
        &dir.join("model.safetensors"),
        Some(&dir.join("card.toml")),
        &data,
        Split::Test,
        None,
        Device::Cpu,
    )
    .unwrap();
    let m = &s.loaded.model;
    let (tune, held) = s.data.stratified_split(0.3, 0x5917);
    let r = cleanse::reverse_engineer(m, &s.norm, &tune, &CleanseSpec::default(), &Silent).unwrap();
    let label = r.suspect().0;
    let syn = synthetic_attack(
        &s.norm.trigger_to_model(&r.triggers[label as usize]),
        label,
        10,
    );
    let real_t = load_trigger(&dir.join("trigger.safetensors")).unwrap();
    let real = synthetic_attack(&s.norm.trigger_to_model(&real_t), 3, 10);
    let cs = stats::collect(m, "conv2", &tune.images, 250).unwrap();
    let ts = stats::collect(m, "conv2", &syn.trigger.apply(&tune.images), 250).unwrap();
    let frac: f64 = std::env::var("UNLEARN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let epochs: usize = std::env::var("EPOCHS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let lr: f64 = std::env::var("LR")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.01);
    // fine-tune set: tuning images, a fraction stamped with the synthetic trigger, true labels
    let n = tune.len();
    let k_st = (frac * n as f64).round() as i64;
    let idx = Tensor::randperm(n, (Kind::Int64, Device::Cpu)).narrow(0, 0, k_st);
    let stamped = syn.trigger.apply(&tune.images.index_select(0, &idx));
    let ft = Dataset {
        images: Tensor::cat(&[&tune.images, &stamped], 0),
        labels: Tensor::cat(&[&tune.labels, &tune.labels.index_select(0, &idx)], 0),
        classes: 10,
    };
    let kss: Vec<usize> = std::env::var("KS")
        .unwrap_or("0,2,4,6,8,12".into())
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect();
    for c in [Criterion::Linf] {
        let rk = prune::rank(c, &cs, &ts, 0).unwrap();
        for &k in &kss {
            let mut p = prune::pruned_model(m, "conv2", &rk.order, k).unwrap();
            let spec = TrainingSpec {
                epochs,
                lr,
                batch_size: 32,
                ..TrainingSpec::default()
            };
            deadbolt_core::train::train(
                &mut p,
                &ft,
                &spec,
                0,
                deadbolt_core::train::Start::fresh(),
                &Silent,
                |_, _, _| Ok(()),
            )
            .unwrap();
            let a = deadbolt_core::repair::held_out_figures(&p, &held, &syn);
            let b = deadbolt_core::repair::held_out_figures(&p, &held, &real);
            let t = deadbolt_core::repair::held_out_figures(&p, &tune, &syn);
            println!("{} lr {lr} ep {epochs} k {k:2} unlearn {frac} acc {:.3} syn {:.3} real {:.3} | tune syn {:.3}", c.as_str(), a.acc.value, a.asr.value, b.asr.value, t.asr.value);
        }
    }
}
