//! The seed's defense end to end: data -> validation hold-out -> poisoning ->
//! clean and backdoored training -> activation statistics, Grad-CAM and
//! synthetic trigger -> pruning with every criterion -> report.
//!
//! Each stage is a function that takes and returns plain data (checkpoint
//! folders, datasets, JSON-able results), so the same stages can be served
//! by separate services (poisoner: [`stage_data`], trainer: [`stage_train`],
//! analyzer: [`stage_analyze`], pruner: [`stage_prune`]) and glued by
//! [`assemble_report`]. [`run`] runs them all on one machine.
//!
//! Files under `out`: `clean/` and `backdoored/` checkpoints (resumed when
//! their sidecar holds the same spec), `synthetic/` (reversed trigger and
//! its figures), `pruned/<criterion>[-synthetic]/` checkpoints (masks baked
//! into the weights), figures (`hist_<norm>.png`, `gradcam.png`,
//! `pruning_curves*.png`), `spec.toml`, `report.json` and `report.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Tensor};

use super::checkpointed::{self, TrainJob};
use super::prepare::Prepared;
use super::report::{
    CriterionReport, DataSummary, FineTuneSearch, GradcamSummary, HeatmapImage, ModelFigures,
    Report, SyntheticSummary, TriggerSource,
};
use crate::data::{shuffled_indices, shuffled_subset, Dataset};
use crate::defense::cleanse::{self, Reversed, Settings};
use crate::defense::gradcam::{self, RegionMass};
use crate::defense::prune::{self, Choice};
use crate::defense::search;
use crate::defense::stats::{self, Norm};
use crate::defense::Setting;
use crate::error::{Error, Result};
use crate::eval::{self, CurvePoint, Metrics};
use crate::model::{CheckpointMeta, Model, ModelInfo};
use crate::plot::{self, Rgb};
use crate::poison::Attack;
use crate::progress::Progress;
use crate::report::Document;
use crate::spec::byom::RepairOptions;
use crate::spec::{Criterion, ExperimentSpec};
use crate::train::EpochReport;
use crate::trigger::Trigger;

/// Images whose Grad-CAM mass is averaged per setting.
pub const GRADCAM_IMAGES: usize = 200;
/// Sample images per row of the Grad-CAM figure.
pub const GRADCAM_SAMPLES: usize = 6;
/// Images per batch when collecting statistics.
pub const STATS_BATCH: usize = 250;

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Draws a figure, logging (not failing) when it cannot be drawn.
fn figure(figures: &mut Vec<PathBuf>, path: PathBuf, draw: impl FnOnce(&Path) -> Result<()>) {
    match draw(&path) {
        Ok(()) => figures.push(path),
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "figure not written"),
    }
}

/// Poisoner: loads the data, holds out the (clean) validation split and
/// poisons the training split.
pub fn stage_data(spec: &ExperimentSpec) -> Result<Prepared> {
    stage_data_with(spec, &crate::data::DataLimits::default())
}

/// [`stage_data`] with the data read within `limits` (the services pass
/// their operator's).
pub fn stage_data_with(
    spec: &ExperimentSpec,
    limits: &crate::data::DataLimits,
) -> Result<Prepared> {
    let p = Prepared::from_spec_with(spec, limits)?;
    if p.val.is_empty() {
        return Err(Error::invalid(
            "dataset.validation_fraction",
            "the validation split is empty; the defense needs validation data",
        ));
    }
    Ok(p)
}

/// Sizes of the prepared data.
pub fn data_summary(p: &Prepared) -> DataSummary {
    DataSummary {
        train: p.train.len(),
        validation: p.val.len(),
        test: p.test.len(),
        poisoned: p.poisoned.poisoned.len(),
        image_shape: p.train.image_shape(),
        classes: p.train.classes,
    }
}

/// What the trainer produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub checkpoint: PathBuf,
    pub metrics: Metrics,
    pub epochs: Vec<EpochReport>,
    /// Epochs found in an existing checkpoint of the same spec (0 = fresh).
    pub resumed_from: usize,
    pub seconds: f64,
}

