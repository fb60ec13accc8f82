//! Neuron pruning: rank the channels of a prunable layer by a criterion,
//! sweep the pruning count `k`, choose an operating point on validation data
//! and produce the pruned model.
//!
//! Criteria ([`Criterion`]), all computed from [`ActivationStats`] of the
//! backdoored model:
//! - `linf`: largest mean l_inf norm on triggered inputs first (the paper's
//!   method); `l1`, `l2`: the same with the other norms;
//! - `linf-diff`: largest (triggered - clean) mean l_inf first;
//! - `fine-pruning`: lowest mean activation on clean inputs first;
//! - `random`: a permutation seeded by `defense.seed`.
//!
//! The sweep ([`sweep_cached`]) computes the layer's activations once per
//! evaluation set. Where the head after the layer is linear in each channel
//! up to its first linear map ([`LinearHead`]: the BadNet CNN's `conv2`,
//! preact-resnet18's `layer4`), it also computes that map's pre-activations
//! once, and each `k` subtracts the newly pruned channel's term from the
//! previous `k`'s pre-activations (one rank-`B` update) before running the
//! rest of the head; elsewhere it re-runs the head with a channel mask per
//! `k`. [`sweep_naive`] sets the mask on the model and runs the whole model
//! per `k` (for benchmarks and as a reference).
//!
//! Operating point ([`choose_k`]): on the validation curve, the smallest `k`
//! whose ASR is at most `target_asr` while ACC dropped at most
//! `max_acc_drop` from `k = 0`; when no `k` qualifies, the `k` with the
//! lowest ASR among those within the ACC budget (smallest such `k`; `k = 0`
//! is always within budget).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::data::Dataset;
use crate::defense::stats::{ActivationStats, Norm};
use crate::error::{Error, Result};
use crate::eval::{self, CurvePoint, EVAL_BATCH};
use crate::model::{HeadOp, LinearHead, Model};
use crate::poison::TriggeredSet;
use crate::spec::Criterion;

/// Channels of a layer in pruning order (first = pruned first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ranking {
    pub criterion: Criterion,
    pub order: Vec<i64>,
    /// The criterion's value per channel (indexed by channel): the norm
    /// mean for `linf`/`l1`/`l2`, the difference for `linf-diff`, the clean
    /// mean activation for `fine-pruning`, the rank for `random`.
    pub scores: Vec<f64>,
}

/// Orders the channels by `criterion`. `clean` and `triggered` are the
/// backdoored model's statistics on clean and triggered inputs.
pub fn rank(
    criterion: Criterion,
    clean: &ActivationStats,
    triggered: &ActivationStats,
    seed: u64,
) -> Result<Ranking> {
    if clean.channels != triggered.channels || clean.layer != triggered.layer {
        return Err(Error::invalid(
            "stats",
            format!(
                "clean statistics are of layer {} ({} channels), triggered ones of layer {} ({} channels)",
                clean.layer, clean.channels, triggered.layer, triggered.channels
            ),
        ));
    }
    let c = clean.channels;
    let (scores, descending): (Vec<f64>, bool) = match criterion {
        Criterion::Linf => (triggered.channel_means(Norm::Linf), true),
        Criterion::L1 => (triggered.channel_means(Norm::L1), true),
        Criterion::L2 => (triggered.channel_means(Norm::L2), true),
        Criterion::LinfDiff => {
            let t = triggered.channel_means(Norm::Linf);
            let cl = clean.channel_means(Norm::Linf);
            (t.iter().zip(&cl).map(|(a, b)| a - b).collect(), true)
        }
        Criterion::FinePruning => (clean.channel_means(Norm::Mean), false),
        Criterion::Random => {
            let mut order: Vec<i64> = (0..c as i64).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
            let mut scores = vec![0.0; c];
            for (r, ch) in order.iter().enumerate() {
                scores[*ch as usize] = r as f64;
            }
            return Ok(Ranking {
                criterion,
                order,
                scores,
            });
        }
    };
    Ok(Ranking {
        criterion,
        order: order_by(&scores, descending),
        scores,
    })
}

