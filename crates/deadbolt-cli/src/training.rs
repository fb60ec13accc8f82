//! The local science commands on libtorch, no servers: `deadbolt data
//! fetch-mnist`, `deadbolt train`, `deadbolt evaluate`.

use anyhow::{Context, Result};
use std::path::Path;

use deadbolt_core::data;
use deadbolt_core::device;
use deadbolt_core::eval;
use deadbolt_core::model::Model;
use deadbolt_core::pipeline::checkpointed::{self, TrainJob};
use deadbolt_core::pipeline::prepare::Prepared;
use deadbolt_core::poison::Attack;
use deadbolt_core::spec::{AttackSpec, DatasetKind, DatasetSpec, ExperimentSpec};

use crate::args::{EvaluateArgs, TrainArgs};
use crate::progress::Bars;

/// `deadbolt data fetch-mnist`.
pub fn fetch_mnist(out: &Path) -> Result<()> {
    let m = data::mnist::fetch_mnist(out, None)?;
    println!("{}", serde_json::to_string_pretty(&m)?);
    Ok(())
}

/// `deadbolt train`: writes the checkpoint and metrics.json into `--out`,
/// prints the metrics.
pub fn train(args: TrainArgs, bars: &Bars) -> Result<()> {
    let TrainArgs {
        spec,
        out,
        device,
        resume,
        clean,
        threads,
    } = args;
    let mut spec = ExperimentSpec::from_file(&spec)?;
    if let Some(d) = device {
        spec.training.device = d;
    }
    if let Some(t) = threads {
        spec.training.threads = t;
    }
    let dev = device::resolve(spec.training.device)?;
    device::set_threads(spec.training.threads);
    let prep = Prepared::from_spec(&spec)?;
    let data = if clean {
        &prep.train
    } else {
        &prep.poisoned.data
    };
    eprintln!(
        "training {} on {} images ({} poisoned) on {}",
        spec.model.arch.as_str(),
        data.len(),
        if clean {
            0
        } else {
            prep.poisoned.poisoned.len()
        },
        device::describe(dev)
    );
    let trained = checkpointed::train_checkpointed(
        TrainJob {
            spec: &spec,
            info: prep.model_info(&spec),
            data,
            test: &prep.test,
            attack: prep.attack.as_ref(),
            out: &out,
            device: dev,
            resume,
        },
        bars,
    )?;
    let m = &trained.metrics;
    let seconds: f64 = trained.epochs.iter().map(|e| e.seconds).sum();
    let images: f64 = trained
        .epochs
        .iter()
        .map(|e| e.seconds * e.images_per_sec)
        .sum();
    let summary = serde_json::json!({
        "acc": m.acc,
        "asr": m.asr,
        "ra": m.ra,
        "per_class_acc": m.per_class_acc,
        "epochs": trained.epochs,
        "resumed_from_epoch": trained.resumed_from,
        "poisoned": if clean { 0 } else { prep.poisoned.poisoned.len() },
        "train_seconds": seconds,
        "train_images_per_sec": if seconds > 0.0 { images / seconds } else { 0.0 },
        "device": device::describe(dev),
    });
    let path = out.join("metrics.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// `deadbolt evaluate`: prints the checkpoint's figures.
pub fn evaluate(args: EvaluateArgs) -> Result<()> {
    let EvaluateArgs {
        model,
        data: dir,
        kind,
        attack,
        device: d,
    } = args;
    let dev = device::resolve(d)?;
    let (model, _) = Model::load(&model, dev)?;
    let kind: DatasetKind = kind.parse().map_err(|e| anyhow::anyhow!("--kind: {e}"))?;
    let splits = data::load(&DatasetSpec {
        kind,
        path: Some(dir),
        validation_fraction: 0.0,
        train_limit: 0,
        test_limit: 0,
        sha256: Default::default(),
    })?;
    let attack = attack
        .map(|p| -> Result<Attack> {
            let a = read_attack(&p)?;
            Ok(Attack::for_dataset(&a, &splits.test)?)
        })
        .transpose()?;
    let m = eval::evaluate(&model, &splits.test, attack.as_ref())?;
    println!("{}", serde_json::to_string_pretty(&m)?);
    Ok(())
}

/// An attack from a TOML file: a whole spec with `[attack]`, or the attack
/// table alone.
fn read_attack(path: &Path) -> Result<AttackSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    AttackSpec::from_toml_str(&text).with_context(|| format!("{}", path.display()))
}
