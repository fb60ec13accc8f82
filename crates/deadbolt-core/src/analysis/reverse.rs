//! Synthetic triggers, Neural Cleanse style: for every candidate label, the
//! smallest mask `m` (`[1, H, W]`, sigmoid of a parameter) and a pattern `p`
//! (`[C, H, W]`, sigmoid of a parameter) such that clean images stamped
//! `x' = (1 - m) x + m p` are classified as the label. Loss per label:
//! `CE(f(x'), label) + lambda * |m|_1`, minimised with Adam.
//!
//! All labels are optimised together: one batched forward of
//! `labels x minibatch` stamped images per step, gradients only for the
//! mask/pattern parameters (the model is untouched). The images are a
//! seeded random subset of `spec.images` clean images, cycled in
//! minibatches of [`MINIBATCH`]; masks start small ([`MASK_INIT`]).
//!
//! Anomaly index per label: `(median - norm) / (1.4826 * MAD)` of the mask
//! L1 norms for labels below the median (0 otherwise). A label is flagged
//! when its index exceeds `anomaly_threshold` and its reversed trigger
//! reaches at least [`MIN_SUCCESS`] attack success on the clean images used.

use serde::{Deserialize, Serialize};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use super::{mad, median};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::optim::TensorAdam;
use crate::poison::Attack;
use crate::progress::Progress;
use crate::spec::{AttackSpec, SyntheticSpec, TargetMode, TriggerSpec};
use crate::trigger::Trigger;

/// Stamped images per label and step.
pub const MINIBATCH: i64 = 12;
/// Seed of the image subset.
pub const SUBSET_SEED: u64 = 0x4e43;
/// Initial mask parameter: masks start small (sigmoid(-3) = 0.047 per
/// pixel) and grow where the label's loss wants them. Starting at 0.5
/// everywhere lets the optimiser settle on large, digit-shaped masks and
/// miss a small corner trigger.
pub const MASK_INIT: f64 = -3.0;
/// Minimum attack success of a reversed trigger for its label to be flagged.
pub const MIN_SUCCESS: f64 = 0.5;

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

/// Reversed triggers (one per label) and their summary.
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