/// Channel indices sorted by score (ties by index, NaN last).
pub fn order_by(scores: &[f64], descending: bool) -> Vec<i64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        let ord = match (x.is_nan(), y.is_nan()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => return std::cmp::Ordering::Greater,
            (false, true) => return std::cmp::Ordering::Less,
            _ if descending => y.total_cmp(&x),
            _ => x.total_cmp(&y),
        };
        ord.then(a.cmp(&b))
    });
    idx.into_iter().map(|i| i as i64).collect()
}

/// The activations of a layer for a clean and a triggered evaluation set,
/// computed once (no_grad, eval mode, on the model's device) and stored
/// back to back, so each `k` runs the head once over both sets.
#[derive(Debug)]
pub struct FeatureCache {
    pub layer: String,
    pub channels: i64,
    /// Clean then triggered activations, `[n_clean + n_triggered, C, ...]`.
    pub features: Tensor,
    pub n_clean: i64,
    pub clean_labels: Tensor,
    pub triggered_labels: Tensor,
    pub triggered_targets: Tensor,
    /// The incremental form of the sweep, where the head has one.
    incremental: Option<Incremental>,
}

/// What the incremental sweep keeps (see [`LinearHead`]).
#[derive(Debug)]
struct Incremental {
    head: LinearHead,
    /// `[C, N, B]`: every image's block of each channel, contiguous per
    /// channel.
    blocks: Tensor,
    /// `[C, B, O]`: minus each channel's columns of the linear map,
    /// transposed, so `z += blocks[c] · neg_weight_t[c]` prunes channel `c`.
    neg_weight_t: Tensor,
    /// `[N, O]`: the pre-activations of the linear map, no channel pruned
    /// by the sweep (the model's own mask applies).
    z0: Tensor,
}

impl Incremental {
    fn new(head: LinearHead, features: &Tensor) -> Result<Incremental> {
        tch::no_grad(|| {
            let n = features.size()[0];
            let mut parts = Vec::new();
            let mut s = 0;
            while s < n {
                let len = HEAD_BATCH.min(n - s);
                parts.push((head.blocks)(&features.narrow(0, s, len)));
                s += len;
            }
            let blocks = Tensor::cat(&parts, 0);
            let (c, b) = match blocks.size()[..] {
                [_, c, b] => (c, b),
                ref other => {
                    return Err(Error::Other(format!(
                        "a linear head's blocks must be [N, C, B], got {other:?}"
                    )))
                }
            };
            let o = head.weight.size()[0];
            if head.weight.size() != [o, c * b] {
                return Err(Error::Other(format!(
                    "a linear head's weight must be [O, {}], got {:?}",
                    c * b,
                    head.weight.size()
                )));
            }
            // the same op as the head's own first linear map
            let z0 = blocks
                .flatten(1, -1)
                .linear(&head.weight, head.bias.as_ref());
            let blocks = blocks.permute([1, 0, 2]).contiguous();
            let neg_weight_t = head
                .weight
                .view([o, c, b])
                .permute([1, 2, 0])
                .neg()
                .contiguous();
            Ok(Incremental {
                head,
                blocks,
                neg_weight_t,
                z0,
            })
        })
    }