/// Trainer: trains a model of `spec` on `data` into `out` (a checkpoint
/// folder; an existing checkpoint of the same spec is resumed or reused),
/// and evaluates it on `test` (with `attack` for ASR/RA).
pub fn stage_train(
    spec: &ExperimentSpec,
    data: &Dataset,
    test: &Dataset,
    attack: Option<&Attack>,
    out: &Path,
    progress: &dyn Progress,
) -> Result<TrainOutcome> {
    let t0 = Instant::now();
    let device = crate::device::resolve(spec.training.device)?;
    let info = ModelInfo {
        arch: spec.model.arch,
        classes: data.classes,
        input_shape: data.image_shape(),
    };
    let spec_text = spec.to_toml_string();
    let resume = checkpointed::existing_checkpoint(out)
        .is_some_and(|m| m.spec.as_deref() == Some(spec_text.as_str()) && m.model == info);
    let trained = checkpointed::train_checkpointed(
        TrainJob {
            spec,
            info,
            data,
            test,
            attack,
            out,
            device,
            resume,
        },
        progress,
    )?;
    tracing::info!(
        dir = %out.display(),
        acc = trained.metrics.acc,
        asr = ?trained.metrics.asr,
        resumed_from = trained.resumed_from,
        "model trained"
    );
    Ok(TrainOutcome {
        checkpoint: out.to_path_buf(),
        metrics: trained.metrics,
        epochs: trained.epochs,
        resumed_from: trained.resumed_from,
        seconds: secs(t0),
    })
}

/// The prunable layer a spec names (or the model's default).
pub fn resolve_layer(spec: &ExperimentSpec, model: &Model) -> Result<String> {
    let name = spec
        .defense
        .layer
        .clone()
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| model.default_layer().to_string());
    model
        .layer(&name)
        .map_err(|e| Error::invalid("defense.layer", e.to_string()))?;
    Ok(name)
}

/// What the analyzer produced.
#[derive(Debug, Clone)]
pub struct AnalysisOutcome {
    pub layer: String,
    pub channels: i64,
    pub stats_trigger: TriggerSource,
    pub separation: BTreeMap<Norm, stats::Separation>,
    pub channel_means: BTreeMap<Setting, BTreeMap<Norm, Vec<f64>>>,
    pub gradcam: GradcamSummary,
    pub synthetic: SyntheticSummary,
    pub figures: Vec<PathBuf>,
    pub timings: BTreeMap<String, f64>,
}

/// Analyzer, part 1: reverse-engineers a trigger per label of the
/// backdoored model from clean validation images; saves the suspect's
/// trigger to `out/synthetic/trigger.safetensors` plus figures.
pub fn stage_reverse(
    spec: &ExperimentSpec,
    backdoored: &Model,
    val: &Dataset,
    attack: Option<&Attack>,
    out: &Path,
    progress: &dyn Progress,
) -> Result<(Reversed, SyntheticSummary, Vec<PathBuf>)> {
    let rev = cleanse::reverse_engineer(
        backdoored,
        None,
        val,
        &Settings::synthetic(&spec.defense.synthetic),
        progress,
    )?;
    let (suspect, trig) = rev.suspect();
    let dir = out.join("synthetic");
    let trigger_file = dir.join("trigger.safetensors");
    cleanse::save_trigger(trig, &trigger_file)?;
    let mut figures = Vec::new();
    figure(&mut figures, dir.join("mask.png"), |p| {
        Rgb::from_tensor(&trig.mask)?.save_png(p, 8)
    });
    figure(&mut figures, dir.join("pattern.png"), |p| {
        Rgb::from_tensor(&(&trig.pattern * &trig.mask))?.save_png(p, 8)
    });
    figure(&mut figures, dir.join("all_labels.png"), |p| {
        let sample = val.images.get(0);
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
        let labels = [
            "mask".to_string(),
            "mask x pattern".into(),
            "stamped".into(),
        ];
        plot::image_grid(
            p,
            "reversed trigger per label (columns = labels)",
            &labels,
            &cells,
            4,
        )
    });
    let target_flagged = attack
        .filter(|a| a.spec.target_mode == crate::spec::TargetMode::AllToOne)
        .map(|a| rev.summary.flagged_labels.contains(&a.spec.target));
    let summary = SyntheticSummary {
        summary: rev.summary.clone(),
        suspect_label: suspect,
        target_flagged,
        trigger_file,
    };
    Ok((rev, summary, figures))
}

