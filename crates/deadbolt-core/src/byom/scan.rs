//! `deadbolt scan`: is a model deadbolt did not train backdoored, toward
//! which label, through which channels? No trigger is known; the inputs are
//! the model (state_dict + card) and a small set of clean labelled images.
//!
//! Evidence, all written to `report.json` / `report.md` with figures:
//! 1. **Neural Cleanse** ([`crate::defense::cleanse`]): a trigger per label, all
//!    labels optimised together; the anomaly index of each label's mask
//!    norm; flagged labels (index above the threshold, trigger working on
//!    at least `min_success` of other labels' images).
//! 2. **Activations**: per-channel statistics of the layer on clean images
//!    and on the same images stamped with the suspect label's synthetic
//!    trigger; channels whose l_inf ratio (triggered / clean) is a robust
//!    outlier.
//! 3. **CLP** ([`crate::defense::clp`]): data-free channel Lipschitz scores of the
//!    layer's convolution, a second opinion on which channels stand out.
//! 4. **Grad-CAM** of the suspect label on stamped images: the share of the
//!    heat on the synthetic trigger's region, against its area share.
//!
//! The verdict ([`Verdict`]) is `backdoored` when a label is flagged with a
//! strong anomaly index (at least [`STRONG_ANOMALY`]) or a flagged label is
//! corroborated by the activations (at least one outlier channel with an
//! l_inf ratio of at least [`MIN_CHANNEL_RATIO`]); `inconclusive` when a
//! label is flagged without corroboration, or when the model does not
//! classify the clean data well enough (below [`MIN_CLEAN_ACC`]: wrong
//! card, class order or data) for the analysis to mean anything; `clean`
//! when no label is flagged. The reasons list says which rule decided.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use super::card::{self, LoadedModel, ModelCard};
use crate::data::folder::{self, Source, Split};
use crate::data::{shuffled_subset, DataLimits, Dataset};
use crate::defense::cleanse::{self, save_trigger, ReverseSummary, Reversed, Settings};
use crate::defense::clp::{self, ClpScores};
use crate::defense::gradcam;
use crate::defense::stats::{self, Norm};
use crate::defense::{mad, median};
use crate::error::{Error, Result};
use crate::normalize::Normalizer;
use crate::plot::{self, Rgb};
use crate::progress::Progress;
use crate::report::{figures_beside, Document};
use crate::trigger::Trigger;

/// An anomaly index at or above this decides `backdoored` on its own.
pub const STRONG_ANOMALY: f64 = 3.0;
/// Least l_inf ratio (triggered / clean) of an outlier channel that
/// corroborates a flagged label.
pub const MIN_CHANNEL_RATIO: f64 = 1.5;
/// Below this clean accuracy the scan is inconclusive.
pub const MIN_CLEAN_ACC: f64 = 0.5;
/// Images per batch for statistics.
const STATS_BATCH: usize = 250;

/// A model under examination: weights, card, normalisation and its clean
/// data (normalised).
#[derive(Debug)]
pub struct Subject {
    pub loaded: LoadedModel,
    pub norm: Normalizer,
    /// Normalised images (model inputs) and labels.
    pub data: Dataset,
    pub data_info: DataInfo,
    pub layer: String,
}

/// Where the clean data came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    pub dir: PathBuf,
    pub source: Source,
    pub images: i64,
    /// Images per label.
    pub per_class: Vec<i64>,
    pub class_names: Vec<String>,
}

/// Opens a model and its clean data: reads the card (`card`, else the one
/// beside the model), loads the weights strictly, loads and normalises the
/// data. `layer` overrides the card's layer. Within the local CLI's
/// [`DataLimits::default`] (see [`open_with`]).
pub fn open(
    model: &Path,
    card_path: Option<&Path>,
    data_dir: &Path,
    split: Split,
    layer: Option<&str>,
    device: Device,
) -> Result<Subject> {
    open_with(
        model,
        card_path,
        data_dir,
        split,
        layer,
        device,
        &DataLimits::default(),
    )
}

