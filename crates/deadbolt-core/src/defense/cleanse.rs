//! Trigger reverse engineering, Neural Cleanse style: the one engine behind
//! the experiment's synthetic trigger and the scan's and repair's triggers.
//!
//! For every label `l`: a mask `m_l = sigmoid(a_l)` (`[1, H, W]`) and a
//! pattern `p_l = sigmoid(b_l)` (`[C, H, W]`, image space), stamped on a
//! clean image `x` as `(1 - m) x + m p`. On a model that takes normalised
//! inputs (a card's mean/std) the stamping is done on normalised images
//! with the normalised pattern, `(1 - m) n(x) + m n(p)`, which is the same
//! image since normalisation is affine per channel. Loss per label:
//! `CE(f(x'), l) + lambda_l |m_l|_1`, minimised with Adam
//! ([`crate::optim::TensorAdam`]); masks start small ([`MASK_INIT`]).
//!
//! Batched across labels: every step stamps one minibatch of a seeded
//! random subset of the clean images (cycled in order) with the triggers of
//! a chunk of labels (all labels when `labels x minibatch <= max_batch`, or
//! when there is no `max_batch`) and runs one forward and backward pass for
//! the chunk; gradients go to the trigger parameters only.
//!
//! [`Settings`] hold what the callers differ in:
//! - the experiment ([`Settings::synthetic`]): a fixed penalty, the last
//!   trigger of each label, all labels in one pass, the anomaly index of
//!   the mask norms on a linear scale;
//! - the scan and repair ([`Settings::byom`], from a [`CleanseSpec`]): as in
//!   Neural Cleanse, `lambda_l` adapts per label: every [`WINDOW`] steps, a
//!   label whose trigger sent at least `success_target` of the window's
//!   images (of other labels) to it gets a larger penalty (x[`LAMBDA_STEP`]),
//!   otherwise a smaller one; the trigger kept for a label is the one with
//!   the smallest mask among the window ends that reached `success_target`
//!   (the last one when none did), so every label's mask norm is the size
//!   of a trigger that works and the norms compare. Their anomaly index is
//!   taken of the **logarithms** of the mask L1 norms
//!   ([`log_anomaly_indices`]): the natural trigger sizes of clean labels
//!   vary by a factor (on MNIST from about 50 to 140 pixels), so their
//!   spread is multiplicative, and on a linear scale one large label
//!   inflates the MAD and hides a backdoor label's small mask. (Measured on
//!   PyTorch-trained MNIST CNNs: a 4x4 patch backdoor scores 2.2 on the
//!   linear scale and 4.1 on the log scale; clean labels stay below 1.1 on
//!   both.)
//!
//! Anomaly index per label: `(median - norm) / (1.4826 * MAD)` for norms
//! below the median (0 otherwise). A label is flagged when its index
//! exceeds `anomaly_threshold` and its trigger sends at least `min_success`
//! of the clean images of other labels to it.

use serde::{Deserialize, Serialize};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use super::{mad, median};
use crate::data::{shuffled_subset, Dataset};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::normalize::Normalizer;
use crate::optim::TensorAdam;
use crate::poison::Attack;
use crate::progress::Progress;
use crate::spec::{AttackSpec, SyntheticSpec, TargetMode, TriggerSpec};
use crate::trigger::Trigger;

pub use deadbolt_spec::byom::CleanseSpec;

/// Initial mask parameter: masks start small (sigmoid(-3) = 0.047 per
/// pixel) and grow where the label's loss wants them. Starting at 0.5
/// everywhere lets the optimiser settle on large, digit-shaped masks and
/// miss a small corner trigger.
pub const MASK_INIT: f64 = -3.0;
/// Steps between penalty updates and best-trigger checks.
pub const WINDOW: usize = 10;
/// Factor by which a label's penalty grows or shrinks.
pub const LAMBDA_STEP: f64 = 1.4;
/// The experiment's stamped images per label and step.
pub const SYNTHETIC_MINIBATCH: i64 = 12;
/// The experiment's seed of the image subset.
pub const SYNTHETIC_SEED: u64 = 0x4e43;
/// The experiment's least attack success of a flagged label's trigger.
pub const SYNTHETIC_MIN_SUCCESS: f64 = 0.5;