    /// Runs the sweep for ascending, distinct `ks`, writing each step's
    /// predicted labels (`out`: `[ks.len(), N]`, int64) or logits (`[ks.len(),
    /// N, classes]`, float). On the CPU, the images go in tiles whose
    /// pre-activations stay in cache across all `k`, and libtorch's threads
    /// take whole tiles each, with one libtorch thread apiece (the ops of a
    /// tile are too small to split well); a GPU takes all images at once.
    fn run(&self, order: &[i64], ks: &[usize], out: &Tensor, emit: Emit) -> Result<()> {
        let n = self.z0.size()[0];
        let dev = self.z0.device();
        let tile = if dev == Device::Cpu {
            INCREMENTAL_TILE
        } else {
            n.max(1)
        };
        let tiles: Vec<(i64, i64)> = (0..n)
            .step_by(tile as usize)
            .map(|s| (s, tile.min(n - s)))
            .collect();
        let threads = match dev {
            Device::Cpu => (tch::get_num_threads().max(1) as usize).min(tiles.len()),
            _ => 1,
        };
        if threads <= 1 {
            return self.handles(out).run(order, ks, &tiles, emit);
        }
        let _one = crate::train::OneThread::here();
        let mine = |t: usize| -> Vec<(i64, i64)> {
            tiles.iter().skip(t).step_by(threads).copied().collect()
        };
        std::thread::scope(|scope| {
            let workers: Vec<_> = (1..threads)
                .map(|t| {
                    let (handles, tiles) = (self.handles(out), mine(t));
                    scope.spawn(move || {
                        let _one = crate::train::OneThread::here();
                        handles.run(order, ks, &tiles, emit)
                    })
                })
                .collect();
            let own = self.handles(out).run(order, ks, &mine(0), emit);
            workers.into_iter().fold(own, |acc, w| {
                let r = w
                    .join()
                    .unwrap_or_else(|_| Err(Error::Other("a sweep thread panicked".into())));
                acc.and(r)
            })
        })
    }

    /// This thread's handles of what the sweep reads and writes.
    fn handles(&self, out: &Tensor) -> Handles {
        Handles {
            blocks: self.blocks.shallow_clone(),
            neg_weight_t: self.neg_weight_t.shallow_clone(),
            z0: self.z0.shallow_clone(),
            rest: self.head.rest.iter().map(HeadOp::shallow_clone).collect(),
            out: out.shallow_clone(),
        }
    }
}

/// What each step of the incremental sweep writes.
#[derive(Debug, Clone, Copy)]
enum Emit {
    Labels,
    Logits,
}

/// One thread's handles of an [`Incremental`] sweep's tensors.
struct Handles {
    blocks: Tensor,
    neg_weight_t: Tensor,
    z0: Tensor,
    rest: Vec<HeadOp>,
    out: Tensor,
}

impl Handles {
    /// The sweep over the given tiles `(first image, images)`.
    fn run(&self, order: &[i64], ks: &[usize], tiles: &[(i64, i64)], emit: Emit) -> Result<()> {
        let o = self.z0.size()[1];
        let dev = self.z0.device();
        tch::no_grad(|| {
            for &(s, len) in tiles {
                let mut z = self.z0.narrow(0, s, len).copy();
                // one output buffer per op of the rest of the head
                let mut width = o;
                let bufs: Vec<Tensor> = self
                    .rest
                    .iter()
                    .map(|op| {
                        if let HeadOp::Linear { weight, .. } = op {
                            width = weight.size()[0];
                        }
                        Tensor::empty([len, width], (Kind::Float, dev))
                    })
                    .collect();
                let mut done = 0;
                for (j, &k) in ks.iter().enumerate() {
                    for &c in &order[done..k] {
                        let _ = z.f_addmm_(
                            &self.blocks.get(c).narrow(0, s, len),
                            &self.neg_weight_t.get(c),
                        )?;
                    }
                    done = k;
                    let mut x = z.shallow_clone();
                    for (op, buf) in self.rest.iter().zip(&bufs) {
                        x = match op {
                            HeadOp::Relu => x.f_clamp_min_out(buf, 0.0)?,
                            // as `linear` computes it (addmm with the bias)
                            HeadOp::Linear {
                                weight,
                                bias: Some(b),
                            } => b.f_addmm_out(buf, &x, &weight.tr())?,
                            HeadOp::Linear { weight, bias: None } => {
                                x.f_mm_out(buf, &weight.tr())?
                            }
                        };
                    }
                    let mut rows = self.out.get(j as i64).narrow(0, s, len);
                    match emit {
                        Emit::Labels => {
                            let _ = x.f_argmax_out(&rows, 1, false)?;
                        }
                        Emit::Logits => {
                            rows.f_copy_(&x)?;
                        }
                    }
                }
            }
            Ok(())
        })
    }
}

