//! Training: SGD with momentum or Adam, weight decay, constant / cosine / step
//! learning rate, seeded batch order, a callback after every epoch (for
//! checkpoints) and resumption from a completed epoch.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tch::{nn, nn::OptimizerConfig, Kind, Tensor};

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::progress::Progress;
use crate::spec::{OptimizerKind, Schedule, TrainingSpec};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// 1-based epoch number.
    pub epoch: usize,
    pub loss: f64,
    pub train_acc: f64,
    pub lr: f64,
    pub seconds: f64,
    pub images_per_sec: f64,
}

/// Learning rate for a 0-based epoch.
pub fn lr_at(spec: &TrainingSpec, epoch: usize) -> f64 {
    match spec.schedule {
        Schedule::Constant => spec.lr,
        Schedule::Cosine => {
            spec.lr * 0.5 * (1.0 + (std::f64::consts::PI * epoch as f64 / spec.epochs as f64).cos())
        }
        Schedule::Step => spec.lr * spec.gamma.powi((epoch / spec.step_size.max(1)) as i32),
    }
}

/// The order of samples in a (0-based) epoch: a function of seed and epoch
/// only, so a resumed run sees the same batches.
pub fn epoch_order(n: i64, seed: u64, epoch: usize) -> Vec<i64> {
    let mut v: Vec<i64> = (0..n).collect();
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    v.shuffle(&mut rng);
    v
}

fn optimizer(model: &Model, spec: &TrainingSpec) -> Result<nn::Optimizer> {
    Ok(match spec.optimizer {
        OptimizerKind::Sgd => nn::Sgd {
            momentum: spec.momentum,
            dampening: 0.0,
            wd: spec.weight_decay,
            nesterov: false,
        }
        .build(&model.vs, spec.lr)?,
        OptimizerKind::Adam => nn::Adam {
            wd: spec.weight_decay,
            ..Default::default()
        }
        .build(&model.vs, spec.lr)?,
    })
}

