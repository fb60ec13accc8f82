//! Choosing how many channels to prune with the fine-tuning in the loop,
//! shared by `deadbolt experiment` ([`crate::pipeline::experiment`]) and
//! `deadbolt repair` ([`crate::byom::repair`]): the ladder of ks tried, the
//! unlearning set the fine-tuning trains on, the search and its
//! candidates, and held-out figures with Wilson intervals.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::data::Dataset;
use crate::defense::prune;
use crate::error::{Error, Result};
use crate::eval::{self, EVAL_BATCH};
use crate::model::Model;
use crate::poison::Attack;
use crate::progress::{EpochReport, Progress};
use crate::spec::byom::RepairOptions;
use crate::spec::TrainingSpec;
use crate::train;

/// A proportion with its 95% Wilson score interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Proportion {
    pub value: f64,
    pub successes: i64,
    pub n: i64,
    pub low: f64,
    pub high: f64,
}

/// `successes / n` with the Wilson score interval at `z` (1.96: 95%).
pub fn wilson(successes: i64, n: i64, z: f64) -> Proportion {
    if n <= 0 {
        return Proportion {
            value: 0.0,
            successes: 0,
            n: 0,
            low: 0.0,
            high: 1.0,
        };
    }
    let nf = n as f64;
    let p = successes as f64 / nf;
    let z2 = z * z;
    let denom = 1.0 + z2 / nf;
    let center = (p + z2 / (2.0 * nf)) / denom;
    let half = z / denom * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt();
    Proportion {
        value: p,
        successes,
        n,
        low: (center - half).max(0.0),
        high: (center + half).min(1.0),
    }
}

impl std::fmt::Display for Proportion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2}% [{:.2}, {:.2}] ({}/{})",
            100.0 * self.value,
            100.0 * self.low,
            100.0 * self.high,
            self.successes,
            self.n
        )
    }
}

/// ACC and synthetic ASR of a model on held-out data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeldOutFigures {
    pub acc: Proportion,
    /// Share of stamped images of other labels classified as the label.
    pub asr: Proportion,
}

fn count_equal(pred: &Tensor, want: &Tensor) -> i64 {
    pred.eq_tensor(&want.to_device(pred.device()))
        .sum(Kind::Int64)
        .int64_value(&[])
}

/// ACC and ASR of `model` on clean `data` and `attack`'s triggered version.
pub fn held_out_figures(model: &Model, data: &Dataset, attack: &Attack) -> HeldOutFigures {
    let p = eval::predict(model, &data.images, EVAL_BATCH);
    let acc = wilson(count_equal(&p, &data.labels), data.len(), 1.96);
    let t = attack.triggered(data);
    let p = eval::predict(model, &t.images, EVAL_BATCH);
    let asr = wilson(count_equal(&p, &t.targets), t.len(), 1.96);
    HeldOutFigures { acc, asr }
}

/// One k tried with the fine-tuning in the loop, measured on the check part.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub k: usize,
    pub acc: f64,
    pub asr: f64,
    /// ACC lost against the original model on the check part.
    pub acc_drop: f64,
    pub meets_target: bool,
    pub within_budget: bool,
}

/// The pruning counts tried: 0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ...
/// up to `channels`.
pub fn k_ladder(channels: i64) -> Vec<usize> {
    let c = channels.max(0) as usize;
    let mut v = vec![0, 1, 2, 3];
    let mut k = 4;
    while k < c {
        v.push(k);
        v.push(k * 3 / 2);
        k *= 2;
    }
    v.push(c);
    v.retain(|k| *k <= c);
    v.sort_unstable();
    v.dedup();
    v
}

/// Fine-tuning data: the fit images, plus a seeded `fraction` of them
/// stamped with `attack`'s trigger and labelled with their true labels.
pub fn unlearning_set(fit: &Dataset, attack: &Attack, fraction: f64, seed: u64) -> Dataset {
    let n = (fraction * fit.len() as f64).round() as usize;
    if n == 0 {
        return fit.clone();
    }
    let idx = crate::data::shuffled_indices(fit, n, seed);
    let some = fit.select_vec(&idx);
    Dataset {
        images: Tensor::cat(&[&fit.images, &attack.trigger.apply(&some.images)], 0),
        labels: Tensor::cat(&[&fit.labels, &some.labels], 0),
        classes: fit.classes,
    }
}

/// What [`search_k`] aims for and how it fine-tunes each candidate.
#[derive(Debug, Clone)]
pub struct SearchSpec {
    /// ASR (on the check data) a candidate must not exceed.
    pub target_asr: f64,
    /// ACC (fraction) a candidate may lose against the unpruned model.
    pub max_acc_drop: f64,
    /// The fine-tuning of every candidate (`epochs = 0`: pruning only).
    pub fine_tune: TrainingSpec,
    pub seed: u64,
}

impl SearchSpec {
    /// The k search of a repair.
    pub fn of(opts: &RepairOptions) -> SearchSpec {
        SearchSpec {
            target_asr: opts.target_asr,
            max_acc_drop: opts.max_acc_drop,
            fine_tune: TrainingSpec {
                epochs: opts.fine_tune_epochs,
                lr: opts.fine_tune_lr,
                batch_size: opts.fine_tune_batch,
                ..TrainingSpec::default()
            },
            seed: opts.seed,
        }
    }
}