/// The logits `[ks.len(), N, classes]` of every `k` in `ks` (ascending,
/// distinct) as the incremental sweep computes them, when the cache has
/// the incremental form (for tests and checks; [`sweep_cached`] keeps only
/// the predictions).
pub fn incremental_logits(
    cache: &FeatureCache,
    order: &[i64],
    ks: &[usize],
) -> Result<Option<Tensor>> {
    check_order(&cache.layer, cache.channels, order, ks)?;
    if !ks.windows(2).all(|w| w[0] < w[1]) {
        return Err(Error::invalid(
            "k",
            "the counts must be ascending and distinct",
        ));
    }
    let Some(inc) = &cache.incremental else {
        return Ok(None);
    };
    let n = inc.z0.size()[0];
    let classes = match inc.head.rest.iter().rev().find_map(|op| match op {
        HeadOp::Linear { weight, .. } => Some(weight.size()[0]),
        HeadOp::Relu => None,
    }) {
        Some(c) => c,
        None => inc.z0.size()[1],
    };
    let out = Tensor::zeros(
        [ks.len() as i64, n, classes],
        (Kind::Float, inc.z0.device()),
    );
    inc.run(order, ks, &out, Emit::Logits)?;
    Ok(Some(out))
}

/// Images per tile of the incremental sweep on the CPU.
const INCREMENTAL_TILE: i64 = 512;

impl FeatureCache {
    /// The clean images' activations.
    pub fn clean(&self) -> Tensor {
        self.features.narrow(0, 0, self.n_clean)
    }

    /// Whether [`sweep_cached`] updates the head's pre-activations channel
    /// by channel (the layer's head is a [`LinearHead`]).
    pub fn is_incremental(&self) -> bool {
        self.incremental.is_some()
    }

    /// The figures of one `k` from predictions for all cached images.
    fn point(&self, k: usize, pred: &Tensor) -> CurvePoint {
        let n = self.features.size()[0];
        let clean = pred.narrow(0, 0, self.n_clean);
        let trig = pred.narrow(0, self.n_clean, n - self.n_clean);
        CurvePoint {
            k,
            acc: eval::share_equal(&clean, &self.clean_labels),
            asr: eval::share_equal(&trig, &self.triggered_targets),
            ra: eval::share_equal(&trig, &self.triggered_labels),
        }
    }
}

fn features_batched(model: &Model, layer: &str, images: &Tensor) -> Result<Tensor> {
    let n = images.size()[0];
    let dev = model.device();
    tch::no_grad(|| {
        let mut parts = Vec::new();
        let mut s = 0;
        while s < n {
            let len = (EVAL_BATCH as i64).min(n - s);
            parts.push(model.features_t(&images.narrow(0, s, len).to_device(dev), layer, false)?);
            s += len;
        }
        Ok(Tensor::cat(&parts, 0))
    })
}

/// Runs the model up to `layer` once for each evaluation set. The model's
/// own masks stay in effect; sweep masks apply on top of them.
pub fn cache_features(
    model: &Model,
    layer: &str,
    clean: &Dataset,
    triggered: &TriggeredSet,
) -> Result<FeatureCache> {
    let info = model.layer(layer)?;
    if clean.is_empty() {
        return Err(Error::EmptyDataset(format!(
            "clean evaluation set for the pruning sweep of layer {layer}"
        )));
    }
    if triggered.is_empty() {
        return Err(Error::EmptyDataset(format!(
            "triggered evaluation set for the pruning sweep of layer {layer}"
        )));
    }
    let dev = model.device();
    let features = Tensor::cat(
        &[
            features_batched(model, layer, &clean.images)?,
            features_batched(model, layer, &triggered.images)?,
        ],
        0,
    );
    let incremental = match model.linear_head(layer)? {
        Some(head) => Some(Incremental::new(head, &features)?),
        None => None,
    };
    Ok(FeatureCache {
        layer: layer.to_string(),
        channels: info.channels,
        features,
        n_clean: clean.len(),
        clean_labels: clean.labels.to_device(dev),
        triggered_labels: triggered.labels.to_device(dev),
        triggered_targets: triggered.targets.to_device(dev),
        incremental,
    })
}

