//! The two engines as they were before they became one
//! ([`super::cleanse`]), verbatim but for paths: the experiment's
//! (`analysis/reverse.rs`) and the scan's (`cleanse.rs`). Test-only, to
//! show the one engine reproduces both bit for bit.

use std::time::Instant;
use tch::{Device, Kind, Tensor};

use super::cleanse::{
    anomaly_indices, log_anomaly_indices, CleanseSpec, LabelResult, ReverseSummary, Reversed,
    LAMBDA_STEP, MASK_INIT, SYNTHETIC_MINIBATCH, SYNTHETIC_MIN_SUCCESS, SYNTHETIC_SEED, WINDOW,
};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::normalize::Normalizer;
use crate::optim::TensorAdam;
use crate::progress::Progress;
use crate::spec::SyntheticSpec;
use crate::trigger::Trigger;

/// Reverse-engineers a trigger for every label of `model` from clean `data`
/// (the first `spec.images` images are used). Deterministic given torch's
/// global seed state (the minibatch order is a fixed cycle).
pub fn synthetic(
    model: &Model,
    data: &Dataset,
    spec: &SyntheticSpec,
    progress: &dyn Progress,
) -> Result<Reversed> {
    let t0 = Instant::now();
    let data = crate::data::shuffled_subset(data, spec.images, SYNTHETIC_SEED);
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
    let b = SYNTHETIC_MINIBATCH.min(n);
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
        r.flagged = *a > spec.anomaly_threshold && r.attack_success >= SYNTHETIC_MIN_SUCCESS;
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

/// Share of the images of other labels that a trigger (image space) sends
/// to `label`; `data` holds normalised images.
fn trigger_success(
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
pub fn byom(
    model: &Model,
    norm: &Normalizer,
    data: &Dataset,
    spec: &CleanseSpec,
    progress: &dyn Progress,
) -> Result<Reversed> {
    spec.validate()?;
    let t0 = Instant::now();
    let data = crate::data::shuffled_subset(data, spec.images, spec.seed);
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
    use super::super::cleanse::tests::toy;
    use super::super::cleanse::{reverse_engineer, Settings};
    use super::*;
    use crate::progress::Silent;

    fn same(a: &Reversed, b: &Reversed, what: &str) {
        let (mut sa, mut sb) = (a.summary.clone(), b.summary.clone());
        (sa.seconds, sb.seconds) = (0.0, 0.0);
        assert_eq!(sa, sb, "{what}");
        assert_eq!(a.triggers.len(), b.triggers.len(), "{what}");
        for (i, (x, y)) in a.triggers.iter().zip(&b.triggers).enumerate() {
            assert!(x.mask.equal(&y.mask), "{what}: mask of label {i}");
            assert!(x.pattern.equal(&y.pattern), "{what}: pattern of label {i}");
        }
    }

    #[test]
    fn one_engine_reproduces_both_bit_for_bit() {
        for train in [false, true] {
            let (m, d) = toy(train);
            let spec = SyntheticSpec {
                steps: 25,
                images: 60,
                ..Default::default()
            };
            let old = synthetic(&m, &d, &spec, &Silent).unwrap();
            let new = reverse_engineer(&m, None, &d, &Settings::synthetic(&spec), &Silent).unwrap();
            same(&old, &new, &format!("synthetic, trained {train}"));

            let norm = Normalizer {
                mean: vec![0.2],
                std: vec![0.3],
            };
            let nd = Dataset {
                images: norm.apply(&d.images),
                ..d.clone()
            };
            for (adapt, max_batch) in [(true, 8), (false, 8), (true, 512)] {
                let spec = CleanseSpec {
                    steps: 25,
                    images: 60,
                    minibatch: 4,
                    max_batch,
                    adapt,
                    success_target: 0.3,
                    ..CleanseSpec::default()
                };
                let old = byom(&m, &norm, &nd, &spec, &Silent).unwrap();
                let settings = Settings::byom(&spec).unwrap();
                let new = reverse_engineer(&m, Some(&norm), &nd, &settings, &Silent).unwrap();
                same(
                    &old,
                    &new,
                    &format!("byom adapt {adapt} max_batch {max_batch}, trained {train}"),
                );
            }
        }
    }
}
