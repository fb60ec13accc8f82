//! Every conversion between the `deadbolt.v1` messages and the domain types
//! (deadbolt-spec's experiment spec, deadbolt-store's rows), in one file.
//!
//! Incoming specs are validated here, at the edge: a bad value becomes
//! INVALID_ARGUMENT with a `google.rpc.BadRequest` field violation naming
//! the dotted field under `spec.` (e.g. `spec.attack.rate`).

use std::path::PathBuf;

use deadbolt_proto::v1 as pb;
use deadbolt_proto::validate::invalid_argument;
use deadbolt_spec as spec;
use deadbolt_store as store;
use tonic::Status;

/// Field path prefix of the spec in requests.
pub const SPEC: &str = "spec";

fn bad(field: &str, msg: impl Into<String>) -> Status {
    invalid_argument(format!("{SPEC}.{field}"), msg)
}

/// A spec error at the edge: INVALID_ARGUMENT naming `spec.<field>`.
struct SpecError<'a>(&'a spec::Error);

impl std::fmt::Display for SpecError<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            spec::Error::Invalid { message, .. } => f.write_str(message),
            spec::Error::Spec(m) => f.write_str(m),
            other => write!(f, "{other}"),
        }
    }
}

impl deadbolt_proto::ServiceError for SpecError<'_> {
    fn code(&self) -> tonic::Code {
        tonic::Code::InvalidArgument
    }
    fn field(&self) -> Option<String> {
        Some(match self.0 {
            spec::Error::Invalid { field, .. } => format!("{SPEC}.{field}"),
            _ => SPEC.to_string(),
        })
    }
}

/// A spec error as INVALID_ARGUMENT naming `spec.<field>`.
pub fn spec_error_status(e: &spec::Error) -> Status {
    deadbolt_proto::status(&SpecError(e))
}

fn enum_of<E: TryFrom<i32>>(field: &str, v: i32) -> Result<E, Status> {
    E::try_from(v).map_err(|_| bad(field, format!("unknown enum value {v}")))
}

fn opt_path(s: &str) -> Option<PathBuf> {
    (!s.trim().is_empty()).then(|| PathBuf::from(s))
}

/// The spec of a submit request: structured or TOML, validated.
pub fn spec_from_submit(
    s: Option<&pb::submit_experiment_request::Spec>,
) -> Result<spec::ExperimentSpec, Status> {
    use pb::submit_experiment_request::Spec;
    match s {
        None => Err(invalid_argument(
            SPEC,
            "is required (structured or spec_toml)",
        )),
        Some(Spec::Structured(p)) => spec_from_proto(p),
        Some(Spec::SpecToml(t)) => {
            spec::ExperimentSpec::from_toml_str(t).map_err(|e| spec_error_status(&e))
        }
    }
}