/// Checks a pruning order and the counts to sweep.
fn check_order(layer: &str, channels: i64, order: &[i64], ks: &[usize]) -> Result<()> {
    let mut seen = vec![false; channels.max(0) as usize];
    for &c in order {
        if c < 0 || c >= channels {
            return Err(Error::invalid(
                "order",
                format!("channel {c} out of range for layer {layer} ({channels} channels)"),
            ));
        }
        if std::mem::replace(&mut seen[c as usize], true) {
            return Err(Error::invalid(
                "order",
                format!("channel {c} of layer {layer} appears twice"),
            ));
        }
    }
    if let Some(k) = ks.iter().find(|&&k| k > order.len()) {
        return Err(Error::invalid(
            "k",
            format!(
                "cannot prune {k} channels of layer {layer}: the order has {} of its {channels} channels",
                order.len()
            ),
        ));
    }
    Ok(())
}

/// Keep-mask `[C]` (on `device`) that prunes the first `k` channels of `order`.
pub fn keep_mask(channels: i64, order: &[i64], k: usize, device: Device) -> Tensor {
    let mut keep = Tensor::ones([channels], (Kind::Float, Device::Cpu));
    if k > 0 {
        let _ = keep.index_fill_(0, &Tensor::from_slice(&order[..k]), 0.0);
    }
    keep.to_device(device)
}

/// `0..=C`: every pruning count of a layer.
pub fn all_ks(channels: i64) -> Vec<usize> {
    (0..=channels.max(0) as usize).collect()
}

/// Head predictions for masked cached features; `buf` (same shape as
/// `feats`) receives the masked activations, so no per-k allocation of
/// their size is made.
fn head_predictions(
    model: &Model,
    layer: &str,
    feats: &Tensor,
    keep: &Tensor,
    buf: &Tensor,
) -> Result<Tensor> {
    let n = feats.size()[0];
    let shape: Vec<i64> = std::iter::once(1)
        .chain(std::iter::once(-1))
        .chain(std::iter::repeat_n(1, feats.dim().saturating_sub(2)))
        .collect();
    let keep = keep.view(shape.as_slice());
    tch::no_grad(|| {
        let mut parts = Vec::new();
        let mut s = 0;
        while s < n {
            let len = (HEAD_BATCH).min(n - s);
            let f = buf.narrow(0, s, len);
            let _ = feats.narrow(0, s, len).f_mul_out(&f, &keep)?;
            parts.push(model.head_t(&f, layer, false)?.argmax(1, false));
            s += len;
        }
        Ok(Tensor::cat(&parts, 0))
    })
}

/// Images per head call in the cached sweep.
pub const HEAD_BATCH: i64 = 4096;

/// ACC/ASR/RA for each `k` in `ks`, from cached activations: once over the
/// clean and triggered images together, either updating the head's
/// pre-activations channel by channel (where the head is a
/// [`LinearHead`]) or running the head per `k`.
pub fn sweep_cached(
    model: &Model,
    cache: &FeatureCache,
    order: &[i64],
    ks: &[usize],
) -> Result<Vec<CurvePoint>> {
    check_order(&cache.layer, cache.channels, order, ks)?;
    let n = cache.features.size()[0];
    if let Some(inc) = &cache.incremental {
        let mut steps = ks.to_vec();
        steps.sort_unstable();
        steps.dedup();
        let n_steps = steps.len() as i64;
        let preds = Tensor::empty([n_steps, n], (Kind::Int64, cache.features.device()));
        inc.run(order, &steps, &preds, Emit::Labels)?;
        return Ok(ks
            .iter()
            .map(|&k| {
                let j = steps.binary_search(&k).expect("every k is a step");
                cache.point(k, &preds.get(j as i64))
            })
            .collect());
    }
    sweep_cached_heads(model, cache, order, ks)
}