/// Which trigger a label keeps at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The one of the last step.
    Last,
    /// The smallest mask among the window ends whose trigger reached
    /// `success_target` (the last one when none did).
    SmallestWorking,
}

/// The scale on which mask norms are compared for the anomaly index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Linear,
    Log,
}

/// How the engine runs (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Optimisation steps (every label takes each one).
    pub steps: usize,
    /// Clean images used (a seeded random subset; 0 = all).
    pub images: usize,
    /// Seed of the image subset.
    pub seed: u64,
    /// Images per label and step.
    pub minibatch: i64,
    /// Most stamped images per forward pass (labels are chunked to fit);
    /// `None`: all labels in one pass.
    pub max_batch: Option<i64>,
    pub lr: f64,
    /// Weight of the mask's L1 norm (the initial one when `adapt`).
    pub lambda: f64,
    /// Adapt the weight per label every [`WINDOW`] steps.
    pub adapt: bool,
    /// Success on a window at which a trigger counts as working.
    pub success_target: f64,
    pub keep: Keep,
    pub scale: Scale,
    pub anomaly_threshold: f64,
    /// Success a flagged label's trigger needs on all images used.
    pub min_success: f64,
}

impl Settings {
    /// The experiment's synthetic trigger (`[defense.synthetic]`): a fixed
    /// penalty, the last trigger, all labels in one pass, linear norms.
    pub fn synthetic(spec: &SyntheticSpec) -> Settings {
        Settings {
            steps: spec.steps,
            images: spec.images,
            seed: SYNTHETIC_SEED,
            minibatch: SYNTHETIC_MINIBATCH,
            max_batch: None,
            lr: spec.lr,
            lambda: spec.lambda,
            adapt: false,
            success_target: 1.0,
            keep: Keep::Last,
            scale: Scale::Linear,
            anomaly_threshold: spec.anomaly_threshold,
            min_success: SYNTHETIC_MIN_SUCCESS,
        }
    }

    /// The scan's and repair's triggers (`[scan.cleanse]`, validated): the
    /// penalty adapted per label, the smallest working trigger, labels
    /// chunked to `max_batch`, log norms.
    pub fn byom(spec: &CleanseSpec) -> Result<Settings> {
        spec.validate()?;
        Ok(Settings {
            steps: spec.steps,
            images: spec.images,
            seed: spec.seed,
            minibatch: spec.minibatch,
            max_batch: Some(spec.max_batch),
            lr: spec.lr,
            lambda: spec.lambda,
            adapt: spec.adapt,
            success_target: spec.success_target,
            keep: Keep::SmallestWorking,
            scale: Scale::Log,
            anomaly_threshold: spec.anomaly_threshold,
            min_success: spec.min_success,
        })
    }
}

/// The reversed trigger of one candidate label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelResult {
    pub label: i64,
    /// L1 norm of the mask (in pixels).
    pub mask_l1: f64,
    /// Share of the clean images (not of this label) that the stamped
    /// trigger sends to this label.
    pub attack_success: f64,
    pub anomaly_index: f64,
    pub flagged: bool,
    /// Optimisation steps run.
    pub steps: usize,
}

/// The JSON-able outcome of reverse engineering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReverseSummary {
    pub labels: Vec<LabelResult>,
    /// Flagged labels, most anomalous first.
    pub flagged_labels: Vec<i64>,
    /// Anomaly index per label (indexed by label).
    pub anomaly_index: Vec<f64>,
    pub images: usize,
    pub seconds: f64,
}

/// Reversed triggers (one per label, image space) and their summary.
#[derive(Debug, Clone)]
pub struct Reversed {
    pub summary: ReverseSummary,
    /// Indexed by label.
    pub triggers: Vec<Trigger>,
}

impl Reversed {
    /// The most anomalous flagged label, if any.
    pub fn top_flagged(&self) -> Option<i64> {
        self.summary.flagged_labels.first().copied()
    }