/// [`open`] within `limits`: the card's `classes` and `input_shape` are
/// checked before the model is built, the data while it is read.
pub fn open_with(
    model: &Path,
    card_path: Option<&Path>,
    data_dir: &Path,
    split: Split,
    layer: Option<&str>,
    device: Device,
    limits: &DataLimits,
) -> Result<Subject> {
    let card_path = match card_path {
        Some(p) => p.to_path_buf(),
        None => card::find_card(model).ok_or_else(|| {
            Error::invalid(
                "card",
                format!(
                    "no model card given and none beside {} (card.toml, card.json or <stem>.card.toml)",
                    model.display()
                ),
            )
        })?,
    };
    let card = ModelCard::from_file_with(&card_path, limits)?;
    let loaded = card::load_model_with(model, &card, device, limits)?;
    let [c, h, w] = card.input_shape;
    let clean = folder::load_clean_with(
        data_dir,
        split,
        &card.class_names,
        (c, h, w),
        card.classes,
        limits,
    )?;
    let norm = card.normalizer();
    let per_class = (0..card.classes)
        .map(|k| clean.data.labels.eq(k).sum(Kind::Int64).int64_value(&[]))
        .collect();
    let data = Dataset {
        images: norm.apply(&clean.data.images),
        labels: clean.data.labels.shallow_clone(),
        classes: card.classes,
    };
    let layer = layer
        .map(str::to_string)
        .or_else(|| card.layer.clone())
        .unwrap_or_else(|| loaded.model.default_layer().to_string());
    loaded
        .model
        .layer(&layer)
        .map_err(|e| Error::invalid("layer", e.to_string()))?;
    let class_names = if clean.source == Source::ImageFolder {
        clean.classes.clone()
    } else if !card.class_names.is_empty() {
        card.class_names.clone()
    } else {
        (0..card.classes).map(|k| k.to_string()).collect()
    };
    Ok(Subject {
        data_info: DataInfo {
            dir: data_dir.to_path_buf(),
            source: clean.source,
            images: data.len(),
            per_class,
            class_names,
        },
        loaded,
        norm,
        data,
        layer,
    })
}

pub use deadbolt_spec::byom::ScanOptions;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Backdoored,
    Clean,
    Inconclusive,
}

impl Verdict {
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Backdoored => "backdoored",
            Verdict::Clean => "clean",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// Activation statistics of the layer on clean vs synthetic-triggered images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivationEvidence {
    pub layer: String,
    /// The label whose synthetic trigger stamped the images.
    pub label: i64,
    pub images: usize,
    /// Per channel, mean l_inf on clean and on triggered images.
    pub clean_linf: Vec<f64>,
    pub triggered_linf: Vec<f64>,
    pub separation: stats::Separation,
    /// Robust-outlier channels (l_inf ratio), highest ratio first.
    pub outlier_channels: Vec<i64>,
}

/// Grad-CAM of the suspect label on stamped images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradcamEvidence {
    pub layer: String,
    pub label: i64,
    /// `(row, col, height, width)` of the synthetic trigger.
    pub region: (i64, i64, i64, i64),
    /// Mean share of heat in the region on stamped images.
    pub triggered_mass: f64,
    /// The same on the clean images.
    pub clean_mass: f64,
    /// The region's share of the image.
    pub area_share: f64,
    pub images: usize,
}