/// proto -> spec, then [`spec::ExperimentSpec::validate`].
pub fn spec_from_proto(p: &pb::ExperimentSpec) -> Result<spec::ExperimentSpec, Status> {
    let d = p.dataset.clone().unwrap_or_default();
    let kind = match enum_of::<pb::DatasetKind>("dataset.kind", d.kind)? {
        pb::DatasetKind::Unspecified | pb::DatasetKind::Mnist => spec::DatasetKind::Mnist,
        pb::DatasetKind::Cifar10 => spec::DatasetKind::Cifar10,
        pb::DatasetKind::FashionMnist => spec::DatasetKind::FashionMnist,
    };
    let dataset = spec::DatasetSpec {
        kind,
        path: opt_path(&d.path),
        validation_fraction: d.validation_fraction.unwrap_or(0.1),
        train_limit: d.train_limit as usize,
        test_limit: d.test_limit as usize,
        sha256: Default::default(),
    };
    let arch = match enum_of::<pb::Arch>(
        "model.arch",
        p.model.as_ref().map(|m| m.arch).unwrap_or_default(),
    )? {
        pb::Arch::Unspecified | pb::Arch::BadnetCnn => spec::Arch::BadnetCnn,
        pb::Arch::PreactResnet18 => spec::Arch::PreactResnet18,
        pb::Arch::Resnet18 => spec::Arch::Resnet18,
    };
    let attack = p.attack.as_ref().map(attack_from_proto).transpose()?;
    let t = p.training.unwrap_or_default();
    let dt = spec::TrainingSpec::default();
    let training = spec::TrainingSpec {
        optimizer: match enum_of::<pb::Optimizer>("training.optimizer", t.optimizer)? {
            pb::Optimizer::Unspecified | pb::Optimizer::Sgd => spec::OptimizerKind::Sgd,
            pb::Optimizer::Adam => spec::OptimizerKind::Adam,
        },
        lr: t.lr.unwrap_or(dt.lr),
        momentum: t.momentum.unwrap_or(dt.momentum),
        weight_decay: t.weight_decay,
        schedule: match enum_of::<pb::Schedule>("training.schedule", t.schedule)? {
            pb::Schedule::Unspecified => dt.schedule,
            pb::Schedule::Constant => spec::Schedule::Constant,
            pb::Schedule::Cosine => spec::Schedule::Cosine,
            pb::Schedule::Step => spec::Schedule::Step,
        },
        step_size: t.step_size.map(|v| v as usize).unwrap_or(dt.step_size),
        gamma: t.gamma.unwrap_or(dt.gamma),
        epochs: t.epochs.map(|v| v as usize).unwrap_or(dt.epochs),
        batch_size: t.batch_size.map(|v| v as usize).unwrap_or(dt.batch_size),
        device: match enum_of::<pb::Device>("training.device", t.device)? {
            pb::Device::Unspecified | pb::Device::Auto => spec::DeviceSpec::Auto,
            pb::Device::Cpu => spec::DeviceSpec::Cpu,
            pb::Device::Cuda => spec::DeviceSpec::Cuda,
        },
        threads: t.threads as usize,
    };
    let f = p.defense.clone().unwrap_or_default();
    let dd = spec::DefenseSpec::default();
    let criteria = if f.criteria.is_empty() {
        dd.criteria.clone()
    } else {
        f.criteria
            .iter()
            .map(|c| criterion_from_proto("defense.criteria", *c))
            .collect::<Result<Vec<_>, _>>()?
    };
    let s = f.synthetic.unwrap_or_default();
    let ds = spec::SyntheticSpec::default();
    let defense = spec::DefenseSpec {
        layer: f.layer.clone().filter(|l| !l.is_empty()),
        criteria,
        target_asr: f.target_asr.unwrap_or(dd.target_asr),
        max_acc_drop: f.max_acc_drop.unwrap_or(dd.max_acc_drop),
        fine_tune_epochs: f.fine_tune_epochs as usize,
        stats_images: f
            .stats_images
            .map(|v| v as usize)
            .unwrap_or(dd.stats_images),
        seed: f.seed,
        synthetic: spec::SyntheticSpec {
            steps: s.steps.map(|v| v as usize).unwrap_or(ds.steps),
            images: s.images.map(|v| v as usize).unwrap_or(ds.images),
            lr: s.lr.unwrap_or(ds.lr),
            lambda: s.lambda.unwrap_or(ds.lambda),
            anomaly_threshold: s.anomaly_threshold.unwrap_or(ds.anomaly_threshold),
        },
        use_real_trigger: f.use_real_trigger.unwrap_or(dd.use_real_trigger),
    };
    let out = spec::ExperimentSpec {
        name: if p.name.trim().is_empty() {
            "experiment".into()
        } else {
            p.name.clone()
        },
        seed: p.seed,
        dataset,
        model: spec::ModelSpec { arch },
        attack,
        training,
        defense,
    };
    out.validate().map_err(|e| spec_error_status(&e))?;
    Ok(out)
}

/// A criterion enum value (UNSPECIFIED is refused).
pub fn criterion_from_proto(field: &str, v: i32) -> Result<spec::Criterion, Status> {
    Ok(match enum_of::<pb::Criterion>(field, v)? {
        pb::Criterion::Unspecified => return Err(bad(field, "criterion is unspecified")),
        pb::Criterion::Linf => spec::Criterion::Linf,
        pb::Criterion::L1 => spec::Criterion::L1,
        pb::Criterion::L2 => spec::Criterion::L2,
        pb::Criterion::LinfDiff => spec::Criterion::LinfDiff,
        pb::Criterion::FinePruning => spec::Criterion::FinePruning,
        pb::Criterion::Random => spec::Criterion::Random,
    })
}

pub fn criterion_to_proto(c: spec::Criterion) -> pb::Criterion {
    match c {
        spec::Criterion::Linf => pb::Criterion::Linf,
        spec::Criterion::L1 => pb::Criterion::L1,
        spec::Criterion::L2 => pb::Criterion::L2,
        spec::Criterion::LinfDiff => pb::Criterion::LinfDiff,
        spec::Criterion::FinePruning => pb::Criterion::FinePruning,
        spec::Criterion::Random => pb::Criterion::Random,
    }
}