    /// The trigger of the most anomalous flagged label, or, when none is
    /// flagged, of the label with the highest anomaly index.
    pub fn suspect(&self) -> (i64, &Trigger) {
        let label = self.top_flagged().unwrap_or_else(|| {
            self.summary
                .anomaly_index
                .iter()
                .enumerate()
                .fold((0usize, f64::NEG_INFINITY), |b, (i, v)| {
                    if *v > b.1 {
                        (i, *v)
                    } else {
                        b
                    }
                })
                .0 as i64
        });
        (label, &self.triggers[label as usize])
    }
}

/// Anomaly index per value: `(median - v) / (1.4826 * MAD)` for values
/// below the median, 0 otherwise (and 0 everywhere when the MAD is 0).
pub fn anomaly_indices(norms: &[f64]) -> Vec<f64> {
    let med = median(norms);
    let spread = 1.4826 * mad(norms);
    norms
        .iter()
        .map(|v| {
            if *v < med && spread > 0.0 {
                (med - v) / spread
            } else {
                0.0
            }
        })
        .collect()
}

/// Neural Cleanse's anomaly index of the logarithms of positive norms (see
/// the module docs).
pub fn log_anomaly_indices(norms: &[f64]) -> Vec<f64> {
    let logs: Vec<f64> = norms.iter().map(|n| n.max(1e-6).ln()).collect();
    anomaly_indices(&logs)
}

/// `[1, C, 1, 1]` of per-channel values, on `dev`.
fn channel_column(v: &[f64], dev: Device) -> Tensor {
    Tensor::from_slice(&v.iter().map(|x| *x as f32).collect::<Vec<_>>())
        .view([1, -1, 1, 1])
        .to_device(dev)
}

/// The trigger parameters of a chunk of labels after optimisation, and per
/// label the smallest working ones seen at a window end.
struct Optimised {
    mask_p: Tensor,
    pat_p: Tensor,
    best: Vec<Option<(f64, Tensor, Tensor)>>,
}

impl Optimised {
    /// The kept triggers, in image space, on the CPU.
    fn triggers(&self, keep: Keep) -> Vec<Trigger> {
        let n = self.best.len() as i64;
        match keep {
            Keep::Last => {
                let masks = self.mask_p.sigmoid().to_device(Device::Cpu);
                let patterns = self.pat_p.sigmoid().to_device(Device::Cpu);
                (0..n)
                    .map(|i| Trigger {
                        mask: masks.get(i),
                        pattern: patterns.get(i),
                    })
                    .collect()
            }
            Keep::SmallestWorking => (0..n)
                .map(|i| {
                    let (a, b) = match &self.best[i as usize] {
                        Some((_, a, b)) => (a.shallow_clone(), b.shallow_clone()),
                        None => (self.mask_p.get(i), self.pat_p.get(i)),
                    };
                    Trigger {
                        mask: a.sigmoid().to_device(Device::Cpu),
                        pattern: b.sigmoid().to_device(Device::Cpu),
                    }
                })
                .collect(),
        }
    }
}

