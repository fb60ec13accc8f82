//! Evaluation under no_grad, batched: ACC, ASR, RA, per-class accuracy.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::poison::Attack;

pub const EVAL_BATCH: usize = 1000;

/// The figures of one model on one test set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Clean test accuracy.
    pub acc: f64,
    /// Share of triggered non-target images classified as the target.
    pub asr: Option<f64>,
    /// Share of triggered images classified as their true label.
    pub ra: Option<f64>,
    pub per_class_acc: Vec<f64>,
    pub n_clean: i64,
    pub n_triggered: i64,
}

/// ACC, ASR and RA after pruning the first `k` channels of a ranking.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub k: usize,
    pub acc: f64,
    pub asr: f64,
    pub ra: f64,
}

/// Defense effectiveness rating of going from `before` to `after`:
/// `(max(0, dASR) - max(0, dACC) + 1) / 2` with `d = before - after`.
pub fn der(before: &CurvePoint, after: &CurvePoint) -> f64 {
    ((before.asr - after.asr).max(0.0) - (before.acc - after.acc).max(0.0) + 1.0) / 2.0
}

/// Predicted labels for `images` (moved batch by batch to the model's device).
pub fn predict(model: &Model, images: &Tensor, batch: usize) -> Tensor {
    logits(model, images, batch).argmax(1, false)
}

/// Logits for `images`, batched, under no_grad, on the CPU.
pub fn logits(model: &Model, images: &Tensor, batch: usize) -> Tensor {
    let n = images.size()[0];
    let dev = model.device();
    tch::no_grad(|| {
        let parts: Vec<Tensor> = (0..n)
            .step_by(batch.max(1))
            .map(|s| {
                let len = (batch as i64).min(n - s);
                model
                    .forward_t(&images.narrow(0, s, len).to_device(dev), false)
                    .to_device(tch::Device::Cpu)
            })
            .collect();
        if parts.is_empty() {
            Tensor::zeros([0, model.info.classes], (Kind::Float, tch::Device::Cpu))
        } else {
            Tensor::cat(&parts, 0)
        }
    })
}

/// Share of `pred == want`.
pub fn share_equal(pred: &Tensor, want: &Tensor) -> f64 {
    let n = pred.size()[0];
    if n == 0 {
        return 0.0;
    }
    pred.eq_tensor(&want.to_device(pred.device()))
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[])
}

/// ACC (and, with an attack, ASR and RA) of a model on a clean test set.
pub fn evaluate(model: &Model, test: &Dataset, attack: Option<&Attack>) -> Result<Metrics> {
    if test.is_empty() {
        return Err(Error::EmptyDataset("evaluation set".into()));
    }
    let pred = predict(model, &test.images, EVAL_BATCH);
    let labels = test.labels.to_device(tch::Device::Cpu);
    let acc = share_equal(&pred, &labels);
    let correct = pred.eq_tensor(&labels).to_kind(Kind::Float);
    let per_class_acc = (0..test.classes)
        .map(|c| {
            let m = labels.eq(c);
            let n = m.sum(Kind::Float).double_value(&[]);
            if n == 0.0 {
                f64::NAN
            } else {
                (&correct * m.to_kind(Kind::Float))
                    .sum(Kind::Float)
                    .double_value(&[])
                    / n
            }
        })
        .collect();
    let (asr, ra, n_triggered) = match attack {
        None => (None, None, 0),
        Some(a) => {
            let t = a.triggered(test);
            let p = predict(model, &t.images, EVAL_BATCH);
            (
                Some(share_equal(&p, &t.targets)),
                Some(share_equal(&p, &t.labels)),
                t.len(),
            )
        }
    };
    Ok(Metrics {
        acc,
        asr,
        ra,
        per_class_acc,
        n_clean: test.len(),
        n_triggered,
    })
}