/// Everything a scan found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanReport {
    pub model: PathBuf,
    pub card: ModelCard,
    pub data: DataInfo,
    pub device: String,
    pub verdict: Verdict,
    /// Why: the rule that decided and the evidence behind it.
    pub reasons: Vec<String>,
    /// Labels flagged by the reverse engineering, most anomalous first.
    pub suspect_labels: Vec<i64>,
    /// The label whose trigger was analysed (the top flagged label, else
    /// the most anomalous one).
    pub analysed_label: i64,
    /// The model's accuracy on the clean data (a check of card and data).
    pub clean_accuracy: f64,
    pub anomaly_threshold: f64,
    pub strong_anomaly: f64,
    /// The reverse engineering; its anomaly index is of the log mask norms.
    pub reverse: ReverseSummary,
    /// Neural Cleanse's anomaly index of the plain (linear) mask norms,
    /// for comparison.
    pub linear_anomaly_index: Vec<f64>,
    pub activations: ActivationEvidence,
    pub clp: ClpScores,
    /// Channels both CLP and the activations single out.
    pub clp_activation_overlap: Vec<i64>,
    pub gradcam: GradcamEvidence,
    /// Synthetic trigger of the analysed label (image space): mask, pattern.
    pub trigger_file: PathBuf,
    pub figures: Vec<PathBuf>,
    pub timings: BTreeMap<String, f64>,
}

/// The verdict and its reasons from the evidence (see the module docs).
pub fn decide(
    reverse: &ReverseSummary,
    threshold: f64,
    activations: &ActivationEvidence,
    clean_accuracy: f64,
) -> (Verdict, Vec<String>) {
    let mut reasons = Vec::new();
    let strongest = reverse
        .labels
        .iter()
        .max_by(|a, b| a.anomaly_index.total_cmp(&b.anomaly_index));
    if clean_accuracy < MIN_CLEAN_ACC {
        reasons.push(format!(
            "the model classifies only {:.1}% of the clean images correctly (< {:.0}%): \
             check the card's mean/std, input_shape and class order, and the data; \
             the other evidence is not trustworthy",
            100.0 * clean_accuracy,
            100.0 * MIN_CLEAN_ACC
        ));
        return (Verdict::Inconclusive, reasons);
    }
    let Some(top) = reverse.flagged_labels.first().copied() else {
        match strongest {
            Some(s) if s.anomaly_index > threshold => reasons.push(format!(
                "no label flagged: label {} has anomaly index {:.2} > {threshold} but its \
                 reversed trigger flips only {:.1}% of other labels' images",
                s.label,
                s.anomaly_index,
                100.0 * s.attack_success
            )),
            Some(s) => reasons.push(format!(
                "no label flagged: the largest anomaly index is {:.2} (label {}), at most {threshold}",
                s.anomaly_index, s.label
            )),
            None => reasons.push("no labels".into()),
        }
        return (Verdict::Clean, reasons);
    };
    let r = &reverse.labels[top as usize];
    reasons.push(format!(
        "label {top} flagged: anomaly index {:.2} > {threshold} (mask L1 {:.1} px vs a median of {:.1} px); \
         its reversed trigger flips {:.1}% of other labels' images",
        r.anomaly_index,
        r.mask_l1,
        median(&reverse.labels.iter().map(|l| l.mask_l1).collect::<Vec<_>>()),
        100.0 * r.attack_success
    ));
    let strong_channels: Vec<i64> = activations
        .outlier_channels
        .iter()
        .copied()
        .filter(|c| activations.separation.ratios[*c as usize] >= MIN_CHANNEL_RATIO)
        .collect();
    if !strong_channels.is_empty() {
        reasons.push(format!(
            "corroborated: the trigger lifts the l_inf of {} channel(s) of {} far above the rest \
             (channel {} x{:.2})",
            strong_channels.len(),
            activations.layer,
            strong_channels[0],
            activations.separation.ratios[strong_channels[0] as usize]
        ));
    }
    if r.anomaly_index >= STRONG_ANOMALY {
        reasons.push(format!(
            "anomaly index {:.2} >= {STRONG_ANOMALY}: backdoored",
            r.anomaly_index
        ));
        (Verdict::Backdoored, reasons)
    } else if !strong_channels.is_empty() {
        reasons.push("flagged and corroborated by the activations: backdoored".into());
        (Verdict::Backdoored, reasons)
    } else {
        reasons.push(format!(
            "anomaly index {:.2} is below {STRONG_ANOMALY} and no channel stands out under the \
             trigger: inconclusive",
            r.anomaly_index
        ));
        (Verdict::Inconclusive, reasons)
    }
}