/// Optimises the triggers of `labels` together.
fn optimise_chunk(
    model: &Model,
    norm: Option<&Normalizer>,
    images: &Tensor,
    true_labels: &Tensor,
    labels: &[i64],
    s: &Settings,
    progress: &dyn Progress,
) -> Result<Optimised> {
    let dev = model.device();
    let (c, h, w) = model.info.input_shape;
    let n = images.size()[0];
    let l = labels.len() as i64;
    let b = s.minibatch.min(n);
    let mut mask_p = Tensor::full([l, 1, h, w], MASK_INIT, (Kind::Float, dev));
    let mut pat_p = Tensor::zeros([l, c, h, w], (Kind::Float, dev));
    let (mut adam_m, mut adam_p) = (TensorAdam::new(&mask_p), TensorAdam::new(&pat_p));
    let label_t = Tensor::from_slice(labels).to_device(dev);
    let targets = label_t.repeat_interleave_self_int(b, 0, None);
    let mean_std = norm.map(|nm| (channel_column(&nm.mean, dev), channel_column(&nm.std, dev)));
    let mut lambda = vec![s.lambda; labels.len()];
    let (mut hits, mut counted) = (vec![0f64; labels.len()], vec![0f64; labels.len()]);
    let mut best: Vec<Option<(f64, Tensor, Tensor)>> = (0..labels.len()).map(|_| None).collect();
    let mut offset = 0i64;
    for step in 0..s.steps {
        if progress.cancelled() {
            return Err(Error::Cancelled);
        }
        let idx: Vec<i64> = (0..b).map(|i| (offset + i) % n).collect();
        offset = (offset + b) % n;
        let idx = Tensor::from_slice(&idx).to_device(dev);
        let x = images.index_select(0, &idx);
        let y = true_labels.index_select(0, &idx);
        let mp = mask_p.detach().set_requires_grad(true);
        let pp = pat_p.detach().set_requires_grad(true);
        let m = mp.sigmoid();
        let p = match &mean_std {
            Some((mean, std)) => (pp.sigmoid() - mean) / std, // normalised pattern
            None => pp.sigmoid(),
        };
        // [L, B, C, H, W]
        let keep: Tensor = 1.0 - m.unsqueeze(1);
        let stamped = x.unsqueeze(0) * keep + (&m * &p).unsqueeze(1);
        let logits = model.forward_t(&stamped.view([l * b, c, h, w]), false);
        let ce = logits
            .cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::None, -100, 0.0)
            .view([l, b])
            .mean_dim(1, false, Kind::Float);
        let l1 = m.sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float);
        let lam = Tensor::from_slice(&lambda.iter().map(|v| *v as f32).collect::<Vec<_>>())
            .to_device(dev);
        let loss = (&ce + &l1 * &lam).sum(Kind::Float);
        let grads = Tensor::f_run_backward(&[loss], &[&mp, &pp], false, false)?;
        // success on the images of other labels
        let (hit, cnt) = tch::no_grad(|| {
            let pred = logits.argmax(1, false).view([l, b]);
            let other = y.unsqueeze(0).ne_tensor(&label_t.unsqueeze(1));
            let hit = pred
                .eq_tensor(&label_t.unsqueeze(1))
                .logical_and(&other)
                .sum_dim_intlist(1, false, Kind::Float);
            let cnt = other.sum_dim_intlist(1, false, Kind::Float);
            (
                Vec::<f32>::try_from(hit.to_device(Device::Cpu)),
                Vec::<f32>::try_from(cnt.to_device(Device::Cpu)),
            )
        });
        let (hit, cnt) = (hit?, cnt?);
        tch::no_grad(|| {
            adam_m.step(&mut mask_p, &grads[0], s.lr);
            adam_p.step(&mut pat_p, &grads[1], s.lr);
        });
        for i in 0..labels.len() {
            hits[i] += hit[i] as f64;
            counted[i] += cnt[i] as f64;
        }
        if (step + 1) % WINDOW == 0 || step + 1 == s.steps {
            let norms = Vec::<f32>::try_from(
                tch::no_grad(|| {
                    mask_p
                        .sigmoid()
                        .sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float)
                })
                .to_device(Device::Cpu),
            )?;
            for i in 0..labels.len() {
                let success = if counted[i] > 0.0 {
                    hits[i] / counted[i]
                } else {
                    0.0
                };
                let works = success >= s.success_target;
                if s.keep == Keep::SmallestWorking
                    && works
                    && best[i]
                        .as_ref()
                        .is_none_or(|(bn, _, _)| (norms[i] as f64) < *bn)
                {
                    best[i] = Some((
                        norms[i] as f64,
                        mask_p.get(i as i64).detach().copy(),
                        pat_p.get(i as i64).detach().copy(),
                    ));
                }
                if s.adapt {
                    if works {
                        lambda[i] *= LAMBDA_STEP;
                    } else {
                        lambda[i] /= LAMBDA_STEP;
                    }
                    lambda[i] = lambda[i].clamp(s.lambda * 1e-3, s.lambda * 1e3);
                }
                hits[i] = 0.0;
                counted[i] = 0.0;
            }
        }
        progress.inc(1);
    }
    Ok(Optimised {
        mask_p,
        pat_p,
        best,
    })
}