/// The validation images the statistics are computed on: a seeded random
/// subset of `defense.stats_images` (the validation split is sorted by
/// class).
pub fn stats_sample(spec: &ExperimentSpec, val: &Dataset) -> Dataset {
    shuffled_subset(val, spec.defense.stats_images, spec.seed ^ 0x57a7)
}

/// Analyzer: synthetic trigger, activation statistics in the four settings
/// (histogram figures), Grad-CAM (grid figure, mass in the trigger region).
/// Triggered inputs use the real trigger when `attack` is given, else the
/// synthetic one.
pub fn stage_analyze(
    spec: &ExperimentSpec,
    clean_ckpt: &Path,
    backdoored_ckpt: &Path,
    val: &Dataset,
    attack: Option<&Attack>,
    out: &Path,
    progress: &dyn Progress,
) -> Result<AnalysisOutcome> {
    let device = crate::device::resolve(spec.training.device)?;
    let (clean, _) = Model::load(clean_ckpt, device)?;
    let (backdoored, _) = Model::load(backdoored_ckpt, device)?;
    let layer = resolve_layer(spec, &backdoored)?;
    let channels = backdoored.layer(&layer)?.channels;
    let mut timings = BTreeMap::new();

    let t = Instant::now();
    let (rev, synthetic, mut figures) =
        stage_reverse(spec, &backdoored, val, attack, out, progress)?;
    timings.insert("reverse".to_string(), secs(t));

    let t = Instant::now();
    let (stats_trigger, trig) = match attack {
        Some(a) => (TriggerSource::Real, a.trigger.clone()),
        None => (TriggerSource::Synthetic, rev.suspect().1.clone().into()),
    };
    let imgs = stats_sample(spec, val).images;
    let trig_imgs = trig.apply(&imgs);
    let four = stats::four_settings(&clean, &backdoored, &layer, &imgs, &trig_imgs, STATS_BATCH)?;
    let separation = four.separations();
    let channel_means = four.channel_means();
    for n in Norm::ALL {
        let panels: Vec<(String, Vec<f64>)> = Setting::ALL
            .iter()
            .map(|s| (s.label().to_string(), channel_means[s][&n].clone()))
            .collect();
        figure(
            &mut figures,
            out.join(format!("hist_{}.png", n.as_str())),
            |p| {
                plot::histogram_panels(
                    p,
                    &format!(
                        "per-channel mean {} of {layer} ({} images)",
                        n.as_str(),
                        imgs.size()[0]
                    ),
                    n.as_str(),
                    &panels,
                    24,
                )
            },
        );
    }
    timings.insert("stats".to_string(), secs(t));

    let t = Instant::now();
    let target = attack.map(|a| a.spec.target).unwrap_or(rev.suspect().0);
    let order = shuffled_indices(val, 0, spec.seed ^ 0x6c61);
    let shuffled = val.select_vec(&order);
    let keep: Vec<i64> = shuffled
        .labels_vec()
        .iter()
        .enumerate()
        .filter(|(_, l)| **l != target)
        .map(|(i, _)| i as i64)
        .take(GRADCAM_IMAGES)
        .collect();
    let region = trig.strong_region();
    let cam_clean = shuffled.select_vec(&keep).images;
    let cam_labels = shuffled.select_vec(&keep).labels_vec();
    let cam_trig = trig.apply(&cam_clean);
    let mut mass = BTreeMap::new();
    let mut rows = Vec::new();
    let mut heatmaps = Vec::new();
    let maps_dir = out.join("gradcam");
    for s in Setting::ALL {
        let model = if s.backdoored_model() {
            &backdoored
        } else {
            &clean
        };
        let x = if s.triggered_input() {
            &cam_trig
        } else {
            &cam_clean
        };
        let cam = gradcam::gradcam(model, &layer, x, None)?;
        let m: RegionMass = gradcam::mean_mass_in_region(&cam.heat, region)?;
        mass.insert(s, m);
        let samples = (GRADCAM_SAMPLES as i64).min(x.size()[0]);
        let shares = gradcam::mass_in_region(&cam.heat.narrow(0, 0, samples), region)?;
        let predicted = Vec::<i64>::try_from(cam.classes.narrow(0, 0, samples))?;
        let mut row = Vec::new();
        for i in 0..samples {
            let base = Rgb::from_tensor(&x.get(i))?;
            let overlay = base.blend(&Rgb::heat(&cam.heat.get(i))?, 0.5);
            if s.backdoored_model() {
                let rel = PathBuf::from("gradcam").join(format!("{}-{i}.png", s.as_str()));
                std::fs::create_dir_all(&maps_dir).map_err(|e| Error::io(&maps_dir, e))?;
                overlay.save_png(&out.join(&rel), 4)?;
                heatmaps.push(HeatmapImage {
                    setting: s,
                    index: order[keep[i as usize] as usize],
                    label: cam_labels[i as usize],
                    predicted: predicted[i as usize],
                    trigger_share: shares[i as usize],
                    file: rel,
                });
            }
            row.push(overlay);
        }
        rows.push(row);
    }
    let labels: Vec<String> = Setting::ALL.iter().map(|s| s.label().to_string()).collect();
    figure(&mut figures, out.join("gradcam.png"), |p| {
        plot::image_grid(
            p,
            &format!("Grad-CAM of {layer} (predicted class)"),
            &labels,
            &rows,
            4,
        )
    });
    timings.insert("gradcam".to_string(), secs(t));
    tracing::info!(
        linf = separation[&Norm::Linf].max_ratio,
        l1 = separation[&Norm::L1].max_ratio,
        l2 = separation[&Norm::L2].max_ratio,
        flagged = ?synthetic.summary.flagged_labels,
        "analysis done"
    );
    Ok(AnalysisOutcome {
        layer,
        channels,
        stats_trigger,
        separation,
        channel_means,
        gradcam: GradcamSummary {
            layer: four.layer.clone(),
            region,
            mass_in_trigger: mass,
            heatmaps,
        },
        synthetic,
        figures,
        timings,
    })
}