/// `[attack]`: proto -> spec (validated by the caller through the spec).
pub fn attack_from_proto(a: &pb::AttackSpec) -> Result<spec::AttackSpec, Status> {
    use pb::attack_spec::Trigger;
    let trigger = match &a.trigger {
        None => {
            return Err(bad(
                "attack.trigger",
                "is required (patch, blend, sig or wanet)",
            ))
        }
        Some(Trigger::Patch(p)) => {
            let position = match &p.position {
                None => spec::PatchPosition::default(),
                Some(pb::patch_trigger::Position::At(rc)) => spec::PatchPosition::At {
                    row: rc.row,
                    col: rc.col,
                },
                Some(pb::patch_trigger::Position::Corner(c)) => spec::PatchPosition::Corner(
                    match enum_of::<pb::Corner>("attack.trigger.position", *c)? {
                        pb::Corner::Unspecified | pb::Corner::BottomRight => {
                            spec::Corner::BottomRight
                        }
                        pb::Corner::TopLeft => spec::Corner::TopLeft,
                        pb::Corner::TopRight => spec::Corner::TopRight,
                        pb::Corner::BottomLeft => spec::Corner::BottomLeft,
                    },
                ),
            };
            let pattern = match &p.pattern {
                None => spec::PatchPattern::Solid,
                Some(pb::patch_trigger::Pattern::ImageUri(u)) => {
                    spec::PatchPattern::Image(PathBuf::from(u))
                }
                Some(pb::patch_trigger::Pattern::Kind(k)) => {
                    match enum_of::<pb::PatchPattern>("attack.trigger.pattern", *k)? {
                        pb::PatchPattern::Unspecified | pb::PatchPattern::Solid => {
                            spec::PatchPattern::Solid
                        }
                        pb::PatchPattern::Checkerboard => spec::PatchPattern::Checkerboard,
                    }
                }
            };
            spec::TriggerSpec::Patch {
                size: p.size,
                position,
                pattern,
                value: p.value.unwrap_or(1.0),
            }
        }
        Some(Trigger::Blend(b)) => spec::TriggerSpec::Blend {
            alpha: b.alpha,
            pattern: match &b.pattern {
                None => spec::BlendPattern::default(),
                Some(pb::blend_trigger::Pattern::NoiseSeed(s)) => {
                    spec::BlendPattern::Noise { seed: *s }
                }
                Some(pb::blend_trigger::Pattern::ImageUri(u)) => {
                    spec::BlendPattern::Image(PathBuf::from(u))
                }
            },
        },
        Some(Trigger::Sig(t)) => spec::TriggerSpec::Sig {
            delta: t.delta.unwrap_or_else(spec::sig_delta),
            test_delta: t.test_delta,
            frequency: t.frequency.unwrap_or_else(spec::sig_frequency),
        },
        Some(Trigger::Wanet(t)) => spec::TriggerSpec::Wanet {
            k: t.k.unwrap_or_else(spec::wanet_k),
            s: t.s.unwrap_or_else(spec::wanet_s),
            grid_rescale: t.grid_rescale.unwrap_or(1.0),
            cross_ratio: t.cross_ratio.unwrap_or_else(spec::wanet_cross_ratio),
            seed: t.seed,
        },
    };
    let target_mode = match enum_of::<pb::TargetMode>("attack.target_mode", a.target_mode)? {
        pb::TargetMode::Unspecified | pb::TargetMode::AllToOne => spec::TargetMode::AllToOne,
        pb::TargetMode::AllToAll => spec::TargetMode::AllToAll,
    };
    Ok(spec::AttackSpec {
        trigger,
        target_mode,
        target: a.target,
        rate: a.rate,
        seed: a.seed,
    })
}