/// Share of the images of other labels that a trigger (image space) sends
/// to `label`; `data` holds model inputs (normalised with `norm`, when
/// given).
pub fn trigger_success(
    model: &Model,
    norm: Option<&Normalizer>,
    data: &Dataset,
    trigger: &Trigger,
    label: i64,
) -> f64 {
    let others = data.labels.ne(label).nonzero().squeeze_dim(1);
    if others.size()[0] == 0 {
        return 0.0;
    }
    let x = data
        .images
        .index_select(0, &others.to_device(data.images.device()));
    let x = match norm {
        Some(norm) => norm.trigger_to_model(trigger).apply(&x),
        None => trigger.apply(&x),
    };
    let pred = crate::eval::predict(model, &x, crate::eval::EVAL_BATCH);
    crate::eval::share_equal(&pred, &pred.full_like(label))
}

/// Reverse-engineers a trigger for every label of `model` from clean
/// `data` (model inputs: normalised with `norm` when the model takes
/// normalised inputs). The triggers in the result are in image space
/// (pattern in [0, 1]). Deterministic given torch's global seed state (the
/// minibatch order is a fixed cycle).
pub fn reverse_engineer(
    model: &Model,
    norm: Option<&Normalizer>,
    data: &Dataset,
    settings: &Settings,
    progress: &dyn Progress,
) -> Result<Reversed> {
    let s = settings;
    let t0 = Instant::now();
    let data = shuffled_subset(data, s.images, s.seed);
    if data.is_empty() {
        return Err(Error::EmptyDataset(
            "no clean images for trigger reverse engineering".into(),
        ));
    }
    if data.image_shape() != model.info.input_shape {
        return Err(Error::invalid(
            "images",
            format!(
                "images are {:?} but the model takes {:?}",
                data.image_shape(),
                model.info.input_shape
            ),
        ));
    }
    let dev = model.device();
    let images = data.images.to_device(dev);
    let true_labels = data.labels.to_device(dev);
    let classes = model.info.classes;
    let per_chunk = match s.max_batch {
        Some(max) => (max / s.minibatch.min(data.len()).max(1)).max(1),
        None => classes.max(1),
    };
    let all: Vec<i64> = (0..classes).collect();
    let chunks: Vec<&[i64]> = all.chunks(per_chunk as usize).collect();
    progress.start(
        "reverse-engineering triggers",
        (s.steps * chunks.len()) as u64,
    );
    let mut triggers = Vec::new();
    for chunk in chunks {
        let optimised = optimise_chunk(model, norm, &images, &true_labels, chunk, s, progress)?;
        triggers.extend(optimised.triggers(s.keep));
    }
    let mut results: Vec<LabelResult> = triggers
        .iter()
        .enumerate()
        .map(|(label, t)| LabelResult {
            label: label as i64,
            mask_l1: t.mask.sum(Kind::Double).double_value(&[]),
            attack_success: trigger_success(model, norm, &data, t, label as i64),
            anomaly_index: 0.0,
            flagged: false,
            steps: s.steps,
        })
        .collect();
    let norms: Vec<f64> = results.iter().map(|r| r.mask_l1).collect();
    let index = match s.scale {
        Scale::Linear => anomaly_indices(&norms),
        Scale::Log => log_anomaly_indices(&norms),
    };
    for (r, a) in results.iter_mut().zip(&index) {
        r.anomaly_index = *a;
        r.flagged = *a > s.anomaly_threshold && r.attack_success >= s.min_success;
    }
    let mut flagged: Vec<&LabelResult> = results.iter().filter(|r| r.flagged).collect();
    flagged.sort_by(|a, b| b.anomaly_index.total_cmp(&a.anomaly_index));
    let flagged_labels: Vec<i64> = flagged.iter().map(|r| r.label).collect();
    let seconds = t0.elapsed().as_secs_f64();
    progress.finish("reverse engineering done");
    tracing::info!(seconds, flagged = ?flagged_labels, "reverse engineering done");
    Ok(Reversed {
        summary: ReverseSummary {
            labels: results,
            flagged_labels,
            anomaly_index: index,
            images: data.len() as usize,
            seconds,
        },
        triggers,
    })
}

/// An all-to-one attack made of a synthetic trigger and its label, for
/// building triggered evaluation sets.
pub fn synthetic_attack(trigger: &Trigger, target: i64, classes: i64) -> Attack {
    Attack {
        spec: AttackSpec {
            // placeholder recipe: only `target` and `target_mode` are used
            trigger: TriggerSpec::Blend {
                alpha: 1.0,
                pattern: Default::default(),
            },
            target_mode: TargetMode::AllToOne,
            target,
            rate: 0.0,
            seed: 0,
        },
        trigger: trigger.clone().into(),
        classes,
    }
}