/// What the pruner produced.
#[derive(Debug, Clone)]
pub struct PruneOutcome {
    pub pruning: BTreeMap<Criterion, CriterionReport>,
    pub pruning_synthetic: BTreeMap<Criterion, CriterionReport>,
    pub figures: Vec<PathBuf>,
    pub timings: BTreeMap<String, f64>,
}

fn point(m: &Metrics) -> CurvePoint {
    CurvePoint {
        k: 0,
        acc: m.acc,
        asr: m.asr.unwrap_or(0.0),
        ra: m.ra.unwrap_or(0.0),
    }
}

/// Pruner: for every criterion of the spec, ranks the channels of the
/// backdoored model with triggered validation images, sweeps `k` on
/// validation and test data (cached activations), chooses `k` on
/// validation, saves the pruned model (optionally fine-tuned on the
/// validation data) under `out/pruned/`. With a real attack and
/// `defense.use_real_trigger`, the channels are ranked with the real
/// trigger (`pruning`) and again with the synthetic one
/// (`pruning_synthetic`); otherwise only with the synthetic one. Test
/// ASR/RA always use the real trigger when it is known.
#[allow(clippy::too_many_arguments)]
pub fn stage_prune(
    spec: &ExperimentSpec,
    backdoored_ckpt: &Path,
    val: &Dataset,
    test: &Dataset,
    real: Option<&Attack>,
    synthetic: &Attack,
    out: &Path,
    progress: &dyn Progress,
) -> Result<PruneOutcome> {
    let device = crate::device::resolve(spec.training.device)?;
    let (model, _) = Model::load(backdoored_ckpt, device)?;
    let layer = resolve_layer(spec, &model)?;
    let channels = model.layer(&layer)?.channels;
    let ks = prune::all_ks(channels);
    let (eval_attack, evaluated_with) = match real {
        Some(a) => (a, TriggerSource::Real),
        None => (synthetic, TriggerSource::Synthetic),
    };
    let mut timings = BTreeMap::new();
    let t = Instant::now();
    let test_trig = eval_attack.triggered(test);
    let test_cache = prune::cache_features(&model, &layer, test, &test_trig)?;
    timings.insert("prune_cache_test".to_string(), secs(t));

    let mut sources = Vec::new();
    match real {
        Some(a) if spec.defense.use_real_trigger => {
            sources.push((TriggerSource::Real, a));
            sources.push((TriggerSource::Synthetic, synthetic));
        }
        _ => sources.push((TriggerSource::Synthetic, synthetic)),
    }
    let mut tables: Vec<BTreeMap<Criterion, CriterionReport>> = Vec::new();
    let mut figures = Vec::new();
    // the fit and check parts of the fine-tuned k search (made only when
    // the spec fine-tunes)
    let fit_check = (spec.defense.fine_tune_epochs > 0).then(|| {
        val.stratified_split(
            RepairOptions::default().check_fraction,
            spec.defense.seed ^ 0xc4ec,
        )
    });
    for (i, (source, attack)) in sources.iter().enumerate() {
        let t = Instant::now();
        let imgs = stats_sample(spec, val).images;
        let clean_stats = stats::collect(&model, &layer, &imgs, STATS_BATCH)?;
        let trig_stats = stats::collect(&model, &layer, &attack.trigger.apply(&imgs), STATS_BATCH)?;
        let val_trig = attack.triggered(val);
        let val_cache = prune::cache_features(&model, &layer, val, &val_trig)?;
        let suffix = if i == 0 { "" } else { "-synthetic" };
        let mut table = BTreeMap::new();
        progress.start(
            &format!("pruning sweeps ({source:?} trigger)"),
            spec.defense.criteria.len() as u64,
        );
        for &criterion in &spec.defense.criteria {
            if progress.cancelled() {
                return Err(Error::Cancelled);
            }
            let tc = Instant::now();
            let ranking = prune::rank(criterion, &clean_stats, &trig_stats, spec.defense.seed)?;
            let validation_curve = prune::sweep_cached(&model, &val_cache, &ranking.order, &ks)?;
            let curve = prune::sweep_cached(&model, &test_cache, &ranking.order, &ks)?;
            let k_for_target_asr = curve
                .iter()
                .find(|p| p.asr <= spec.defense.target_asr)
                .map(|p| p.k);
            let (k, choice, pruned, fine_tune_search) = if let Some(fit_check) = &fit_check {
                let (search, picked) = fine_tune_search(
                    spec,
                    &model,
                    &layer,
                    &ranking.order,
                    fit_check,
                    attack,
                    progress,
                )?;
                let (k, choice, model) = picked;
                (k, choice, model, Some(search))
            } else {
                let op = prune::choose_k(
                    &validation_curve,
                    spec.defense.target_asr,
                    spec.defense.max_acc_drop,
                )?;
                let pruned = prune::pruned_model(&model, &layer, &ranking.order, op.k)?;
                (op.k, op.choice, pruned, None)
            };
            let chosen = curve[k];
            let validation_point = validation_curve[k];
            let der = eval::der(&curve[0], &chosen);
            let pruned_channels = ranking.order[..k].to_vec();
            let (mut fine_tuned, mut fine_tuned_der) = (None, None);
            if fine_tune_search.is_some() {
                let mut p = point(&eval::evaluate(&pruned, test, Some(eval_attack))?);
                p.k = k;
                fine_tuned_der = Some(eval::der(&curve[0], &p));
                fine_tuned = Some(p);
            }
            let dir = out
                .join("pruned")
                .join(format!("{}{suffix}", criterion.as_str()));
            let mut meta = CheckpointMeta::new(&pruned.info);
            meta.epoch = spec.training.epochs;
            meta.pruned.insert(layer.clone(), pruned_channels.clone());
            meta.spec = Some(spec.to_toml_string());
            meta.metrics = serde_json::json!({ "test": fine_tuned.unwrap_or(chosen), "criterion": criterion, "ranked_with": source });
            pruned.save(&dir, &meta)?;
            tracing::info!(
                criterion = criterion.as_str(),
                ranked_with = ?source,
                    k,
                acc = chosen.acc,
                asr = chosen.asr,
                "pruning criterion done"
            );
            table.insert(
                criterion,
                CriterionReport {
                    criterion,
                    ranked_with: *source,
                    evaluated_with,
                    order: ranking.order,
                    scores: ranking.scores,
                    curve,
                    validation_curve,
                    chosen,
                    choice,
                    validation_point,
                    der,
                    k_for_target_asr,
                    pruned_channels,
                    checkpoint: Some(dir),
                    fine_tuned,
                    fine_tuned_der,
                    fine_tune_search,
                    seconds: secs(tc),
                },
            );
            progress.inc(1);
        }
        progress.finish("pruning sweeps done");
        let series: Vec<(String, Vec<CurvePoint>)> = table
            .values()
            .map(|r| (r.criterion.as_str().to_string(), r.curve.clone()))
            .collect();
        figure(
            &mut figures,
            out.join(format!("pruning_curves{}.png", suffix.replace('-', "_"))),
            |p| {
                plot::pruning_curves(
                    p,
                    &format!(
                        "test ACC and ASR vs channels pruned ({} trigger ranks {layer})",
                        source.as_str()
                    ),
                    &series,
                )
            },
        );
        timings.insert(format!("prune_{}", source.as_str()), secs(t));
        tables.push(table);
    }
    let mut tables = tables.into_iter();
    let first = tables.next().unwrap_or_default();
    let second = tables.next();
    let (pruning, pruning_synthetic) = match second {
        Some(s) => (first, s),
        None => (first.clone(), first),
    };
    Ok(PruneOutcome {
        pruning,
        pruning_synthetic,
        figures,
        timings,
    })
}