/// Mean l_inf per channel on clean vs stamped images (normalised inputs).
pub fn activation_evidence(
    subject: &Subject,
    trigger: &Trigger,
    label: i64,
    images: usize,
    seed: u64,
) -> Result<ActivationEvidence> {
    let others = subject
        .data
        .select(&subject.data.labels.ne(label).nonzero().squeeze_dim(1));
    let sample = shuffled_subset(&others, images, seed ^ 0x57a7);
    let model = &subject.loaded.model;
    let clean = stats::collect(model, &subject.layer, &sample.images, STATS_BATCH)?;
    let stamped = subject.norm.trigger_to_model(trigger).apply(&sample.images);
    let trig = stats::collect(model, &subject.layer, &stamped, STATS_BATCH)?;
    let separation = stats::separation(&clean, &trig, Norm::Linf);
    let med = median(&separation.ratios);
    let spread = 1.4826 * mad(&separation.ratios);
    let mut outliers: Vec<i64> = separation
        .ratios
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            if spread > 0.0 {
                (**r - med) / spread > stats::ROBUST_Z
            } else {
                **r > med + 1e-9
            }
        })
        .map(|(i, _)| i as i64)
        .collect();
    outliers
        .sort_by(|a, b| separation.ratios[*b as usize].total_cmp(&separation.ratios[*a as usize]));
    Ok(ActivationEvidence {
        layer: subject.layer.clone(),
        label,
        images: sample.len() as usize,
        clean_linf: clean.channel_means(Norm::Linf),
        triggered_linf: trig.channel_means(Norm::Linf),
        separation,
        outlier_channels: outliers,
    })
}

fn gradcam_evidence(
    subject: &Subject,
    trigger: &Trigger,
    label: i64,
    images: usize,
    seed: u64,
    out: &Path,
    figures: &mut Vec<PathBuf>,
) -> Result<GradcamEvidence> {
    let others = subject
        .data
        .select(&subject.data.labels.ne(label).nonzero().squeeze_dim(1));
    let sample = shuffled_subset(&others, images, seed ^ 0x6c61);
    let model = &subject.loaded.model;
    let stamped = subject.norm.trigger_to_model(trigger).apply(&sample.images);
    let classes = Tensor::full([sample.len()], label, (Kind::Int64, Device::Cpu));
    let cam_t = gradcam::gradcam(model, &subject.layer, &stamped, Some(&classes))?;
    let cam_c = gradcam::gradcam(model, &subject.layer, &sample.images, None)?;
    let region = trigger.strong_region();
    let mt = gradcam::mean_mass_in_region(&cam_t.heat, region)?;
    let mc = gradcam::mean_mass_in_region(&cam_c.heat, region)?;
    let n = 8.min(sample.len());
    let show = |x: &Tensor| subject.norm.undo(x).clamp(0.0, 1.0);
    figure(figures, out.join("gradcam.png"), |p| {
        let mut rows: Vec<Vec<Rgb>> = vec![Vec::new(); 4];
        for i in 0..n {
            let c = Rgb::from_tensor(&show(&sample.images.get(i)))?;
            let s = Rgb::from_tensor(&show(&stamped.get(i)))?;
            rows[0].push(c.clone());
            rows[1].push(c.blend(&Rgb::heat(&cam_c.heat.get(i))?, 0.5));
            rows[2].push(s.clone());
            rows[3].push(s.blend(&Rgb::heat(&cam_t.heat.get(i))?, 0.5));
        }
        plot::image_grid(
            p,
            &format!(
                "Grad-CAM of {} (label {label} on stamped images)",
                subject.layer
            ),
            &[
                "clean".into(),
                "clean, predicted class".into(),
                format!("stamped with label {label}'s trigger"),
                format!("stamped, class {label}"),
            ],
            &rows,
            4,
        )
    });
    Ok(GradcamEvidence {
        layer: subject.layer.clone(),
        label,
        region,
        triggered_mass: mt.mass_in_region,
        clean_mass: mc.mass_in_region,
        area_share: mt.area_share,
        images: mt.images,
    })
}