/// The figures of [`sweep_cached`] running the model's head per `k` on the
/// masked cached activations, even where the incremental form exists (for
/// benchmarks and as a reference).
pub fn sweep_cached_heads(
    model: &Model,
    cache: &FeatureCache,
    order: &[i64],
    ks: &[usize],
) -> Result<Vec<CurvePoint>> {
    check_order(&cache.layer, cache.channels, order, ks)?;
    let dev = cache.features.device();
    let buf = cache.features.empty_like();
    ks.iter()
        .map(|&k| {
            let keep = keep_mask(cache.channels, order, k, dev);
            let p = head_predictions(model, &cache.layer, &cache.features, &keep, &buf)?;
            Ok(cache.point(k, &p))
        })
        .collect()
}

/// The same figures as [`sweep_cached`], setting the mask on the model and
/// running the whole model per `k`. The model's mask of `layer` is restored.
pub fn sweep_naive(
    model: &mut Model,
    layer: &str,
    clean: &Dataset,
    triggered: &TriggeredSet,
    order: &[i64],
    ks: &[usize],
) -> Result<Vec<CurvePoint>> {
    let info = model.layer(layer)?;
    check_order(layer, info.channels, order, ks)?;
    if clean.is_empty() || triggered.is_empty() {
        return Err(Error::EmptyDataset(format!(
            "evaluation set for the pruning sweep of layer {layer}"
        )));
    }
    let own = model.mask(layer).map(|m| m.shallow_clone());
    let dev = model.device();
    let result = ks
        .iter()
        .map(|&k| {
            let mut keep = keep_mask(info.channels, order, k, dev);
            if let Some(m) = &own {
                keep *= m;
            }
            model.set_mask(layer, Some(keep))?;
            let p = eval::predict(model, &clean.images, EVAL_BATCH);
            let acc = eval::share_equal(&p, &clean.labels);
            let p = eval::predict(model, &triggered.images, EVAL_BATCH);
            Ok(CurvePoint {
                k,
                acc,
                asr: eval::share_equal(&p, &triggered.targets),
                ra: eval::share_equal(&p, &triggered.labels),
            })
        })
        .collect();
    model.set_mask(layer, own)?;
    result
}

/// Why a `k` was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Choice {
    /// The smallest `k` meeting the ASR target within the ACC budget.
    MeetsTarget,
    /// No `k` met the target: the lowest ASR within the ACC budget.
    LowestAsrWithinBudget,
    /// Chosen with the fine-tuning in the loop
    /// ([`crate::defense::search::search_k`]): the smallest `k` whose fine-tuned
    /// model met the ASR target within the ACC budget on the check part.
    FineTunedMeetsTarget,
    /// Chosen with the fine-tuning in the loop, and no `k` met both: the
    /// best found (the best ACC meeting the target, else the lowest ASR).
    FineTunedBestFound,
}

/// The chosen pruning count and its validation figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OperatingPoint {
    pub k: usize,
    pub choice: Choice,
    pub validation: CurvePoint,
}

/// Chooses `k` on a validation curve (see the module docs). The curve must
/// contain `k = 0`.
pub fn choose_k(
    curve: &[CurvePoint],
    target_asr: f64,
    max_acc_drop: f64,
) -> Result<OperatingPoint> {
    let base = curve
        .iter()
        .find(|p| p.k == 0)
        .ok_or_else(|| Error::invalid("curve", "the validation curve has no k = 0 point"))?;
    // a small tolerance so that equal accuracies count as "no drop"
    let within: Vec<&CurvePoint> = curve
        .iter()
        .filter(|p| base.acc - p.acc <= max_acc_drop + 1e-12)
        .collect();
    if let Some(p) = within
        .iter()
        .filter(|p| p.asr <= target_asr + 1e-12)
        .min_by_key(|p| p.k)
    {
        return Ok(OperatingPoint {
            k: p.k,
            choice: Choice::MeetsTarget,
            validation: **p,
        });
    }
    let best = within
        .iter()
        .min_by(|a, b| a.asr.total_cmp(&b.asr).then(a.k.cmp(&b.k)))
        .expect("k = 0 is within budget");
    Ok(OperatingPoint {
        k: best.k,
        choice: Choice::LowestAsrWithinBudget,
        validation: **best,
    })
}