/// Chooses k with the fine-tuning in the loop, as `deadbolt repair` does
/// ([`search::search_k`]): the validation data is split (stratified, by
/// the repair's default check fraction) into a fit part, fine-tuned on
/// together with the repair's default share of unlearning copies (fit
/// images stamped with the ranking trigger, true labels), and a check part
/// that judges every k. Fine-tuning is the repair's (SGD, lr 0.01,
/// momentum 0.9, batch 32: gentler than training, so that a small fit part
/// does not cost accuracy) for `defense.fine_tune_epochs` epochs. Returns the search and the chosen k,
/// why, and the pruned and fine-tuned model.
fn fine_tune_search(
    spec: &ExperimentSpec,
    model: &Model,
    layer: &str,
    order: &[i64],
    (fit, check): &(Dataset, Dataset),
    attack: &Attack,
    progress: &dyn Progress,
) -> Result<(FineTuneSearch, (usize, Choice, Model))> {
    if fit.is_empty() || check.is_empty() {
        return Err(Error::EmptyDataset(format!(
            "{} validation images cannot be split into a fit and a check part to choose k with \
             defense.fine_tune_epochs > 0; raise dataset.validation_fraction",
            fit.len() + check.len()
        )));
    }
    // the repair's own search, with the spec's budget and epochs
    let opts = RepairOptions {
        target_asr: spec.defense.target_asr,
        max_acc_drop: spec.defense.max_acc_drop,
        fine_tune_epochs: spec.defense.fine_tune_epochs,
        seed: spec.seed,
        ..RepairOptions::default()
    };
    let unlearn_fraction = opts.unlearn_fraction;
    let ft_data = search::unlearning_set(fit, attack, unlearn_fraction, spec.defense.seed ^ 0x0b1e);
    let mut plan = search::SearchSpec::of(&opts);
    plan.fine_tune.device = spec.training.device;
    let s = search::search_k(
        model, layer, order, &ft_data, check, attack, &plan, progress,
    )?;
    let c = s.candidates[s.pick];
    let choice = if c.meets_target && c.within_budget {
        Choice::FineTunedMeetsTarget
    } else {
        Choice::FineTunedBestFound
    };
    Ok((
        FineTuneSearch {
            fit_images: fit.len(),
            check_images: check.len(),
            unlearn_fraction,
            candidates: s.candidates,
        },
        (c.k, choice, s.model),
    ))
}