/// Draws a figure, logging (not failing) when it cannot be drawn.
pub(crate) fn figure(
    figures: &mut Vec<PathBuf>,
    path: PathBuf,
    draw: impl FnOnce(&Path) -> Result<()>,
) {
    match draw(&path) {
        Ok(()) => figures.push(path),
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "figure not written"),
    }
}

/// Per-label figure of reversed triggers: mask, mask x pattern, a stamped
/// image (image space).
pub(crate) fn triggers_figure(
    path: &Path,
    rev: &Reversed,
    sample: &Tensor,
    title: &str,
) -> Result<()> {
    let row = |f: &dyn Fn(&Trigger) -> Tensor| -> Result<Vec<Rgb>> {
        rev.triggers
            .iter()
            .map(|t| Rgb::from_tensor(&f(t)))
            .collect()
    };
    let cells = vec![
        row(&|t: &Trigger| t.mask.shallow_clone())?,
        row(&|t: &Trigger| &t.pattern * &t.mask)?,
        row(&|t: &Trigger| t.apply(&sample.unsqueeze(0)).squeeze_dim(0))?,
    ];
    plot::image_grid(
        path,
        title,
        &["mask".into(), "mask x pattern".into(), "stamped".into()],
        &cells,
        4,
    )
}

/// Bars per label or channel, `marked` ones in red, with an optional
/// horizontal line.
pub(crate) fn bars(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    values: &[f64],
    marked: &[i64],
    line: Option<f64>,
) -> Result<()> {
    use plotters::prelude::*;
    let perr = |e: &dyn std::fmt::Display| {
        Error::Other(format!("{}: cannot draw figure: {e}", path.display()))
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let n = values.len().max(1);
    let ymax = values
        .iter()
        .copied()
        .chain(line)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.1;
    let root = BitMapBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.5..(n as f64 - 0.5), 0.0..ymax)
        .map_err(|e| perr(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .disable_x_mesh()
        .draw()
        .map_err(|e| perr(&e))?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, v)| {
            let color = if marked.contains(&(i as i64)) {
                RGBColor(214, 39, 40)
            } else {
                RGBColor(31, 119, 180)
            };
            Rectangle::new(
                [(i as f64 - 0.4, 0.0), (i as f64 + 0.4, v.max(0.0))],
                color.filled(),
            )
        }))
        .map_err(|e| perr(&e))?;
    if let Some(y) = line {
        chart
            .draw_series(LineSeries::new(
                vec![(-0.5, y), (n as f64 - 0.5, y)],
                BLACK.stroke_width(1),
            ))
            .map_err(|e| perr(&e))?;
    }
    root.present().map_err(|e| perr(&e))?;
    Ok(())
}

/// The model's accuracy on the subject's clean data.
pub fn clean_accuracy(subject: &Subject) -> f64 {
    let p = crate::eval::predict(
        &subject.loaded.model,
        &subject.data.images,
        crate::eval::EVAL_BATCH,
    );
    crate::eval::share_equal(&p, &subject.data.labels)
}