/// `[attack]`: spec -> proto.
pub fn attack_to_proto(a: &spec::AttackSpec) -> pb::AttackSpec {
    use pb::attack_spec::Trigger;
    let trigger = match &a.trigger {
        spec::TriggerSpec::Patch {
            size,
            position,
            pattern,
            value,
        } => Trigger::Patch(pb::PatchTrigger {
            size: *size,
            position: Some(match position {
                spec::PatchPosition::At { row, col } => {
                    pb::patch_trigger::Position::At(pb::RowCol {
                        row: *row,
                        col: *col,
                    })
                }
                spec::PatchPosition::Corner(c) => pb::patch_trigger::Position::Corner(match c {
                    spec::Corner::TopLeft => pb::Corner::TopLeft,
                    spec::Corner::TopRight => pb::Corner::TopRight,
                    spec::Corner::BottomLeft => pb::Corner::BottomLeft,
                    spec::Corner::BottomRight => pb::Corner::BottomRight,
                }
                    as i32),
            }),
            pattern: Some(match pattern {
                spec::PatchPattern::Solid => {
                    pb::patch_trigger::Pattern::Kind(pb::PatchPattern::Solid as i32)
                }
                spec::PatchPattern::Checkerboard => {
                    pb::patch_trigger::Pattern::Kind(pb::PatchPattern::Checkerboard as i32)
                }
                spec::PatchPattern::Image(p) => {
                    pb::patch_trigger::Pattern::ImageUri(p.display().to_string())
                }
            }),
            value: Some(*value),
        }),
        spec::TriggerSpec::Blend { alpha, pattern } => Trigger::Blend(pb::BlendTrigger {
            alpha: *alpha,
            pattern: Some(match pattern {
                spec::BlendPattern::Noise { seed } => pb::blend_trigger::Pattern::NoiseSeed(*seed),
                spec::BlendPattern::Image(p) => {
                    pb::blend_trigger::Pattern::ImageUri(p.display().to_string())
                }
            }),
        }),
        spec::TriggerSpec::Sig {
            delta,
            test_delta,
            frequency,
        } => Trigger::Sig(pb::SigTrigger {
            delta: Some(*delta),
            test_delta: *test_delta,
            frequency: Some(*frequency),
        }),
        spec::TriggerSpec::Wanet {
            k,
            s,
            grid_rescale,
            cross_ratio,
            seed,
        } => Trigger::Wanet(pb::WanetTrigger {
            k: Some(*k),
            s: Some(*s),
            grid_rescale: Some(*grid_rescale),
            cross_ratio: Some(*cross_ratio),
            seed: *seed,
        }),
    };
    pb::AttackSpec {
        trigger: Some(trigger),
        target_mode: match a.target_mode {
            spec::TargetMode::AllToOne => pb::TargetMode::AllToOne,
            spec::TargetMode::AllToAll => pb::TargetMode::AllToAll,
        } as i32,
        target: a.target,
        rate: a.rate,
        seed: a.seed,
    }
}

pub fn model_to_proto(m: &spec::ModelSpec) -> pb::ModelSpec {
    pb::ModelSpec {
        arch: match m.arch {
            spec::Arch::BadnetCnn => pb::Arch::BadnetCnn,
            spec::Arch::PreactResnet18 => pb::Arch::PreactResnet18,
            spec::Arch::Resnet18 => pb::Arch::Resnet18,
        } as i32,
    }
}

pub fn training_to_proto(t: &spec::TrainingSpec) -> pb::TrainingSpec {
    pb::TrainingSpec {
        optimizer: match t.optimizer {
            spec::OptimizerKind::Sgd => pb::Optimizer::Sgd,
            spec::OptimizerKind::Adam => pb::Optimizer::Adam,
        } as i32,
        lr: Some(t.lr),
        momentum: Some(t.momentum),
        weight_decay: t.weight_decay,
        schedule: match t.schedule {
            spec::Schedule::Constant => pb::Schedule::Constant,
            spec::Schedule::Cosine => pb::Schedule::Cosine,
            spec::Schedule::Step => pb::Schedule::Step,
        } as i32,
        step_size: Some(t.step_size as u32),
        gamma: Some(t.gamma),
        epochs: Some(t.epochs as u32),
        batch_size: Some(t.batch_size as u32),
        device: match t.device {
            spec::DeviceSpec::Auto => pb::Device::Auto,
            spec::DeviceSpec::Cpu => pb::Device::Cpu,
            spec::DeviceSpec::Cuda => pb::Device::Cuda,
        } as i32,
        threads: t.threads as u32,
    }
}

pub fn dataset_to_proto(d: &spec::DatasetSpec) -> pb::DatasetSpec {
    pb::DatasetSpec {
        kind: dataset_kind_to_proto(d.kind) as i32,
        path: d
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        validation_fraction: Some(d.validation_fraction),
        train_limit: d.train_limit as u64,
        test_limit: d.test_limit as u64,
    }
}

fn dataset_kind_to_proto(k: spec::DatasetKind) -> pb::DatasetKind {
    match k {
        spec::DatasetKind::Mnist => pb::DatasetKind::Mnist,
        spec::DatasetKind::Cifar10 => pb::DatasetKind::Cifar10,
        spec::DatasetKind::FashionMnist => pb::DatasetKind::FashionMnist,
    }
}