fn figures_of(m: &TrainOutcome) -> ModelFigures {
    ModelFigures {
        acc: m.metrics.acc,
        asr: m.metrics.asr,
        ra: m.metrics.ra,
        checkpoint: m.checkpoint.clone(),
        train_seconds: m.seconds,
    }
}

/// Glues the stages' outputs into a report.
pub fn assemble_report(
    spec: &ExperimentSpec,
    data: DataSummary,
    clean: &TrainOutcome,
    backdoored: &TrainOutcome,
    analysis: AnalysisOutcome,
    pruning: PruneOutcome,
    mut timings: BTreeMap<String, f64>,
) -> Report {
    timings.extend(analysis.timings);
    timings.extend(pruning.timings);
    let device = crate::device::resolve(spec.training.device)
        .map(crate::device::describe)
        .unwrap_or_else(|e| e.to_string());
    let mut figures = analysis.figures;
    figures.extend(pruning.figures);
    Report {
        name: spec.name.clone(),
        device,
        layer: analysis.layer,
        channels: analysis.channels,
        data,
        clean_model: figures_of(clean),
        backdoored_model: figures_of(backdoored),
        separation: analysis.separation,
        channel_means: analysis.channel_means,
        stats_trigger: analysis.stats_trigger,
        gradcam: analysis.gradcam,
        synthetic_trigger: analysis.synthetic,
        pruning: pruning.pruning,
        pruning_synthetic: pruning.pruning_synthetic,
        timings,
        figures,
        spec: spec.clone(),
    }
}