/// Runs a scan and writes `report.json`, `report.md` and figures into `out`.
pub fn scan(
    subject: &Subject,
    opts: &ScanOptions,
    out: &Path,
    progress: &dyn Progress,
) -> Result<ScanReport> {
    opts.validate()?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let model = &subject.loaded.model;
    let mut timings = BTreeMap::new();
    let mut figures = Vec::new();
    let t = Instant::now();
    let clean_accuracy = clean_accuracy(subject);
    timings.insert("clean_accuracy".to_string(), t.elapsed().as_secs_f64());

    let t = Instant::now();
    let rev = cleanse::reverse_engineer(
        model,
        Some(&subject.norm),
        &subject.data,
        &Settings::byom(&opts.cleanse)?,
        progress,
    )?;
    timings.insert("reverse".to_string(), t.elapsed().as_secs_f64());
    let (label, trig) = rev.suspect();
    let trig = trig.clone();
    let trigger_file = out.join("trigger.safetensors");
    save_trigger(&trig, &trigger_file)?;
    let sample = subject
        .norm
        .undo(&subject.data.images.get(0))
        .clamp(0.0, 1.0);
    figure(&mut figures, out.join("triggers.png"), |p| {
        triggers_figure(
            p,
            &rev,
            &sample,
            "reversed trigger per label (columns = labels)",
        )
    });
    let norms: Vec<f64> = rev.summary.labels.iter().map(|l| l.mask_l1).collect();
    figure(&mut figures, out.join("anomaly.png"), |p| {
        bars(
            p,
            "mask L1 norm of the reversed trigger per label (red: flagged)",
            "label",
            "mask L1 (pixels)",
            &norms,
            &rev.summary.flagged_labels,
            None,
        )
    });

    let t = Instant::now();
    let activations = activation_evidence(subject, &trig, label, opts.stats_images, opts.seed)?;
    figure(&mut figures, out.join("activations.png"), |p| {
        bars(
            p,
            &format!(
                "l_inf ratio (label {label}'s trigger / clean) per channel of {} (red: outliers)",
                subject.layer
            ),
            "channel",
            "triggered / clean mean l_inf",
            &activations.separation.ratios,
            &activations.outlier_channels,
            Some(1.0),
        )
    });
    timings.insert("activations".to_string(), t.elapsed().as_secs_f64());

    let t = Instant::now();
    let clp = clp::clp_scores(model, &subject.layer, opts.clp_u)?;
    figure(&mut figures, out.join("clp.png"), |p| {
        bars(
            p,
            &format!(
                "CLP score per channel of {} (red: above mean + {} std)",
                subject.layer, clp.u
            ),
            "channel",
            "channel Lipschitz upper bound",
            &clp.scores,
            &clp.outliers,
            Some(clp.mean + clp.u * clp.std),
        )
    });
    let overlap: Vec<i64> = activations
        .outlier_channels
        .iter()
        .copied()
        .filter(|c| clp.outliers.contains(c))
        .collect();
    timings.insert("clp".to_string(), t.elapsed().as_secs_f64());

    let t = Instant::now();
    let gradcam = gradcam_evidence(
        subject,
        &trig,
        label,
        opts.gradcam_images,
        opts.seed,
        out,
        &mut figures,
    )?;
    timings.insert("gradcam".to_string(), t.elapsed().as_secs_f64());

    let (verdict, mut reasons) = decide(
        &rev.summary,
        opts.cleanse.anomaly_threshold,
        &activations,
        clean_accuracy,
    );
    if !clp.outliers.is_empty() {
        reasons.push(format!(
            "CLP (data-free) singles out channel(s) {:?} of {}{}",
            clp.outliers,
            subject.layer,
            if overlap.is_empty() {
                String::new()
            } else {
                format!("; {overlap:?} also stand out in the activations")
            }
        ));
    } else {
        reasons.push(format!(
            "CLP (data-free) singles out no channel of {} (u = {})",
            subject.layer, clp.u
        ));
    }
    reasons.push(format!(
        "Grad-CAM of label {label} on stamped images puts {:.0}% of its heat on the trigger's \
         region ({:.0}% of the image; {:.0}% on clean images)",
        100.0 * gradcam.triggered_mass,
        100.0 * gradcam.area_share,
        100.0 * gradcam.clean_mass
    ));
    let report = ScanReport {
        model: subject.loaded.weights.clone(),
        card: subject.loaded.card.clone(),
        data: subject.data_info.clone(),
        device: crate::device::describe(model.device()),
        verdict,
        reasons,
        suspect_labels: rev.summary.flagged_labels.clone(),
        analysed_label: label,
        clean_accuracy,
        anomaly_threshold: opts.cleanse.anomaly_threshold,
        strong_anomaly: STRONG_ANOMALY,
        reverse: rev.summary.clone(),
        linear_anomaly_index: cleanse::anomaly_indices(&norms),
        activations,
        clp,
        clp_activation_overlap: overlap,
        gradcam,
        trigger_file,
        figures,
        timings,
    };
    report.write(out)?;
    Ok(report)
}

