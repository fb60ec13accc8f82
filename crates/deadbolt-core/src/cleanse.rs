//! Neural Cleanse for a model deadbolt did not train: a trigger per label,
//! all labels optimised together, on normalised model inputs.
//!
//! For every label `l`: a mask `m_l = sigmoid(a_l)` (`[1, H, W]`) and a
//! pattern `p_l = sigmoid(b_l)` (`[C, H, W]`, image space), stamped on a
//! clean image `x` (image space) as `(1 - m) x + m p` and normalised, which
//! on normalised inputs is `(1 - m) n(x) + m n(p)`. Loss per label:
//! `CE(f(x'), l) + lambda_l |m_l|_1`, minimised with Adam.
//!
//! Batched across labels: every step stamps one minibatch of clean images
//! with the triggers of a chunk of labels (all labels when
//! `labels x minibatch <= max_batch`) and runs one forward and backward
//! pass for the chunk; gradients go to the trigger parameters only.
//!
//! As in Neural Cleanse, `lambda_l` adapts per label: every
//! [`WINDOW`] steps, a label whose trigger sent at least `success_target`
//! of the window's images to it gets a larger penalty (x[`LAMBDA_STEP`]),
//! otherwise a smaller one; the trigger kept for a label is the one with
//! the smallest mask among the window ends that reached `success_target`
//! (the last one when none did). So every label's mask norm is the size of
//! a trigger that works, and the norms compare.
//!
//! The anomaly index of a label is Neural Cleanse's below-median deviation
//! over 1.4826 MAD ([`crate::analysis::reverse::anomaly_indices`]), taken
//! of the **logarithms** of the mask L1 norms ([`log_anomaly_indices`]):
//! the natural trigger sizes of clean labels vary by a factor (on MNIST
//! from about 50 to 140 pixels), so their spread is multiplicative, and on
//! a linear scale one large label inflates the MAD and hides a backdoor
//! label's small mask. (Measured on PyTorch-trained MNIST CNNs: a 4x4
//! patch backdoor scores 2.2 on the linear scale and 4.1 on the log scale;
//! clean labels stay below 1.1 on both.) The linear index is reported too.
//! A label is flagged when its index exceeds `anomaly_threshold` and its
//! trigger reaches `min_success` on the clean images of other labels.

use std::time::Instant;
use tch::{Device, Kind, Tensor};

use crate::analysis::reverse::{anomaly_indices, LabelResult, ReverseSummary, Reversed};
use crate::card::Normalizer;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::optim::TensorAdam;
use crate::progress::Progress;
use crate::trigger::Trigger;

/// Steps between penalty updates and best-trigger checks.
pub const WINDOW: usize = 10;
/// Factor by which a label's penalty grows or shrinks.
pub const LAMBDA_STEP: f64 = 1.4;
/// Initial mask parameter: masks start small (sigmoid(-3) = 0.047).
pub const MASK_INIT: f64 = -3.0;

pub use deadbolt_spec::byom::CleanseSpec;

/// Triggers (image space) for `labels`, optimised together.
fn optimise_chunk(
    model: &Model,
    norm: &Normalizer,
    images: &Tensor,
    true_labels: &Tensor,
    labels: &[i64],
    spec: &CleanseSpec,
    progress: &dyn Progress,
) -> Result<Vec<Trigger>> {
    let dev = model.device();
    let (c, h, w) = model.info.input_shape;
    let n = images.size()[0];
    let l = labels.len() as i64;
    let b = spec.minibatch.min(n);
    let mut mask_p = Tensor::full([l, 1, h, w], MASK_INIT, (Kind::Float, dev));
    let mut pat_p = Tensor::zeros([l, c, h, w], (Kind::Float, dev));
    let (mut adam_m, mut adam_p) = (TensorAdam::new(&mask_p), TensorAdam::new(&pat_p));
    let label_t = Tensor::from_slice(labels).to_device(dev);
    let targets = label_t.repeat_interleave_self_int(b, 0, None);
    let mean = Tensor::from_slice(&norm.mean.iter().map(|v| *v as f32).collect::<Vec<_>>())
        .view([1, -1, 1, 1])
        .to_device(dev);
    let std = Tensor::from_slice(&norm.std.iter().map(|v| *v as f32).collect::<Vec<_>>())
        .view([1, -1, 1, 1])
        .to_device(dev);
    let mut lambda = vec![spec.lambda; labels.len()];
    let (mut hits, mut counted) = (vec![0f64; labels.len()], vec![0f64; labels.len()]);
    let mut best: Vec<Option<(f64, Tensor, Tensor)>> = (0..labels.len()).map(|_| None).collect();
    let mut offset = 0i64;
    for step in 0..spec.steps {
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
        let p = (pp.sigmoid() - &mean) / &std; // normalised pattern
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
            adam_m.step(&mut mask_p, &grads[0], spec.lr);
            adam_p.step(&mut pat_p, &grads[1], spec.lr);
        });
        for i in 0..labels.len() {
            hits[i] += hit[i] as f64;
            counted[i] += cnt[i] as f64;
        }
        if (step + 1) % WINDOW == 0 || step + 1 == spec.steps {
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
                let works = success >= spec.success_target;
                if works
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
                if spec.adapt {
                    if works {
                        lambda[i] *= LAMBDA_STEP;
                    } else {
                        lambda[i] /= LAMBDA_STEP;
                    }
                    lambda[i] = lambda[i].clamp(spec.lambda * 1e-3, spec.lambda * 1e3);
                }
                hits[i] = 0.0;
                counted[i] = 0.0;
            }
        }
        progress.inc(1);
    }
    Ok((0..labels.len())
        .map(|i| {
            let (a, b) = match &best[i] {
                Some((_, a, b)) => (a.shallow_clone(), b.shallow_clone()),
                None => (mask_p.get(i as i64), pat_p.get(i as i64)),
            };
            Trigger {
                mask: a.sigmoid().to_device(Device::Cpu),
                pattern: b.sigmoid().to_device(Device::Cpu),
            }
        })
        .collect())
}