/// Runs the whole experiment into `out` and writes `report.json` and
/// `report.md` there.
pub fn run(spec: &ExperimentSpec, out: &Path, progress: &dyn Progress) -> Result<Report> {
    spec.validate()?;
    let total = Instant::now();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    crate::data::idx::write_atomic(&out.join("spec.toml"), spec.to_toml_string().as_bytes())?;
    let mut timings = BTreeMap::new();

    let t = Instant::now();
    let prepared = stage_data(spec)?;
    timings.insert("data".to_string(), secs(t));
    tracing::info!(
        train = prepared.train.len(),
        val = prepared.val.len(),
        test = prepared.test.len(),
        poisoned = prepared.poisoned.poisoned.len(),
        "data ready"
    );
    let attack = prepared.attack.as_ref();

    let clean = stage_train(
        spec,
        &prepared.train,
        &prepared.test,
        attack,
        &out.join("clean"),
        progress,
    )?;
    timings.insert("train_clean".to_string(), clean.seconds);
    let backdoored = stage_train(
        spec,
        &prepared.poisoned.data,
        &prepared.test,
        attack,
        &out.join("backdoored"),
        progress,
    )?;
    timings.insert("train_backdoored".to_string(), backdoored.seconds);

    let t = Instant::now();
    let analysis = stage_analyze(
        spec,
        &clean.checkpoint,
        &backdoored.checkpoint,
        &prepared.val,
        attack,
        out,
        progress,
    )?;
    timings.insert("analyze".to_string(), secs(t));

    let t = Instant::now();
    let trig = cleanse::load_trigger(&analysis.synthetic.trigger_file)?.to_device(Device::Cpu);
    let synthetic = cleanse::synthetic_attack(
        &trig,
        analysis.synthetic.suspect_label,
        prepared.train.classes,
    );
    let pruned = stage_prune(
        spec,
        &backdoored.checkpoint,
        &prepared.val,
        &prepared.test,
        attack,
        &synthetic,
        out,
        progress,
    )?;
    timings.insert("prune".to_string(), secs(t));
    timings.insert("total".to_string(), secs(total));
    let report = assemble_report(
        spec,
        data_summary(&prepared),
        &clean,
        &backdoored,
        analysis,
        pruned,
        timings,
    );
    report.write(out)?;
    tracing::info!(out = %out.display(), seconds = secs(total), "experiment done");
    Ok(report)
}
