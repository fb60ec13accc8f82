//! Training: SGD with momentum or Adam, weight decay, constant / cosine / step
//! learning rate, seeded batch order, a callback after every epoch (for
//! checkpoints) and resumption from a completed epoch.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tch::{Kind, Tensor};

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::optim::Optimizer;
use crate::progress::Progress;
use crate::spec::{Schedule, TrainingSpec};

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

/// Where a training run starts: after `epoch` completed epochs, with the
/// optimizer (and its state) to continue with, or a fresh one.
#[derive(Debug, Default)]
pub struct Start {
    pub epoch: usize,
    pub optimizer: Option<Optimizer>,
}

impl Start {
    /// Epoch 0, a fresh optimizer.
    pub fn fresh() -> Start {
        Start::default()
    }
}

/// Trains `model` on `data` for epochs `start.epoch..spec.epochs` (0-based;
/// `start.epoch` = epochs already completed). `on_epoch` runs after each
/// epoch with the model, the optimizer and the epoch's report (save a
/// checkpoint there: [`Optimizer::save`] for the optimizer's state). When
/// resuming, pass in `start` the optimizer with the state saved after
/// `start.epoch` ([`Optimizer::load`]) so the run continues exactly as if
/// uninterrupted; `None` starts a fresh one.
pub fn train(
    model: &mut Model,
    data: &Dataset,
    spec: &TrainingSpec,
    seed: u64,
    start: Start,
    progress: &dyn Progress,
    mut on_epoch: impl FnMut(&Model, &Optimizer, &EpochReport) -> Result<()>,
) -> Result<Vec<EpochReport>> {
    if data.is_empty() {
        return Err(Error::EmptyDataset("training set".into()));
    }
    crate::device::set_threads(spec.threads);
    let dev = model.device();
    let data = data.to_device(dev);
    let n = data.len();
    let batch = spec.batch_size as i64;
    let start_epoch = start.epoch;
    let mut opt = start
        .optimizer
        .unwrap_or_else(|| Optimizer::new(model, spec));
    let mut reports = Vec::new();
    for epoch in start_epoch..spec.epochs {
        let lr = lr_at(spec, epoch);
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
            opt.zero_grad();
            loss.f_backward()?;
            opt.step(lr)?;
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
        on_epoch(model, &opt, &report)?;
        progress.epoch_saved(&report);
        reports.push(report);
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;
    use crate::spec::OptimizerKind;
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
        crate::model::test_badnet(2, (16, 16), 3)
    }

    #[test]
    fn learns_a_toy_task_and_checkpoints_every_epoch() {
        let d = toy(128);
        let mut m = fresh();
        let mut seen = vec![];
        let r = train(
            &mut m,
            &d,
            &spec(3),
            0,
            Start::fresh(),
            &Silent,
            |_, _, e| {
                seen.push(e.epoch);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, [1, 2, 3]);
        assert!(r[2].train_acc > 0.9, "{r:?}");
        let acc = crate::eval::evaluate(&m, &d, None).unwrap().acc;
        assert!(acc > 0.9, "{acc}");
    }

    #[test]
    fn resume_matches_uninterrupted_weights() {
        // With the optimizer's state saved beside the epoch checkpoint,
        // resuming reproduces the uninterrupted run exactly, momentum and
        // Adam included.
        let d = toy(64);
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adam] {
            let mut s = spec(3);
            s.optimizer = kind;
            s.momentum = 0.9;
            if kind == OptimizerKind::Adam {
                s.lr = 1e-3;
            }
            let mut full = fresh();
            train(&mut full, &d, &s, 5, Start::fresh(), &Silent, |_, _, _| {
                Ok(())
            })
            .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let state = dir.path().join("optimizer.safetensors");
            let mut part = fresh();
            // stop after the first epoch, with a checkpoint
            train(&mut part, &d, &s, 5, Start::fresh(), &Silent, |m, o, e| {
                let mut meta = crate::model::CheckpointMeta::new(&m.info);
                meta.epoch = e.epoch;
                o.save(&state, e.epoch)?;
                m.save(dir.path(), &meta)?;
                Err(Error::Cancelled)
            })
            .unwrap_err();
            let (mut resumed, meta) = Model::load(dir.path(), Device::Cpu).unwrap();
            assert_eq!(meta.epoch, 1);
            let mut opt = Optimizer::new(&resumed, &s);
            opt.load(&state, 1).unwrap();
            let start = Start {
                epoch: 1,
                optimizer: Some(opt),
            };
            train(&mut resumed, &d, &s, 5, start, &Silent, |_, _, _| Ok(())).unwrap();
            let (a, b) = (full.vs.variables(), resumed.vs.variables());
            for (k, t) in &a {
                assert!(t.equal(&b[k]), "{kind:?}: {k} differs after resuming");
            }
            // a state saved after another epoch is refused, naming the file
            let e = Optimizer::new(&fresh(), &s)
                .load(&state, 2)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("optimizer.safetensors") && e.contains("epoch 1"),
                "{e}"
            );
        }
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
        train(&mut m, &d, &s, 0, Start::fresh(), &Silent, |_, _, _| Ok(())).unwrap();
        let e = train(
            &mut m,
            &d.take(0).select_vec(&[]),
            &s,
            0,
            Start::fresh(),
            &Silent,
            |_, _, _| Ok(()),
        );
        assert!(e.is_err());
    }
}
