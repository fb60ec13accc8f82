//! `deadbolt repair`: remove a backdoor from a model deadbolt did not
//! train, with a trigger it never saw, and say honestly how well that went.
//!
//! 1. The clean data is split (stratified, seeded) into a **tuning** part
//!    and a **held-out** part; the held-out part is used only for the final
//!    figures. The tuning part is split again into a **fit** part (what
//!    fine-tuning trains on) and a **check** part (what chooses k).
//! 2. On the tuning part: a trigger is reverse-engineered for every label
//!    ([`crate::cleanse`]); the suspect label is the top flagged one (or
//!    the one asked for; when none is flagged, the most anomalous, and the
//!    report says so).
//! 3. The channels of the layer are ranked by the criterion (default
//!    `linf`: largest mean l_inf on tuning images stamped with the
//!    synthetic trigger first), and the pruning-only sweep (ACC and
//!    synthetic ASR for every k, no fine-tuning) is recorded.
//! 4. **k is chosen with the fine-tuning in the loop**: for k = 0, 1, 2, 3,
//!    4, 6, 8, 12, 16, 24, 32, ... (up to the channel count), the model
//!    pruned by k is fine-tuned on the fit part (pruned channels stay at
//!    zero) and measured on the check part; k is the **smallest k whose
//!    fine-tuned model reaches the ASR target** within the ACC budget on
//!    the check part. (Pruning alone often needs many channels when the
//!    backdoor is spread over a layer, and costs accuracy that the
//!    fine-tuning then has to win back; choosing k before fine-tuning, as
//!    `deadbolt experiment` does, never lets the fine-tuning help reach the
//!    target.) When no k meets both, the one meeting the ASR target with
//!    the best ACC, else the one with the lowest ASR.
//! 5. Fine-tuning also **unlearns** the synthetic trigger (Neural Cleanse's
//!    mitigation): a share `unlearn_fraction` of the fit images is added
//!    again stamped with the synthetic trigger and their true labels.
//!    `unlearn_fraction = 0` fine-tunes on clean images only.
//! 6. On the held-out part: ACC and synthetic ASR of the original and the
//!    repaired model, with 95% Wilson intervals. The repair **meets the
//!    budget** when the repaired ASR is at most the target and ACC dropped
//!    at most `max_acc_drop`; otherwise the report says which part failed
//!    and the model is still written (the best found), never described as
//!    a success.
//! 7. Optionally (`verify`), the reverse engineering runs again on the
//!    repaired model: is a small trigger for the label still there?
//!
//! The repaired model is written as `model.safetensors` with the original
//! parameter names, dtypes and extra tensors (pruned channels zeroed in
//! the weights), with a copy of the card, so PyTorch loads it unchanged.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use crate::analysis::reverse::{save_trigger, synthetic_attack};
use crate::analysis::shuffled_subset;
use crate::analysis::stats;
use crate::card;
use crate::cleanse;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::eval::{self, EVAL_BATCH};
use crate::model::Model;
use crate::plot;
use crate::poison::Attack;
use crate::progress::Progress;
use crate::prune::{self, CurvePoint};
use crate::scan::{self, figure, DataInfo, Subject};
use crate::spec::TrainingSpec;
use crate::train;

pub use deadbolt_spec::byom::RepairOptions;

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

/// Whether the repair met its budget, and why not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "status")]
pub enum Outcome {
    /// ASR and ACC drop within the budget on the held-out part.
    Met,
    /// At least one is not; the reasons say which.
    NotMet { reasons: Vec<String> },
}

/// The reverse engineering on the repaired model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    pub flagged_labels: Vec<i64>,
    /// The repaired label's anomaly index and mask L1 norm now.
    pub anomaly_index: f64,
    pub mask_l1: f64,
    /// ... and before the repair.
    pub anomaly_index_before: f64,
    pub mask_l1_before: f64,
    pub seconds: f64,
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