/// The base dataset of a spec, as a stage request's [`pb::DatasetRef`].
pub fn dataset_ref(d: &spec::DatasetSpec) -> pb::DatasetRef {
    pb::DatasetRef {
        kind: dataset_kind_to_proto(d.kind) as i32,
        source: d
            .path
            .as_ref()
            .map(|p| pb::dataset_ref::Source::Uri(p.display().to_string())),
        validation_fraction: Some(d.validation_fraction),
        train_limit: d.train_limit as u64,
        test_limit: d.test_limit as u64,
    }
}

/// A dataset built by the poisoner, as a [`pb::DatasetRef`].
pub fn dataset_artifact_ref(d: &spec::DatasetSpec, r: &store::ArtifactRef) -> pb::DatasetRef {
    pb::DatasetRef {
        source: Some(pb::dataset_ref::Source::Artifact(artifact_to_proto(r))),
        ..dataset_ref(d)
    }
}

/// spec -> proto (the inverse of [`spec_from_proto`]).
pub fn spec_to_proto(s: &spec::ExperimentSpec) -> pb::ExperimentSpec {
    let f = &s.defense;
    pb::ExperimentSpec {
        name: s.name.clone(),
        seed: s.seed,
        dataset: Some(dataset_to_proto(&s.dataset)),
        model: Some(model_to_proto(&s.model)),
        attack: s.attack.as_ref().map(attack_to_proto),
        training: Some(training_to_proto(&s.training)),
        defense: Some(pb::DefenseSpec {
            layer: f.layer.clone(),
            criteria: f
                .criteria
                .iter()
                .map(|c| criterion_to_proto(*c) as i32)
                .collect(),
            target_asr: Some(f.target_asr),
            max_acc_drop: Some(f.max_acc_drop),
            fine_tune_epochs: f.fine_tune_epochs as u32,
            stats_images: Some(f.stats_images as u32),
            seed: f.seed,
            synthetic: Some(pb::SyntheticSpec {
                steps: Some(f.synthetic.steps as u32),
                images: Some(f.synthetic.images as u32),
                lr: Some(f.synthetic.lr),
                lambda: Some(f.synthetic.lambda),
                anomaly_threshold: Some(f.synthetic.anomaly_threshold),
            }),
            use_real_trigger: Some(f.use_real_trigger),
        }),
    }
}

// ---- store <-> proto ----

pub fn artifact_to_proto(r: &store::ArtifactRef) -> pb::ArtifactRef {
    pb::ArtifactRef {
        uri: r.uri.clone(),
        sha256: r.sha256.clone(),
        size: r.size,
    }
}

pub fn curve_point_to_proto(p: &store::CurvePoint) -> pb::CurvePoint {
    pb::CurvePoint {
        k: p.k.max(0) as u32,
        acc: p.acc,
        asr: p.asr,
        ra: p.ra,
    }
}

pub fn run_status_to_proto(s: store::RunStatus) -> pb::JobStatus {
    match s {
        store::RunStatus::Queued => pb::JobStatus::Queued,
        store::RunStatus::Running => pb::JobStatus::Running,
        store::RunStatus::Succeeded => pb::JobStatus::Succeeded,
        store::RunStatus::Failed => pb::JobStatus::Failed,
        store::RunStatus::Cancelled => pb::JobStatus::Cancelled,
    }
}

pub fn job_status_to_proto(s: store::JobStatus) -> pb::JobStatus {
    match s {
        store::JobStatus::Queued => pb::JobStatus::Queued,
        store::JobStatus::Leased => pb::JobStatus::Running,
        store::JobStatus::Succeeded => pb::JobStatus::Succeeded,
        store::JobStatus::Failed => pb::JobStatus::Failed,
        store::JobStatus::Cancelled => pb::JobStatus::Cancelled,
    }
}

pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn event_to_proto(e: &store::RunEvent, status: store::RunStatus) -> pb::RunEvent {
    pb::RunEvent {
        seq: e.seq,
        stage: e.stage.clone(),
        kind: e.kind.clone(),
        message: e.message.clone(),
        progress: e.progress,
        status: run_status_to_proto(status) as i32,
        time: Some(timestamp(e.created_at)),
    }
}