/// Saves a trigger as safetensors (`mask`, `pattern`).
pub fn save_trigger(trigger: &Trigger, path: &std::path::Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    Tensor::write_safetensors(
        &[
            ("mask", &trigger.mask.to_device(Device::Cpu)),
            ("pattern", &trigger.pattern.to_device(Device::Cpu)),
        ],
        path,
    )
    .map_err(|e| Error::checkpoint(path, e.to_string()))
}

/// Loads a trigger written by [`save_trigger`].
pub fn load_trigger(path: &std::path::Path) -> Result<Trigger> {
    let named =
        Tensor::read_safetensors(path).map_err(|e| Error::checkpoint(path, e.to_string()))?;
    let find = |name: &str| {
        named
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
            .ok_or_else(|| Error::checkpoint(path, format!("no tensor named {name:?}")))
    };
    let (mask, pattern) = (find("mask")?, find("pattern")?);
    let (md, pd) = (mask.size(), pattern.size());
    if md.len() != 3 || pd.len() != 3 || md[0] != 1 || md[1..] != pd[1..] {
        return Err(Error::checkpoint(
            path,
            format!("mask {md:?} and pattern {pd:?} are not [1, H, W] and [C, H, W]"),
        ));
    }
    Ok(Trigger { mask, pattern })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;
    use crate::spec::{PatchPattern, PatchPosition, TrainingSpec};

    #[test]
    fn anomaly_index_flags_the_small_outlier() {
        let norms = [40.0, 42.0, 38.0, 41.0, 5.0, 39.0, 43.0, 40.0];
        let a = anomaly_indices(&norms);
        assert!(a[4] > 5.0, "{a:?}");
        assert!(
            a.iter().enumerate().all(|(i, v)| i == 4 || *v < 2.0),
            "{a:?}"
        );
        assert_eq!(a[6], 0.0, "above the median is never anomalous");
        assert_eq!(anomaly_indices(&[3.0, 3.0, 3.0]), [0.0, 0.0, 0.0]);
    }

    #[test]
    fn log_index_is_scale_free() {
        // the mask norms of a PyTorch-trained MNIST CNN with a 4x4 patch backdoor toward 3
        let n = [67.2, 119.4, 51.0, 22.0, 82.6, 62.0, 89.0, 90.7, 56.0, 91.6];
        let a = log_anomaly_indices(&n);
        let b = log_anomaly_indices(&n.map(|v| v * 3.0));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-9);
        }
        assert!(
            a[3] > 3.0 && a.iter().enumerate().all(|(i, v)| i == 3 || *v < 1.5),
            "{a:?}"
        );
        assert!(anomaly_indices(&n)[3] < 2.5, "the linear index hides it");
    }

    /// Eight classes of noisy blobs (a 5x5 blob at one of eight places of a
    /// 3x3 grid); 15% of the training images carry a 3x3 white corner patch
    /// and are relabelled to class 2. Eight labels, not fewer, because the
    /// anomaly index is a median statistic over the labels.
    #[test]
    fn flags_the_planted_label_of_a_small_backdoored_model() {
        let (classes, size) = (8i64, 24i64);
        let clean = blobs(960, classes, size, 101, (0.2, 0.7), (2, 7, 7));
        let attack = Attack::for_dataset(
            &AttackSpec {
                trigger: TriggerSpec::Patch {
                    size: 3,
                    position: PatchPosition::default(),
                    pattern: PatchPattern::Solid,
                    value: 1.0,
                },
                target_mode: TargetMode::AllToOne,
                target: 2,
                rate: 0.15,
                seed: 1,
            },
            &clean,
        )
        .unwrap();
        let poisoned = attack.poison(&clean).unwrap();
        let mut m = crate::model::test_badnet(classes, (size, size), 5);
        train(&mut m, &poisoned.data, 8);
        let metrics = crate::eval::evaluate(&m, &clean, Some(&attack)).unwrap();
        assert!(
            metrics.acc > 0.9 && metrics.asr.unwrap() > 0.9,
            "{metrics:?}"
        );
        let spec = SyntheticSpec {
            steps: 200,
            images: 64,
            ..Default::default()
        };
        let r = reverse_engineer(&m, None, &clean, &Settings::synthetic(&spec), &Silent).unwrap();
        let s = &r.summary;
        assert_eq!(s.flagged_labels.first(), Some(&2), "{s:#?}");
        assert!(s.labels[2].attack_success > 0.9, "{s:#?}");
        assert_eq!(r.suspect().0, 2);
        // round-trip the reversed trigger
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        save_trigger(&r.triggers[2], &p).unwrap();
        let back = load_trigger(&p).unwrap();
        assert!(back.mask.equal(&r.triggers[2].mask));
        assert!(load_trigger(&dir.path().join("none"))
            .unwrap_err()
            .to_string()
            .contains("none"));
    }

    #[test]
    fn rejects_empty_and_mismatched_images() {
        let m = crate::model::test_badnet(3, (16, 16), 0);
        let d = Dataset::new(
            crate::rng::uniform(&[4, 1, 20, 20], 102),
            Tensor::from_slice(&[0i64, 1, 2, 0]),
            3,
            "x",
        )
        .unwrap();
        let synthetic = Settings::synthetic(&SyntheticSpec::default());
        let e = reverse_engineer(&m, None, &d, &synthetic, &Silent).unwrap_err();
        assert!(e.to_string().contains("images"), "{e}");
        let e = reverse_engineer(&m, None, &d.select_vec(&[]), &synthetic, &Silent).unwrap_err();
        assert!(matches!(e, Error::EmptyDataset(_)), "{e}");
        let bad = CleanseSpec {
            steps: 0,
            ..CleanseSpec::default()
        };
        let e = Settings::byom(&bad).unwrap_err();
        assert!(e.to_string().contains("cleanse.steps"), "{e}");
    }

    #[test]
    fn batches_labels_in_chunks() {
        let m = crate::model::test_badnet(5, (16, 16), 0);
        let x = crate::rng::uniform(&[20, 1, 16, 16], 1);
        let y = Tensor::arange(20, (Kind::Int64, Device::Cpu)).remainder(5);
        let d = Dataset::new(x, y, 5, "toy").unwrap();
        let norm = Normalizer {
            mean: vec![0.5],
            std: vec![0.25],
        };
        // two labels per chunk: three chunks
        let spec = CleanseSpec {
            steps: 3,
            minibatch: 4,
            max_batch: 8,
            ..CleanseSpec::default()
        };
        let r = byom_run(&m, &d, &norm, &spec);
        assert_eq!(r.triggers.len(), 5);
        assert_eq!(r.summary.labels.len(), 5);
        for t in &r.triggers {
            assert_eq!(t.mask.size(), [1, 16, 16]);
            let (lo, hi) = (
                t.pattern.min().double_value(&[]),
                t.pattern.max().double_value(&[]),
            );
            assert!(lo >= 0.0 && hi <= 1.0, "patterns are in image space");
        }
        let settings = Settings::byom(&spec).unwrap();
        let e =
            reverse_engineer(&m, Some(&norm), &d.select_vec(&[]), &settings, &Silent).unwrap_err();
        assert!(matches!(e, Error::EmptyDataset(_)), "{e}");
    }

    /// Every label's mask norm and attack success on a small fixed-seed
    /// model, in the experiment's and in the scan's settings, as the two
    /// engines computed them before they became this one (which matched
    /// them bit for bit: the test of `cleanse_legacy.rs` in this file's
    /// history). A change of schedule, initialisation, batching, image
    /// order or kept trigger moves them far beyond the tolerance, which
    /// only absorbs rounding differences between CPUs.
    #[test]
    fn pinned_figures_of_both_settings() {
        fn close(got: &[f64], want: &[f64]) -> bool {
            got.len() == want.len()
                && got
                    .iter()
                    .zip(want)
                    .all(|(g, w)| (g - w).abs() <= 1e-5 * w.abs().max(1.0))
        }
        let (m, d) = toy();
        let spec = SyntheticSpec {
            steps: 25,
            images: 60,
            ..Default::default()
        };
        let r = reverse_engineer(&m, None, &d, &Settings::synthetic(&spec), &Silent).unwrap();
        let synthetic = figures(&r);

        let norm = Normalizer {
            mean: vec![0.2],
            std: vec![0.3],
        };
        let spec = CleanseSpec {
            steps: 25,
            images: 60,
            minibatch: 4,
            max_batch: 8,
            success_target: 0.3,
            ..CleanseSpec::default()
        };
        let byom = figures(&byom_run(&m, &d, &norm, &spec));
        assert!(
            close(&synthetic.0, &PINNED_SYNTHETIC_NORMS)
                && close(&synthetic.1, &PINNED_SYNTHETIC_SUCCESS)
                && close(&byom.0, &PINNED_BYOM_NORMS)
                && close(&byom.1, &PINNED_BYOM_SUCCESS),
            "mask norms and success: synthetic {synthetic:?}, byom {byom:?}"
        );
    }

    const PINNED_SYNTHETIC_NORMS: [f64; 6] = [
        45.27465534210205,
        49.54147436097264,
        48.19059250084683,
        38.64966781111434,
        34.72675878601149,
        42.76539804134518,
    ];
    const PINNED_SYNTHETIC_SUCCESS: [f64; 6] = [
        0.9090909361839294,
        0.7818182110786438,
        0.15217390656471252,
        0.2978723347187042,
        0.0,
        0.28260868787765503,
    ];
    const PINNED_BYOM_NORMS: [f64; 6] = [
        27.352667500264943,
        34.42344792466611,
        33.23413772881031,
        24.549862198531628,
        25.395940594375134,
        27.477658607065678,
    ];
    const PINNED_BYOM_SUCCESS: [f64; 6] = [0.0, 0.1090909093618393, 0.0, 0.0, 0.0, 0.0];

    /// `n` images of `classes` classes: uniform noise up to `noise`, and a
    /// 5x5 blob lifted by `lift` at one of the places of a 3-column grid
    /// (`first` row and column, `row_step` and `col_step` apart) per class.
    fn blobs(
        n: i64,
        classes: i64,
        size: i64,
        seed: u64,
        (noise, lift): (f64, f64),
        (first, row_step, col_step): (i64, i64, i64),
    ) -> Dataset {
        let x = crate::rng::uniform(&[n, 1, size, size], seed) * noise;
        let y = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(classes);
        for i in 0..n {
            let q = i % classes;
            let _ = x
                .get(i)
                .narrow(1, first + (q / 3) * row_step, 5)
                .narrow(2, first + (q % 3) * col_step, 5)
                .g_add_scalar_(lift);
        }
        Dataset::new(x, y, classes, "blobs").unwrap()
    }

    /// Trains `m` on `d` for `epochs` (SGD, lr 0.03, batches of 32).
    fn train(m: &mut Model, d: &Dataset, epochs: usize) {
        let ts = TrainingSpec {
            epochs,
            batch_size: 32,
            lr: 0.03,
            ..Default::default()
        };
        let start = crate::train::Start::fresh();
        crate::train::train(m, d, &ts, 0, start, &Silent, |_, _, _| Ok(())).unwrap();
    }

    /// A small model, briefly trained on six classes of blobs (so some
    /// triggers work and some do not), and its data.
    fn toy() -> (Model, Dataset) {
        let d = blobs(240, 6, 16, 7, (0.3, 0.6), (1, 7, 5));
        let mut m = crate::model::test_badnet(6, (16, 16), 2);
        train(&mut m, &d, 2);
        (m, d)
    }

    /// The scan's settings on `d` normalised with `norm`.
    fn byom_run(m: &Model, d: &Dataset, norm: &Normalizer, spec: &CleanseSpec) -> Reversed {
        let normalised = Dataset {
            images: norm.apply(&d.images),
            ..d.clone()
        };
        let settings = Settings::byom(spec).unwrap();
        reverse_engineer(m, Some(norm), &normalised, &settings, &Silent).unwrap()
    }

    /// Every label's mask norm and attack success.
    fn figures(r: &Reversed) -> (Vec<f64>, Vec<f64>) {
        let l = &r.summary.labels;
        (
            l.iter().map(|l| l.mask_l1).collect(),
            l.iter().map(|l| l.attack_success).collect(),
        )
    }
}