/// A copy of `model` (on its device) with the first `k` channels of `order`
/// pruned on top of its own mask (as a mask; [`Model::save`] bakes it into
/// the weights).
pub fn pruned_model(model: &Model, layer: &str, order: &[i64], k: usize) -> Result<Model> {
    let info = model.layer(layer)?;
    check_order(layer, info.channels, order, &[k])?;
    let mut m = model.duplicate(model.device())?;
    let mut keep = keep_mask(info.channels, order, k, m.device());
    if let Some(own) = m.mask(layer) {
        keep *= own;
    }
    m.set_mask(layer, Some(keep))?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(layer: &str, linf: Vec<f32>, mean: Vec<f32>) -> ActivationStats {
        let c = linf.len();
        ActivationStats {
            layer: layer.into(),
            images: 1,
            channels: c,
            l1: linf.iter().map(|v| v * 10.0).collect(),
            l2: linf.iter().map(|v| v * 3.0).collect(),
            linf,
            mean,
        }
    }

    #[test]
    fn rankings_follow_their_criteria() {
        let clean = stats("l", vec![1.0, 1.0, 3.0, 0.5], vec![0.4, 0.1, 0.3, 0.2]);
        let trig = stats("l", vec![1.0, 4.0, 4.5, 0.5], vec![0.4, 0.1, 0.3, 0.2]);
        let r = |c| rank(c, &clean, &trig, 7).unwrap().order;
        assert_eq!(r(Criterion::Linf), [2, 1, 0, 3]);
        assert_eq!(r(Criterion::L1), [2, 1, 0, 3]);
        assert_eq!(r(Criterion::LinfDiff), [1, 2, 0, 3]);
        assert_eq!(r(Criterion::FinePruning), [1, 3, 2, 0]);
        let mut rnd = r(Criterion::Random);
        assert_eq!(rnd, r(Criterion::Random));
        rnd.sort();
        assert_eq!(rnd, [0, 1, 2, 3]);
        let other = stats("m", vec![1.0; 4], vec![0.0; 4]);
        let e = rank(Criterion::Linf, &clean, &other, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer l") && e.contains("layer m"), "{e}");
    }

    #[test]
    fn choose_k_rules() {
        let p = |k, acc, asr| CurvePoint {
            k,
            acc,
            asr,
            ra: 0.0,
        };
        let curve = vec![
            p(0, 0.98, 1.0),
            p(1, 0.98, 0.5),
            p(2, 0.97, 0.04),
            p(3, 0.90, 0.0),
        ];
        let c = choose_k(&curve, 0.05, 0.02).unwrap();
        assert_eq!((c.k, c.choice), (2, Choice::MeetsTarget));
        let c = choose_k(&curve, 0.01, 0.02).unwrap();
        assert_eq!((c.k, c.choice), (2, Choice::LowestAsrWithinBudget));
        let c = choose_k(&curve, 0.01, 0.005).unwrap();
        assert_eq!(c.k, 1);
        assert!(choose_k(&curve[1..], 0.05, 0.02).is_err());
        assert!((eval::der(&curve[0], &curve[2]) - (0.96 - 0.01 + 1.0) / 2.0).abs() < 1e-9);
    }

    fn toy() -> (Model, Dataset, TriggeredSet) {
        let m = crate::model::test_badnet(3, (16, 16), 0);
        let x = crate::rng::uniform(&[20, 1, 16, 16], 101);
        let y = Tensor::arange(20, (Kind::Int64, Device::Cpu)).remainder(3);
        let d = Dataset::new(x, y, 3, "toy").unwrap();
        let t = TriggeredSet {
            images: crate::rng::uniform(&[9, 1, 16, 16], 102),
            labels: Tensor::from_slice(&[1i64, 2, 1, 2, 1, 2, 1, 2, 1]),
            targets: Tensor::zeros([9], (Kind::Int64, Device::Cpu)),
        };
        (m, d, t)
    }

    #[test]
    fn cached_sweep_equals_full_forward_with_the_same_mask() {
        let (mut m, d, t) = toy();
        let order: Vec<i64> = (0..32).rev().collect();
        let ks = all_ks(32);
        let cache = cache_features(&m, "conv2", &d, &t).unwrap();
        assert!(cache.is_incremental());
        // the head per k on cached activations is the whole model's
        // arithmetic: the same figures exactly
        let heads = sweep_cached_heads(&m, &cache, &order, &ks).unwrap();
        let slow = sweep_naive(&mut m, "conv2", &d, &t, &order, &ks).unwrap();
        assert_eq!(heads, slow);
        // the incremental sweep is the same to float rounding: a label can
        // differ only on a near-tie (tests/incremental_sweep.rs checks the
        // logits); allow one image per figure
        let fast = sweep_cached(&m, &cache, &order, &ks).unwrap();
        for (a, b) in fast.iter().zip(&slow) {
            assert_eq!(a.k, b.k);
            assert!((a.acc - b.acc).abs() <= 1.0 / 20.0 + 1e-12, "{a:?} {b:?}");
            assert!((a.asr - b.asr).abs() <= 1.0 / 9.0 + 1e-12, "{a:?} {b:?}");
        }
        assert!(m.mask("conv2").is_none(), "naive sweep restores the mask");
        // logits agree to float tolerance too
        let keep = keep_mask(32, &order, 5, Device::Cpu);
        let via_head = tch::no_grad(|| {
            m.head_t(&(cache.clean() * keep.view([1, -1, 1, 1])), "conv2", false)
                .unwrap()
        });
        m.set_mask("conv2", Some(keep)).unwrap();
        let full = tch::no_grad(|| m.forward_t(&d.images, false));
        assert!(via_head.allclose(&full, 1e-5, 1e-6, false));
        // the pruned copy saved and reloaded gives the same output without a mask
        let p = pruned_model(&m, "conv2", &order, 0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        p.save(dir.path(), &crate::model::CheckpointMeta::new(&p.info))
            .unwrap();
        let (back, _) = Model::load(dir.path(), Device::Cpu).unwrap();
        assert!(back.mask("conv2").is_none());
        let again = tch::no_grad(|| back.forward_t(&d.images, false));
        assert!(again.allclose(&full, 1e-5, 1e-6, false));
    }

    #[test]
    fn sweep_error_paths() {
        let (mut m, d, t) = toy();
        let order: Vec<i64> = (0..32).collect();
        let e = cache_features(&m, "conv9", &d, &t).unwrap_err().to_string();
        assert!(e.contains("conv9"), "{e}");
        let cache = cache_features(&m, "conv2", &d, &t).unwrap();
        let e = sweep_cached(&m, &cache, &order, &[33])
            .unwrap_err()
            .to_string();
        assert!(e.contains("33") && e.contains("conv2"), "{e}");
        let e = sweep_cached(&m, &cache, &[0, 40], &[1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("40"), "{e}");
        let e = sweep_cached(&m, &cache, &[3, 3], &[1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
        let e = pruned_model(&m, "conv2", &order, 40)
            .unwrap_err()
            .to_string();
        assert!(e.contains("40"), "{e}");
        let empty = d.select_vec(&[]);
        let e = cache_features(&m, "conv2", &empty, &t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
        let e = sweep_naive(&mut m, "conv2", &empty, &t, &order, &[0]).unwrap_err();
        assert!(matches!(e, Error::EmptyDataset(_)), "{e}");
    }
}