fn fine_tune(
    model: &mut Model,
    data: &Dataset,
    search: &SearchSpec,
    progress: &dyn Progress,
) -> Result<Vec<EpochReport>> {
    if search.fine_tune.epochs == 0 {
        return Ok(Vec::new());
    }
    train::train(
        model,
        data,
        &search.fine_tune,
        search.seed,
        train::Start::fresh(),
        progress,
        |_, _, _| Ok(()),
    )
}

/// The outcome of [`search_k`].
#[derive(Debug)]
pub struct KSearch {
    /// Every k tried, in order.
    pub candidates: Vec<Candidate>,
    /// Index of the chosen one in `candidates`.
    pub pick: usize,
    /// The chosen model: pruned by its k and fine-tuned.
    pub model: Model,
    pub epochs: Vec<EpochReport>,
}

/// Chooses k with the fine-tuning in the loop: for each k of
/// [`k_ladder`], prunes the first k channels of `order` (on top of the
/// model's own masks), fine-tunes on `fine_tune_data` and measures ACC and
/// ASR on `check` with `attack`; stops at the first k that meets
/// `search.target_asr` within `search.max_acc_drop` of the unpruned model's ACC
/// on `check`. When none does: the best ACC among those meeting the
/// target, else the lowest ASR (then the best ACC).
#[allow(clippy::too_many_arguments)]
pub fn search_k(
    model: &Model,
    layer: &str,
    order: &[i64],
    fine_tune_data: &Dataset,
    check: &Dataset,
    attack: &Attack,
    search: &SearchSpec,
    progress: &dyn Progress,
) -> Result<KSearch> {
    let channels = model.layer(layer)?.channels;
    let base = held_out_figures(model, check, attack);
    let mut candidates: Vec<Candidate> = Vec::new();
    // the models that can still be chosen
    type Kept = (usize, Model, Vec<EpochReport>);
    let (mut meeting, mut lowest): (Option<Kept>, Option<Kept>) = (None, None);
    let mut done: Option<Kept> = None;
    for k in k_ladder(channels).into_iter().filter(|k| *k <= order.len()) {
        if progress.cancelled() {
            return Err(Error::Cancelled);
        }
        let mut m = prune::pruned_model(model, layer, order, k)?;
        let epochs = fine_tune(&mut m, fine_tune_data, search, progress)?;
        let f = held_out_figures(&m, check, attack);
        let acc_drop = base.acc.value - f.acc.value;
        let c = Candidate {
            k,
            acc: f.acc.value,
            asr: f.asr.value,
            acc_drop,
            meets_target: f.asr.value <= search.target_asr + 1e-12,
            within_budget: acc_drop <= search.max_acc_drop + 1e-12,
        };
        tracing::info!(k, acc = c.acc, asr = c.asr, "repair candidate");
        let i = candidates.len();
        candidates.push(c);
        if c.meets_target && c.within_budget {
            done = Some((i, m, epochs));
            break;
        }
        if c.meets_target {
            if meeting
                .as_ref()
                .is_none_or(|(j, _, _)| c.acc > candidates[*j].acc)
            {
                meeting = Some((i, m, epochs));
            }
        } else if lowest.as_ref().is_none_or(|(j, _, _)| {
            let b = &candidates[*j];
            c.asr < b.asr || (c.asr == b.asr && c.acc > b.acc)
        }) {
            lowest = Some((i, m, epochs));
        }
    }
    let (pick, model, epochs) = done
        .or(meeting)
        .or(lowest)
        .expect("at least k = 0 is tried");
    Ok(KSearch {
        candidates,
        pick,
        model,
        epochs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::defense::cleanse::synthetic_attack;
    use tch::Device;

    #[test]
    fn wilson_interval() {
        let p = wilson(0, 100, 1.96);
        assert_eq!(p.low, 0.0);
        assert!((p.high - 0.0370).abs() < 1e-3, "{p:?}");
        let p = wilson(50, 100, 1.96);
        assert!(
            (p.low - 0.4038).abs() < 1e-3 && (p.high - 0.5962).abs() < 1e-3,
            "{p:?}"
        );
        let p = wilson(970, 1000, 1.96);
        assert!((p.value - 0.97).abs() < 1e-12 && p.low < 0.97 && p.high > 0.97);
        assert_eq!(wilson(0, 0, 1.96).n, 0);
    }

    #[test]
    fn ladder_and_unlearning_set() {
        assert_eq!(k_ladder(32), [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32]);
        assert_eq!(k_ladder(10), [0, 1, 2, 3, 4, 6, 8, 10]);
        assert_eq!(k_ladder(2), [0, 1, 2]);
        assert_eq!(*k_ladder(512).last().unwrap(), 512);
        let x = crate::rng::uniform(&[10, 1, 4, 4], 1);
        let y = Tensor::arange(10, (Kind::Int64, Device::Cpu)).remainder(3);
        let d = Dataset::new(x, y, 3, "toy").unwrap();
        let t = crate::trigger::Trigger {
            mask: Tensor::ones([1, 4, 4], (Kind::Float, Device::Cpu)),
            pattern: Tensor::zeros([1, 4, 4], (Kind::Float, Device::Cpu)),
        };
        let a = synthetic_attack(&t, 1, 3);
        let u = unlearning_set(&d, &a, 0.3, 7);
        assert_eq!(u.len(), 13);
        // the added images are stamped, under their true labels
        assert_eq!(
            u.images
                .narrow(0, 10, 3)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        let added = u.labels_vec()[10..].to_vec();
        assert!(added.iter().all(|l| (0..3).contains(l)));
        assert_eq!(unlearning_set(&d, &a, 0.0, 7).len(), 10);
    }
}