/// Reverse-engineers a trigger for every label of `model` from clean `data`
/// (the first `spec.images` images are used). Deterministic given torch's
/// global seed state (the minibatch order is a fixed cycle).
pub fn reverse_engineer(
    model: &Model,
    data: &Dataset,
    spec: &SyntheticSpec,
    progress: &dyn Progress,
) -> Result<Reversed> {
    let t0 = Instant::now();
    let data = super::shuffled_subset(data, spec.images, SUBSET_SEED);
    if data.is_empty() {
        return Err(Error::EmptyDataset(
            "no clean images for trigger reverse engineering".into(),
        ));
    }
    let (c, h, w) = data.image_shape();
    if (c, h, w) != model.info.input_shape {
        return Err(Error::invalid(
            "images",
            format!(
                "images are {:?} but the model takes {:?}",
                (c, h, w),
                model.info.input_shape
            ),
        ));
    }
    let classes = model.info.classes;
    let dev = model.device();
    let images = data.images.to_device(dev);
    let n = data.len();
    let l = classes;
    let mut mask_p = Tensor::full([l, 1, h, w], MASK_INIT, (Kind::Float, dev));
    let mut pat_p = Tensor::zeros([l, c, h, w], (Kind::Float, dev));
    let (mut adam_m, mut adam_p) = (TensorAdam::new(&mask_p), TensorAdam::new(&pat_p));
    let b = MINIBATCH.min(n);
    let targets = Tensor::arange(l, (Kind::Int64, dev)).repeat_interleave_self_int(b, 0, None);
    progress.start("reverse-engineering triggers", spec.steps as u64);
    let mut offset = 0i64;
    for _step in 0..spec.steps {
        if progress.cancelled() {
            return Err(Error::Cancelled);
        }
        let idx: Vec<i64> = (0..b).map(|i| (offset + i) % n).collect();
        offset = (offset + b) % n;
        let x = images.index_select(0, &Tensor::from_slice(&idx).to_device(dev));
        let mp = mask_p.detach().set_requires_grad(true);
        let pp = pat_p.detach().set_requires_grad(true);
        let m = mp.sigmoid();
        let p = pp.sigmoid();
        // [L, B, C, H, W]
        let keep: Tensor = 1.0 - m.unsqueeze(1);
        let stamped = x.unsqueeze(0) * keep + (&m * &p).unsqueeze(1);
        let logits = model.forward_t(&stamped.view([l * b, c, h, w]), false);
        let ce = logits
            .cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::None, -100, 0.0)
            .view([l, b])
            .mean_dim(1, false, Kind::Float);
        let l1 = m.sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float);
        let loss = (&ce + &l1 * spec.lambda).sum(Kind::Float);
        let grads = Tensor::f_run_backward(&[loss], &[&mp, &pp], false, false)?;
        tch::no_grad(|| {
            adam_m.step(&mut mask_p, &grads[0], spec.lr);
            adam_p.step(&mut pat_p, &grads[1], spec.lr);
        });
        progress.inc(1);
    }
    // final triggers and their attack success on all the images
    let masks = mask_p.sigmoid().to_device(Device::Cpu);
    let patterns = pat_p.sigmoid().to_device(Device::Cpu);
    let labels = data.labels.to_device(Device::Cpu);
    let mut results = Vec::new();
    let mut triggers = Vec::new();
    for label in 0..l {
        let trig = Trigger {
            mask: masks.get(label),
            pattern: patterns.get(label),
        };
        let others = labels.ne(label).nonzero().squeeze_dim(1);
        let success = if others.size()[0] == 0 {
            0.0
        } else {
            let x = trig.apply(&data.images.to_device(Device::Cpu).index_select(0, &others));
            let pred = crate::eval::predict(model, &x, crate::eval::EVAL_BATCH);
            crate::eval::share_equal(&pred, &pred.full_like(label))
        };
        results.push(LabelResult {
            label,
            mask_l1: trig.mask.sum(Kind::Double).double_value(&[]),
            attack_success: success,
            anomaly_index: 0.0,
            flagged: false,
            steps: spec.steps,
        });
        triggers.push(trig);
    }
    let norms: Vec<f64> = results.iter().map(|r| r.mask_l1).collect();
    let index = anomaly_indices(&norms);
    for (r, a) in results.iter_mut().zip(&index) {
        r.anomaly_index = *a;
        r.flagged = *a > spec.anomaly_threshold && r.attack_success >= MIN_SUCCESS;
    }
    let mut flagged: Vec<&LabelResult> = results.iter().filter(|r| r.flagged).collect();
    flagged.sort_by(|a, b| b.anomaly_index.total_cmp(&a.anomaly_index));
    let flagged_labels = flagged.iter().map(|r| r.label).collect();
    let seconds = t0.elapsed().as_secs_f64();
    progress.finish("reverse engineering done");
    tracing::info!(seconds, flagged = ?flagged_labels_dbg(&results), "reverse engineering done");
    Ok(Reversed {
        summary: ReverseSummary {
            labels: results,
            flagged_labels,
            anomaly_index: index,
            images: n as usize,
            seconds,
        },
        triggers,
    })
}

fn flagged_labels_dbg(r: &[LabelResult]) -> Vec<i64> {
    r.iter().filter(|x| x.flagged).map(|x| x.label).collect()
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

    /// Eight classes of noisy blobs (a 5x5 blob at one of eight places of a
    /// 3x3 grid); 15% of the training images carry a 3x3 white corner patch
    /// and are relabelled to class 2. Eight labels, not fewer, because the
    /// anomaly index is a median statistic over the labels.
    #[test]
    fn flags_the_planted_label_of_a_small_backdoored_model() {
        let (n, classes, size) = (960i64, 8i64, 24i64);
        let x = crate::rng::uniform(&[n, 1, size, size], 101) * 0.2;
        let y = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(classes);
        for i in 0..n {
            let q = i % classes;
            let _ = x
                .get(i)
                .narrow(1, 2 + (q / 3) * 7, 5)
                .narrow(2, 2 + (q % 3) * 7, 5)
                .g_add_scalar_(0.7);
        }
        let clean = Dataset::new(x, y, classes, "blobs").unwrap();
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
        let ts = TrainingSpec {
            epochs: 8,
            batch_size: 32,
            lr: 0.03,
            ..Default::default()
        };
        crate::train::train(
            &mut m,
            &poisoned.data,
            &ts,
            0,
            crate::train::Start::fresh(),
            &Silent,
            |_, _, _| Ok(()),
        )
        .unwrap();
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
        let r = reverse_engineer(&m, &clean, &spec, &Silent).unwrap();
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
        let e = reverse_engineer(&m, &d, &SyntheticSpec::default(), &Silent).unwrap_err();
        assert!(e.to_string().contains("images"), "{e}");
        let e = reverse_engineer(&m, &d.select_vec(&[]), &SyntheticSpec::default(), &Silent)
            .unwrap_err();
        assert!(matches!(e, Error::EmptyDataset(_)), "{e}");
    }
}