/// Everything a repair did and measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepairReport {
    pub model: PathBuf,
    pub card: card::ModelCard,
    pub data: DataInfo,
    pub device: String,
    pub options: RepairOptions,
    pub layer: String,
    pub channels: i64,
    /// Images in the fit, check and held-out parts.
    pub fit_images: i64,
    pub check_images: i64,
    pub held_out_images: i64,
    /// The label repaired against and whether the scan flagged it.
    pub label: i64,
    pub label_flagged: bool,
    pub anomaly_index: f64,
    pub flagged_labels: Vec<i64>,
    /// Channel order of the criterion (first = pruned first) and scores.
    pub order: Vec<i64>,
    pub scores: Vec<f64>,
    /// Pruning alone (no fine-tuning): ACC / synthetic ASR vs k on the
    /// tuning part, and the smallest k reaching the target there.
    pub pruning_only_curve: Vec<CurvePoint>,
    pub pruning_only_k: Option<usize>,
    /// The same on the held-out part, for the figures only.
    pub held_out_curve: Vec<CurvePoint>,
    /// The ks tried with fine-tuning, in order (the search stops at the
    /// first that meets the target within the budget).
    pub candidates: Vec<Candidate>,
    pub k: usize,
    pub pruned_channels: Vec<i64>,
    /// Held-out figures: original model, pruned by k (before
    /// fine-tuning), repaired (pruned and fine-tuned).
    pub original: HeldOutFigures,
    pub pruned: HeldOutFigures,
    pub repaired: HeldOutFigures,
    /// ACC (fraction) lost, original - repaired, on the held-out part.
    pub acc_drop: f64,
    pub fine_tune_epochs: Vec<train::EpochReport>,
    pub outcome: Outcome,
    pub verification: Option<Verification>,
    pub repaired_model: PathBuf,
    pub trigger_file: PathBuf,
    pub figures: Vec<PathBuf>,
    pub timings: BTreeMap<String, f64>,
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
    let idx = crate::analysis::shuffled_indices(fit, n, seed);
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
) -> Result<Vec<train::EpochReport>> {
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
    pub epochs: Vec<train::EpochReport>,
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
    type Kept = (usize, Model, Vec<train::EpochReport>);
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

/// Repairs the subject's model and writes the repaired model, report and
/// figures into `out`.
pub fn repair(
    subject: &Subject,
    opts: &RepairOptions,
    out: &Path,
    progress: &dyn Progress,
) -> Result<RepairReport> {
    let model = &subject.loaded.model;
    let classes = model.info.classes;
    opts.validate(classes)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut timings = BTreeMap::new();
    let mut figures = Vec::new();
    let layer = subject.layer.clone();
    let channels = model.layer(&layer)?.channels;

    let (tuning, held) = subject
        .data
        .stratified_split(opts.holdout, opts.seed ^ 0x5917);
    let (fit, check) = tuning.stratified_split(opts.check_fraction, opts.seed ^ 0xc4ec);
    if fit.is_empty() || check.is_empty() || held.is_empty() {
        return Err(Error::EmptyDataset(format!(
            "{} clean images cannot be split into fit, check and held-out parts (holdout {}, check {})",
            subject.data.len(),
            opts.holdout,
            opts.check_fraction
        )));
    }

    let t = Instant::now();
    let rev = cleanse::reverse_engineer(model, &subject.norm, &tuning, &opts.cleanse, progress)?;
    timings.insert("reverse".to_string(), t.elapsed().as_secs_f64());
    let label = opts.label.unwrap_or_else(|| rev.suspect().0);
    let trig = rev.triggers[label as usize].clone();
    let label_flagged = rev.summary.flagged_labels.contains(&label);
    let trigger_file = out.join("trigger.safetensors");
    save_trigger(&trig, &trigger_file)?;
    let sample = subject.norm.undo(&tuning.images.get(0)).clamp(0.0, 1.0);
    figure(&mut figures, out.join("triggers.png"), |p| {
        scan::triggers_figure(p, &rev, &sample, "reversed trigger per label (tuning part)")
    });
    // the synthetic attack on normalised inputs
    let attack = synthetic_attack(&subject.norm.trigger_to_model(&trig), label, classes);

    let t = Instant::now();
    let stat_imgs = shuffled_subset(&tuning, opts.stats_images, opts.seed ^ 0x57a7).images;
    let clean_stats = stats::collect(model, &layer, &stat_imgs, 250)?;
    let trig_stats = stats::collect(model, &layer, &attack.trigger.apply(&stat_imgs), 250)?;
    let ranking = prune::rank(opts.criterion, &clean_stats, &trig_stats, opts.seed)?;
    let ks = prune::all_ks(channels);
    let tune_cache = prune::cache_features(model, &layer, &tuning, &attack.triggered(&tuning))?;
    let pruning_only_curve = prune::sweep_cached(model, &tune_cache, &ranking.order, &ks)?;
    drop(tune_cache);
    let held_cache = prune::cache_features(model, &layer, &held, &attack.triggered(&held))?;
    let held_out_curve = prune::sweep_cached(model, &held_cache, &ranking.order, &ks)?;
    drop(held_cache);
    let pruning_only_k = pruning_only_curve
        .iter()
        .find(|p| p.asr <= opts.target_asr + 1e-12)
        .map(|p| p.k);
    timings.insert("rank_and_sweep".to_string(), t.elapsed().as_secs_f64());

    // k with the fine-tuning in the loop, judged on the check part
    let t = Instant::now();
    let ft_data = unlearning_set(&fit, &attack, opts.unlearn_fraction, opts.seed ^ 0x0b1e);
    let KSearch {
        candidates,
        pick,
        model: fixed,
        epochs: fine_tune_epochs,
    } = search_k(
        model,
        &layer,
        &ranking.order,
        &ft_data,
        &check,
        &attack,
        &SearchSpec::of(opts),
        progress,
    )?;
    let k = candidates[pick].k;
    timings.insert("fine_tune_search".to_string(), t.elapsed().as_secs_f64());
    let series = vec![
        (
            "tuning part, pruning only".to_string(),
            pruning_only_curve.clone(),
        ),
        (
            "held-out part, pruning only".to_string(),
            held_out_curve.clone(),
        ),
    ];
    figure(&mut figures, out.join("pruning_curve.png"), |p| {
        plot::pruning_curves(
            p,
            &format!(
                "ACC and synthetic ASR vs channels of {layer} pruned by {} (before fine-tuning; chosen k = {k})",
                opts.criterion.as_str()
            ),
            &series,
        )
    });

    let original = held_out_figures(model, &held, &attack);
    let pruned = held_out_figures(
        &prune::pruned_model(model, &layer, &ranking.order, k)?,
        &held,
        &attack,
    );
    let repaired = held_out_figures(&fixed, &held, &attack);
    let acc_drop = original.acc.value - repaired.acc.value;
    let mut reasons = Vec::new();
    if repaired.asr.value > opts.target_asr + 1e-12 {
        reasons.push(format!(
            "synthetic ASR on the held-out part is {} > the target {:.2}%",
            repaired.asr,
            100.0 * opts.target_asr
        ));
    }
    if acc_drop > opts.max_acc_drop + 1e-12 {
        reasons.push(format!(
            "ACC dropped {:.2} points ({} -> {}) > the budget of {:.2}",
            100.0 * acc_drop,
            original.acc,
            repaired.acc,
            100.0 * opts.max_acc_drop
        ));
    }
    let c = candidates[pick];
    if !(c.meets_target && c.within_budget) {
        reasons.push(format!(
            "no k tried ({:?}) met the target within the budget on the check part; k = {k} is the best found \
             (check ASR {:.2}%, ACC drop {:.2} points)",
            candidates.iter().map(|c| c.k).collect::<Vec<_>>(),
            100.0 * c.asr,
            100.0 * c.acc_drop
        ));
    }
    if !label_flagged {
        reasons.push(format!(
            "label {label} was not flagged by the reverse engineering: there may be no backdoor to remove, \
             or one the synthetic trigger does not capture"
        ));
    }
    let outcome = if reasons.is_empty() {
        Outcome::Met
    } else {
        Outcome::NotMet { reasons }
    };

    let verification = if opts.verify {
        let t = Instant::now();
        let after =
            cleanse::reverse_engineer(&fixed, &subject.norm, &tuning, &opts.cleanse, progress)?;
        let l = label as usize;
        Some(Verification {
            flagged_labels: after.summary.flagged_labels.clone(),
            anomaly_index: after.summary.anomaly_index[l],
            mask_l1: after.summary.labels[l].mask_l1,
            anomaly_index_before: rev.summary.anomaly_index[l],
            mask_l1_before: rev.summary.labels[l].mask_l1,
            seconds: t.elapsed().as_secs_f64(),
        })
    } else {
        None
    };

    let repaired_model = out.join("model.safetensors");
    card::save_state_dict(
        &fixed,
        &subject.loaded.extras,
        &subject.loaded.dtypes,
        &repaired_model,
    )?;
    crate::data::idx::write_atomic(
        &out.join("card.toml"),
        subject.loaded.card.to_toml_string().as_bytes(),
    )?;
    let report = RepairReport {
        model: subject.loaded.weights.clone(),
        card: subject.loaded.card.clone(),
        data: subject.data_info.clone(),
        device: crate::device::describe(model.device()),
        options: opts.clone(),
        layer,
        channels,
        fit_images: fit.len(),
        check_images: check.len(),
        held_out_images: held.len(),
        label,
        label_flagged,
        anomaly_index: rev.summary.anomaly_index[label as usize],
        flagged_labels: rev.summary.flagged_labels.clone(),
        order: ranking.order.clone(),
        scores: ranking.scores,
        pruning_only_curve,
        pruning_only_k,
        held_out_curve,
        candidates,
        k,
        pruned_channels: ranking.order[..k].to_vec(),
        original,
        pruned,
        repaired,
        acc_drop,
        fine_tune_epochs,
        outcome,
        verification,
        repaired_model,
        trigger_file,
        figures,
        timings,
    };
    report.write(out)?;
    Ok(report)
}

impl RepairReport {
    pub fn met(&self) -> bool {
        self.outcome == Outcome::Met
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a repair report serializes")
    }

    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let o = &self.options;
        let status = if self.met() {
            "budget met"
        } else {
            "budget NOT met"
        };
        let _ = writeln!(s, "# deadbolt repair: {status}\n");
        let _ = writeln!(
            s,
            "Model `{}` ({}), clean data `{}`: {} images to fine-tune on, {} to choose k, {} held out \
             (never used to choose or train anything). Budget: synthetic ASR <= {:.1}% at an ACC drop \
             <= {:.1} points, on the held-out part. Device: {}.\n",
            self.model.display(),
            self.card.arch.as_str(),
            self.data.dir.display(),
            self.fit_images,
            self.check_images,
            self.held_out_images,
            100.0 * o.target_asr,
            100.0 * o.max_acc_drop,
            self.device
        );
        match &self.outcome {
            Outcome::Met => {
                let _ = writeln!(s, "**The repair meets the budget** on the held-out part.\n");
            }
            Outcome::NotMet { reasons } => {
                let _ = writeln!(
                    s,
                    "**The repair does not meet the budget.** The model written is the best found:\n"
                );
                for r in reasons {
                    let _ = writeln!(s, "- {r}");
                }
                s.push('\n');
            }
        }
        let _ = writeln!(
            s,
            "Label repaired against: {} ({}; anomaly index {:.2}; flagged labels {:?}).\n",
            self.label,
            if self.label_flagged {
                "flagged by the reverse engineering"
            } else {
                "NOT flagged: the model may not be backdoored toward it"
            },
            self.anomaly_index,
            self.flagged_labels
        );
        let _ = writeln!(
            s,
            "Pruned k = {} of {} channels of `{}` ranked by `{}` with the synthetic trigger: {:?}; \
             fine-tuned {} epoch(s) (lr {}) on the fit part{}. Pruning alone would need k = {} to \
             reach the target on the tuning part.\n",
            self.k,
            self.channels,
            self.layer,
            o.criterion.as_str(),
            self.pruned_channels,
            o.fine_tune_epochs,
            o.fine_tune_lr,
            if o.unlearn_fraction > 0.0 {
                format!(
                    " plus {:.0}% of it stamped with the synthetic trigger under the true labels (unlearning)",
                    100.0 * o.unlearn_fraction
                )
            } else {
                String::new()
            },
            self.pruning_only_k
                .map(|k| k.to_string())
                .unwrap_or_else(|| "more than all channels".into())
        );
        let _ = writeln!(s, "## Held-out figures (95% Wilson intervals)\n");
        let _ = writeln!(s, "| model | ACC | synthetic ASR |");
        let _ = writeln!(s, "|---|---|---|");
        for (name, f) in [
            ("original", &self.original),
            ("pruned by k, before fine-tuning", &self.pruned),
            ("repaired", &self.repaired),
        ] {
            let _ = writeln!(s, "| {name} | {} | {} |", f.acc, f.asr);
        }
        let _ = writeln!(s, "\nACC drop: {:.2} points.\n", 100.0 * self.acc_drop);
        let _ = writeln!(
            s,
            "## k with fine-tuning in the loop (check part)\n\n| k | ACC | ACC drop | synthetic ASR | meets target | within budget |\n|---|---|---|---|---|---|"
        );
        for c in &self.candidates {
            let _ = writeln!(
                s,
                "| {}{} | {:.2}% | {:.2} | {:.2}% | {} | {} |",
                c.k,
                if c.k == self.k { " (chosen)" } else { "" },
                100.0 * c.acc,
                100.0 * c.acc_drop,
                100.0 * c.asr,
                if c.meets_target { "yes" } else { "no" },
                if c.within_budget { "yes" } else { "no" }
            );
        }
        if let Some(v) = &self.verification {
            let _ = writeln!(
                s,
                "\n## Reverse engineering on the repaired model\n\nLabel {}: mask L1 {:.1} px (was {:.1}), \
                 anomaly index {:.2} (was {:.2}); flagged labels now {:?}.",
                self.label,
                v.mask_l1,
                v.mask_l1_before,
                v.anomaly_index,
                v.anomaly_index_before,
                v.flagged_labels
            );
        }
        let _ = writeln!(s, "\n## Pruning alone (no fine-tuning)\n");
        let _ = writeln!(
            s,
            "| k | tuning ACC | tuning ASR | held-out ACC | held-out ASR |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        let last = (self.k.max(self.pruning_only_k.unwrap_or(0)) + 2)
            .min(self.pruning_only_curve.len().saturating_sub(1));
        for i in 0..=last {
            let (a, b) = (&self.pruning_only_curve[i], &self.held_out_curve[i]);
            let _ = writeln!(
                s,
                "| {} | {:.2}% | {:.2}% | {:.2}% | {:.2}% |",
                a.k,
                100.0 * a.acc,
                100.0 * a.asr,
                100.0 * b.acc,
                100.0 * b.asr
            );
        }
        let _ = writeln!(
            s,
            "\nThe repaired model: `{}` (the original parameter names; pruned channels zeroed in \
             the weights), with its card.\n",
            self.repaired_model.display()
        );
        let _ = writeln!(s, "## Figures\n");
        for f in &self.figures {
            let rel = f
                .file_name()
                .map(PathBuf::from)
                .unwrap_or_else(|| f.clone());
            let _ = writeln!(s, "![{}]({})", rel.display(), rel.display());
        }
        s
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        crate::data::idx::write_atomic(&dir.join("report.json"), self.to_json().as_bytes())?;
        crate::data::idx::write_atomic(&dir.join("report.md"), self.to_markdown().as_bytes())
    }
}

/// Predictions of a model for images in [0, 1] (normalised with the card's
/// mean/std), on the CPU.
pub fn predict_images(model: &Model, norm: &card::Normalizer, images: &Tensor) -> Tensor {
    eval::predict(
        model,
        &norm.apply(&images.to_device(Device::Cpu)),
        EVAL_BATCH,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
