//! `deadbolt repair`: remove a backdoor from a model deadbolt did not
//! train, with a trigger it never saw, and say honestly how well that went.
//!
//! 1. The clean data is split (stratified, seeded) into a **tuning** part
//!    and a **held-out** part; the held-out part is used only for the final
//!    figures. The tuning part is split again into a **fit** part (what
//!    fine-tuning trains on) and a **check** part (what chooses k).
//! 2. On the tuning part: a trigger is reverse-engineered for every label
//!    ([`crate::defense::cleanse`]); the suspect label is the top flagged one (or
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
use tch::{Device, Tensor};

use super::card;
use super::scan::{self, figure, DataInfo, Subject};
use crate::data::shuffled_subset;
use crate::defense::cleanse::{self, save_trigger, synthetic_attack, Settings};
use crate::defense::prune;
use crate::defense::stats;
use crate::error::{Error, Result};
use crate::eval::{self, CurvePoint, EVAL_BATCH};
use crate::model::Model;
use crate::normalize::Normalizer;
use crate::plot;
use crate::progress::Progress;
use crate::report::{figures_beside, Document};
use crate::train;

pub use deadbolt_spec::byom::RepairOptions;

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

pub use crate::defense::search::{
    held_out_figures, k_ladder, search_k, unlearning_set, wilson, Candidate, HeldOutFigures,
    KSearch, Proportion, SearchSpec,
};

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
    let nc = Settings::byom(&opts.cleanse)?;
    let rev = cleanse::reverse_engineer(model, Some(&subject.norm), &tuning, &nc, progress)?;
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
        let after = cleanse::reverse_engineer(&fixed, Some(&subject.norm), &tuning, &nc, progress)?;
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
}

impl Document for RepairReport {
    const WHAT: &'static str = "a repair report";

    fn to_markdown(&self) -> String {
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
        figures_beside(&mut s, &self.figures);
        s
    }
}

/// Predictions of a model for images in [0, 1] (normalised with the card's
/// mean/std), on the CPU.
pub fn predict_images(model: &Model, norm: &Normalizer, images: &Tensor) -> Tensor {
    eval::predict(
        model,
        &norm.apply(&images.to_device(Device::Cpu)),
        EVAL_BATCH,
    )
}