impl Document for ScanReport {
    const WHAT: &'static str = "a scan report";

    fn to_markdown(&self) -> String {
        let mut s = String::new();
        let name = |l: i64| {
            self.data
                .class_names
                .get(l as usize)
                .cloned()
                .unwrap_or(l.to_string())
        };
        let _ = writeln!(s, "# deadbolt scan: {}\n", self.verdict.as_str());
        let _ = writeln!(
            s,
            "Model `{}` ({}, {} classes, input {:?}); clean data `{}` ({} images, {:?}); \
             the model classifies {:.2}% of them correctly. Device: {}.\n",
            self.model.display(),
            self.card.arch.as_str(),
            self.card.classes,
            self.card.input_shape,
            self.data.dir.display(),
            self.data.images,
            self.data.source,
            100.0 * self.clean_accuracy,
            self.device
        );
        let _ = writeln!(s, "## Verdict: **{}**\n", self.verdict.as_str());
        for r in &self.reasons {
            let _ = writeln!(s, "- {r}");
        }
        let _ = writeln!(
            s,
            "\n## Reversed triggers (Neural Cleanse, all labels together)\n\n\
             Anomaly threshold {}; a flagged label's trigger must also work. {} images, {:.1} s.\n",
            self.anomaly_threshold, self.reverse.images, self.reverse.seconds
        );
        let _ = writeln!(
            s,
            "| label | mask L1 (px) | attack success | anomaly index (log norms) | anomaly index (linear) | flagged |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for l in &self.reverse.labels {
            let _ = writeln!(
                s,
                "| {} | {:.1} | {:.1}% | {:.2} | {:.2} | {} |",
                name(l.label),
                l.mask_l1,
                100.0 * l.attack_success,
                l.anomaly_index,
                self.linear_anomaly_index
                    .get(l.label as usize)
                    .copied()
                    .unwrap_or(0.0),
                if l.flagged { "yes" } else { "" }
            );
        }
        let a = &self.activations;
        let _ = writeln!(
            s,
            "\n## Activations of {} (label {}'s trigger vs clean, {} images)\n\n\
             Largest l_inf ratio {:.2} (channel {}); {} channel(s) >= 2x; robust outliers: {:?}.\n",
            a.layer,
            name(a.label),
            a.images,
            a.separation.max_ratio,
            a.separation.top_channel,
            a.separation.above_threshold,
            a.outlier_channels
        );
        if !a.outlier_channels.is_empty() {
            let _ = writeln!(s, "| channel | clean l_inf | triggered l_inf | ratio |");
            let _ = writeln!(s, "|---|---|---|---|");
            for c in a.outlier_channels.iter().take(12) {
                let i = *c as usize;
                let _ = writeln!(
                    s,
                    "| {c} | {:.3} | {:.3} | {:.2} |",
                    a.clean_linf[i], a.triggered_linf[i], a.separation.ratios[i]
                );
            }
        }
        let c = &self.clp;
        let _ = writeln!(
            s,
            "\n## CLP (data-free) on `{}`{}\n\nScores: mean {:.3}, std {:.3}; outliers (> mean + {} std): {:?}; \
             shared with the activation outliers: {:?}.\n",
            c.conv,
            c.batch_norm
                .as_ref()
                .map(|b| format!(" scaled by `{b}`"))
                .unwrap_or_default(),
            c.mean,
            c.std,
            c.u,
            c.outliers,
            self.clp_activation_overlap
        );
        let g = &self.gradcam;
        let _ = writeln!(
            s,
            "## Grad-CAM\n\nOn images stamped with label {}'s trigger, {:.1}% of the heat (class {}) lies in the \
             trigger's region {:?}, which covers {:.1}% of the image ({:.1}% on the clean images).\n",
            name(g.label),
            100.0 * g.triggered_mass,
            name(g.label),
            g.region,
            100.0 * g.area_share,
            100.0 * g.clean_mass
        );
        figures_beside(&mut s, &self.figures);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::defense::cleanse::LabelResult;

    fn reverse(norms: &[f64], success: f64, threshold: f64) -> ReverseSummary {
        let index = cleanse::log_anomaly_indices(norms);
        let labels: Vec<LabelResult> = norms
            .iter()
            .zip(&index)
            .enumerate()
            .map(|(i, (n, a))| LabelResult {
                label: i as i64,
                mask_l1: *n,
                attack_success: success,
                anomaly_index: *a,
                flagged: *a > threshold && success >= 0.75,
                steps: 1,
            })
            .collect();
        let mut flagged: Vec<&LabelResult> = labels.iter().filter(|l| l.flagged).collect();
        flagged.sort_by(|a, b| b.anomaly_index.total_cmp(&a.anomaly_index));
        ReverseSummary {
            flagged_labels: flagged.iter().map(|l| l.label).collect(),
            labels,
            anomaly_index: index,
            images: 10,
            seconds: 0.0,
        }
    }

    fn activations(ratios: Vec<f64>, outliers: Vec<i64>) -> ActivationEvidence {
        ActivationEvidence {
            layer: "conv2".into(),
            label: 0,
            images: 10,
            clean_linf: vec![1.0; ratios.len()],
            triggered_linf: ratios.clone(),
            separation: stats::separation_of_means(&vec![1.0; ratios.len()], &ratios, Norm::Linf),
            outlier_channels: outliers,
        }
    }

    #[test]
    fn verdict_rules() {
        let quiet = activations(vec![1.0, 1.1, 0.9, 1.0], vec![]);
        let loud = activations(vec![1.0, 1.9, 0.9, 1.0], vec![1]);
        let clean = [70.0, 140.0, 69.0, 67.0, 104.0, 63.0, 89.0, 95.0, 70.0, 92.0];
        let (v, why) = decide(&reverse(&clean, 0.9, 2.0), 2.0, &loud, 0.97);
        assert_eq!(v, Verdict::Clean, "{why:?}");
        // a strongly anomalous label decides alone
        let mut bd = clean;
        bd[3] = 22.0;
        let r = reverse(&bd, 0.9, 2.0);
        assert_eq!(r.flagged_labels, [3]);
        assert!(
            r.anomaly_index[3] >= STRONG_ANOMALY,
            "{:?}",
            r.anomaly_index
        );
        let (v, why) = decide(&r, 2.0, &quiet, 0.97);
        assert_eq!(v, Verdict::Backdoored, "{why:?}");
        // a weakly anomalous label needs the activations
        let mut weak = clean;
        weak[3] = 42.0;
        let r = reverse(&weak, 0.9, 2.0);
        let a = r.anomaly_index[3];
        assert!(a > 2.0 && a < STRONG_ANOMALY, "{a}");
        assert_eq!(decide(&r, 2.0, &quiet, 0.97).0, Verdict::Inconclusive);
        assert_eq!(decide(&r, 2.0, &loud, 0.97).0, Verdict::Backdoored);
        // a model that gets the clean data wrong is not judged
        let (v, why) = decide(&reverse(&bd, 0.9, 2.0), 2.0, &loud, 0.2);
        assert_eq!(v, Verdict::Inconclusive);
        assert!(why[0].contains("mean/std"), "{why:?}");
        // a trigger that does not work is not flagged
        assert_eq!(
            decide(&reverse(&bd, 0.3, 2.0), 2.0, &loud, 0.97).0,
            Verdict::Clean
        );
    }
}