pub fn stage_to_proto(j: &store::Job) -> pb::StageStatus {
    pb::StageStatus {
        stage: j.stage.clone(),
        status: job_status_to_proto(j.status) as i32,
        attempts: j.attempts.max(0) as u32,
        error: j
            .error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default(),
        progress: j.progress,
        error_code: j.error.as_ref().map(|e| e.code.clone()).unwrap_or_default(),
        error_field: j
            .error
            .as_ref()
            .and_then(|e| e.field.clone())
            .unwrap_or_default(),
    }
}

/// A run with its figures, artifacts and stages.
pub fn run_to_proto(
    r: &store::Run,
    summary: Option<&store::RunSummary>,
    choices: &[store::PruningChoice],
    artifacts: &[store::ArtifactRecord],
    jobs: &[store::Job],
) -> pb::Run {
    pb::Run {
        id: r.id.to_string(),
        name: r.name.clone(),
        status: run_status_to_proto(r.status) as i32,
        error: r.error.clone().unwrap_or_default(),
        created_at: Some(timestamp(r.created_at)),
        updated_at: Some(timestamp(r.updated_at)),
        figures: Some(pb::RunFigures {
            clean_acc: summary.and_then(|s| s.clean_acc),
            backdoored_acc: summary.and_then(|s| s.backdoored_acc),
            backdoored_asr: summary.and_then(|s| s.backdoored_asr),
            choices: choices
                .iter()
                .map(|c| pb::CriterionChoice {
                    criterion: c
                        .criterion
                        .parse::<spec::Criterion>()
                        .map(|c| criterion_to_proto(c) as i32)
                        .unwrap_or_default(),
                    chosen: Some(curve_point_to_proto(&c.point)),
                })
                .collect(),
        }),
        artifacts: artifacts
            .iter()
            .map(|a| pb::Artifact {
                name: a.name.clone(),
                r#ref: Some(pb::ArtifactRef {
                    uri: a.uri.clone(),
                    sha256: a.sha256.clone(),
                    size: a.size,
                }),
                content_type: a.content_type.clone().unwrap_or_default(),
            })
            .collect(),
        stages: jobs.iter().map(stage_to_proto).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deadbolt_proto::validate::field_violations;

    const TOML: &str = r#"
name = "t"
seed = 3
[dataset]
kind = "mnist"
train_limit = 100
[attack]
target = 2
rate = 0.2
[attack.trigger]
kind = "patch"
size = 3
[training]
epochs = 2
schedule = "constant"
[defense]
criteria = ["linf", "random"]
stats_images = 50
[defense.synthetic]
steps = 5
"#;

    #[test]
    fn spec_round_trips_through_proto() {
        let s = spec::ExperimentSpec::from_toml_str(TOML).unwrap();
        let p = spec_to_proto(&s);
        assert_eq!(spec_from_proto(&p).unwrap(), s);
        // An empty message is the default spec.
        let d = spec_from_proto(&pb::ExperimentSpec::default()).unwrap();
        assert_eq!(d.training, spec::TrainingSpec::default());
        assert_eq!(d.defense, spec::DefenseSpec::default());
        assert!(d.attack.is_none());
    }

    fn field(s: Status) -> String {
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        field_violations(&s).remove(0).0
    }

    #[test]
    fn bad_values_name_the_field() {
        let mut p = spec_to_proto(&spec::ExperimentSpec::from_toml_str(TOML).unwrap());
        p.attack.as_mut().unwrap().rate = 1.5;
        assert_eq!(field(spec_from_proto(&p).unwrap_err()), "spec.attack.rate");
        p.attack.as_mut().unwrap().rate = 0.1;
        p.training.as_mut().unwrap().lr = Some(-1.0);
        assert_eq!(field(spec_from_proto(&p).unwrap_err()), "spec.training.lr");
        p.training.as_mut().unwrap().lr = Some(0.1);
        p.defense.as_mut().unwrap().criteria = vec![99];
        assert_eq!(
            field(spec_from_proto(&p).unwrap_err()),
            "spec.defense.criteria"
        );
        p.defense.as_mut().unwrap().criteria = vec![];
        p.attack.as_mut().unwrap().trigger = None;
        assert_eq!(
            field(spec_from_proto(&p).unwrap_err()),
            "spec.attack.trigger"
        );
        let toml =
            pb::submit_experiment_request::Spec::SpecToml(TOML.replace("rate = 0.2", "rate = 2.0"));
        assert_eq!(
            field(spec_from_submit(Some(&toml)).unwrap_err()),
            "spec.attack.rate"
        );
        assert_eq!(field(spec_from_submit(None).unwrap_err()), "spec");
    }
}