/// Neural Cleanse's anomaly index of the logarithms of positive norms (see
/// the module docs).
pub fn log_anomaly_indices(norms: &[f64]) -> Vec<f64> {
    let logs: Vec<f64> = norms.iter().map(|n| n.max(1e-6).ln()).collect();
    anomaly_indices(&logs)
}

/// Share of the images of other labels that a trigger (image space) sends
/// to `label`; `data` holds normalised images.
pub fn trigger_success(
    model: &Model,
    norm: &Normalizer,
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
    let x = norm.trigger_to_model(trigger).apply(&x);
    let pred = crate::eval::predict(model, &x, crate::eval::EVAL_BATCH);
    crate::eval::share_equal(&pred, &pred.full_like(label))
}

/// Reverse-engineers a trigger for every label of `model` from clean
/// `data` (normalised model inputs). The triggers in the result are in
/// image space (pattern in [0, 1]).
pub fn reverse_engineer(
    model: &Model,
    norm: &Normalizer,
    data: &Dataset,
    spec: &CleanseSpec,
    progress: &dyn Progress,
) -> Result<Reversed> {
    spec.validate()?;
    let t0 = Instant::now();
    let data = crate::analysis::shuffled_subset(data, spec.images, spec.seed);
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
    let per_chunk = (spec.max_batch / spec.minibatch.min(data.len()).max(1)).max(1);
    let all: Vec<i64> = (0..classes).collect();
    let chunks: Vec<&[i64]> = all.chunks(per_chunk as usize).collect();
    progress.start(
        "reverse-engineering triggers",
        (spec.steps * chunks.len()) as u64,
    );
    let mut triggers = Vec::new();
    for chunk in chunks {
        triggers.extend(optimise_chunk(
            model,
            norm,
            &images,
            &true_labels,
            chunk,
            spec,
            progress,
        )?);
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
            steps: spec.steps,
        })
        .collect();
    let norms: Vec<f64> = results.iter().map(|r| r.mask_l1).collect();
    let index = log_anomaly_indices(&norms);
    for (r, a) in results.iter_mut().zip(&index) {
        r.anomaly_index = *a;
        r.flagged = *a > spec.anomaly_threshold && r.attack_success >= spec.min_success;
    }
    let mut flagged: Vec<&LabelResult> = results.iter().filter(|r| r.flagged).collect();
    flagged.sort_by(|a, b| b.anomaly_index.total_cmp(&a.anomaly_index));
    let flagged_labels = flagged.iter().map(|r| r.label).collect();
    let seconds = t0.elapsed().as_secs_f64();
    progress.finish("reverse engineering done");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;

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

    #[test]
    fn batches_labels_in_chunks_and_checks_inputs() {
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
        let r = reverse_engineer(&m, &norm, &norm_data(&d, &norm), &spec, &Silent).unwrap();
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
        let bad = CleanseSpec {
            steps: 0,
            ..CleanseSpec::default()
        };
        let e = reverse_engineer(&m, &norm, &d, &bad, &Silent).unwrap_err();
        assert!(e.to_string().contains("cleanse.steps"), "{e}");
        let e = reverse_engineer(&m, &norm, &d.select_vec(&[]), &spec, &Silent).unwrap_err();
        assert!(matches!(e, Error::EmptyDataset(_)), "{e}");
    }

    fn norm_data(d: &Dataset, n: &Normalizer) -> Dataset {
        Dataset {
            images: n.apply(&d.images),
            ..d.clone()
        }
    }
}