/// Trains `model` on `data` for epochs `start_epoch..spec.epochs` (0-based;
/// `start_epoch` = epochs already completed). `on_epoch` runs after each
/// epoch with the model and its report (save a checkpoint there).
pub fn train(
    model: &mut Model,
    data: &Dataset,
    spec: &TrainingSpec,
    seed: u64,
    start_epoch: usize,
    progress: &dyn Progress,
    mut on_epoch: impl FnMut(&Model, &EpochReport) -> Result<()>,
) -> Result<Vec<EpochReport>> {
    if data.is_empty() {
        return Err(Error::EmptyDataset("training set".into()));
    }
    crate::device::set_threads(spec.threads);
    let dev = model.device();
    let data = data.to_device(dev);
    let n = data.len();
    let batch = spec.batch_size as i64;
    let mut opt = optimizer(model, spec)?;
    let mut reports = Vec::new();
    for epoch in start_epoch..spec.epochs {
        let lr = lr_at(spec, epoch);
        opt.set_lr(lr);
        let order = Tensor::from_slice(&epoch_order(n, seed, epoch)).to_device(dev);
        progress.start(&format!("epoch {}/{}", epoch + 1, spec.epochs), n as u64);
        let t0 = Instant::now();
        let mut loss_sum = Tensor::zeros([], (Kind::Float, dev));
        let mut correct = Tensor::zeros([], (Kind::Int64, dev));
        let mut s = 0;
        while s < n {
            if progress.cancelled() {
                return Err(Error::Cancelled);
            }
            let len = batch.min(n - s);
            let idx = order.narrow(0, s, len);
            let x = data.images.index_select(0, &idx);
            let y = data.labels.index_select(0, &idx);
            let logits = model.forward_t(&x, true);
            let loss = logits.cross_entropy_for_logits(&y);
            opt.backward_step(&loss);
            tch::no_grad(|| {
                loss_sum += loss.detach() * len as f64;
                correct += logits.argmax(1, false).eq_tensor(&y).sum(Kind::Int64);
            });
            s += len;
            progress.inc(len as u64);
        }
        let seconds = t0.elapsed().as_secs_f64();
        let report = EpochReport {
            epoch: epoch + 1,
            loss: loss_sum.double_value(&[]) / n as f64,
            train_acc: correct.int64_value(&[]) as f64 / n as f64,
            lr,
            seconds,
            images_per_sec: n as f64 / seconds,
        };
        if !report.loss.is_finite() {
            return Err(Error::Other(format!(
                "training diverged at epoch {} (loss {}); lower training.lr",
                epoch + 1,
                report.loss
            )));
        }
        progress.finish(&format!(
            "epoch {} loss {:.4} acc {:.4}",
            report.epoch, report.loss, report.train_acc
        ));
        tracing::info!(
            epoch = report.epoch,
            loss = report.loss,
            train_acc = report.train_acc,
            lr,
            images_per_sec = report.images_per_sec,
            "epoch done"
        );
        on_epoch(model, &report)?;
        reports.push(report);
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelInfo;
    use crate::progress::Silent;
    use crate::spec::Arch;
    use tch::Device;

    /// Two classes: bright top half vs bright bottom half.
    pub(crate) fn toy(n: i64) -> Dataset {
        let x = crate::rng::uniform(&[n, 1, 16, 16], 101) * 0.3;
        let y = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(2);
        for i in 0..n {
            let half = if i % 2 == 0 { 0 } else { 8 };
            let _ = x.get(i).narrow(1, half, 8).g_add_scalar_(0.6);
        }
        Dataset::new(x, y, 2, "toy").unwrap()
    }

    fn spec(epochs: usize) -> TrainingSpec {
        TrainingSpec {
            epochs,
            batch_size: 16,
            lr: 0.05,
            ..Default::default()
        }
    }

    fn fresh() -> Model {
        Model::seeded(
            ModelInfo {
                arch: Arch::BadnetCnn,
                classes: 2,
                input_shape: (1, 16, 16),
            },
            Device::Cpu,
            3,
        )
        .unwrap()
    }

    #[test]
    fn learns_a_toy_task_and_checkpoints_every_epoch() {
        let d = toy(128);
        let mut m = fresh();
        let mut seen = vec![];
        let r = train(&mut m, &d, &spec(3), 0, 0, &Silent, |_, e| {
            seen.push(e.epoch);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [1, 2, 3]);
        assert!(r[2].train_acc > 0.9, "{r:?}");
        let acc = crate::eval::evaluate(&m, &d, None).unwrap().acc;
        assert!(acc > 0.9, "{acc}");
    }

    #[test]
    fn resume_matches_uninterrupted_weights_without_momentum() {
        // Plain SGD has no optimizer state, so resuming from an epoch
        // checkpoint must reproduce the uninterrupted run exactly.
        let d = toy(64);
        let mut s = spec(2);
        s.momentum = 0.0;
        let mut full = fresh();
        train(&mut full, &d, &s, 5, 0, &Silent, |_, _| Ok(())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut part = fresh();
        let mut one = s.clone();
        one.epochs = 1;
        // run only the first epoch (same schedule length) then checkpoint
        train(&mut part, &d, &s, 5, 0, &Silent, |m, e| {
            if e.epoch == 1 {
                let mut meta = crate::model::CheckpointMeta::new(&m.info);
                meta.epoch = 1;
                m.save(dir.path(), &meta)?;
                return Err(Error::Cancelled);
            }
            Ok(())
        })
        .unwrap_err();
        let (mut resumed, meta) = Model::load(dir.path(), Device::Cpu).unwrap();
        train(&mut resumed, &d, &s, 5, meta.epoch, &Silent, |_, _| Ok(())).unwrap();
        let x = d.images.narrow(0, 0, 8);
        assert!(resumed.forward_t(&x, false).allclose(
            &full.forward_t(&x, false),
            1e-5,
            1e-5,
            false
        ));
        let _ = one;
    }

    #[test]
    fn schedules() {
        let mut s = spec(10);
        s.schedule = Schedule::Cosine;
        assert!((lr_at(&s, 0) - 0.05).abs() < 1e-12);
        assert!((lr_at(&s, 5) - 0.025).abs() < 1e-12);
        s.schedule = Schedule::Step;
        s.step_size = 4;
        s.gamma = 0.1;
        assert!((lr_at(&s, 4) - 0.005).abs() < 1e-12);
        assert_eq!(epoch_order(10, 1, 2), epoch_order(10, 1, 2));
        assert_ne!(epoch_order(10, 1, 2), epoch_order(10, 1, 3));
    }

    #[test]
    fn adam_and_empty_data() {
        let d = toy(32);
        let mut m = fresh();
        let mut s = spec(1);
        s.optimizer = OptimizerKind::Adam;
        s.lr = 1e-3;
        train(&mut m, &d, &s, 0, 0, &Silent, |_, _| Ok(())).unwrap();
        let e = train(
            &mut m,
            &d.take(0).select_vec(&[]),
            &s,
            0,
            0,
            &Silent,
            |_, _| Ok(()),
        );
        assert!(e.is_err());
    }
}
