//! Experiment specifications: the TOML files users write (`examples/*.toml`).
//! A crate of its own so that services which only validate specs (the
//! gateway) do not link libtorch.
//!
//! Every struct denies unknown keys, and [`ExperimentSpec::validate`] checks
//! values, so a bad spec is rejected with the name of the offending key.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub mod byom;
pub mod error;
pub mod memory;
pub mod run;

pub use error::{Error, Result};
pub use run::{DataSplit, RunKind, RunSpec, ScanSpec, StageKind};

/// A whole experiment: data, model, attack, training and defense.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    /// Human-readable name of the experiment.
    #[serde(default = "default_name")]
    pub name: String,
    /// Master seed (data split, model init, batch order).
    #[serde(default)]
    pub seed: u64,
    pub dataset: DatasetSpec,
    #[serde(default)]
    pub model: ModelSpec,
    /// The attack to plant; absent for a clean-only training spec.
    #[serde(default)]
    pub attack: Option<AttackSpec>,
    #[serde(default)]
    pub training: TrainingSpec,
    #[serde(default)]
    pub defense: DefenseSpec,
}

fn default_name() -> String {
    "experiment".into()
}

/// Where the images come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    pub kind: DatasetKind,
    /// Folder of the data, read as given (nothing is written into it). For
    /// `mnist` it holds the four IDX files, plain or gzipped (`deadbolt data
    /// fetch-mnist` writes them); without a path, `<data dir>/mnist`, which
    /// is fetched when missing. For `fashion-mnist` the four gzipped IDX
    /// files (default: Debian's `/usr/share/datasets/fashion-mnist`). For
    /// `cifar10` the binary batches. Relative
    /// paths are relative to the working dir.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Share of the training split held out as validation data (used by the
    /// defense to choose its operating point without seeing the test set).
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Use only the first N training images (after shuffling); 0 = all.
    #[serde(default)]
    pub train_limit: usize,
    /// Use only the first N test images; 0 = all.
    #[serde(default)]
    pub test_limit: usize,
    /// Expected sha256 (lowercase hex) of files of the folder, by file
    /// name: each is checked before the data is read, and a mismatch fails
    /// the run naming the file. Operators pin the datasets they offer this
    /// way (`[datasets.<name>] sha256 = { ... }`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub sha256: std::collections::BTreeMap<String, String>,
}

fn default_validation_fraction() -> f64 {
    0.1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// MNIST in IDX files (`train-images-idx3-ubyte[.gz]`, ...).
    Mnist,
    /// CIFAR-10 binary batches (`data_batch_*.bin`, `test_batch.bin`).
    Cifar10,
    /// Fashion-MNIST (Zalando, MIT): the four gzipped IDX files of
    /// Debian's `dataset-fashion-mnist` (`scripts/setup.sh` installs it in
    /// `/usr/share/datasets/fashion-mnist`), 60,000 train and 10,000 test
    /// images of 28x28, 10 classes; each file is checked against its
    /// pinned sha256 before it is read.
    FashionMnist,
}

impl DatasetKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            DatasetKind::Mnist => "mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::FashionMnist => "fashion-mnist",
        }
    }
}

impl std::str::FromStr for DatasetKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        [
            DatasetKind::Mnist,
            DatasetKind::Cifar10,
            DatasetKind::FashionMnist,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| {
            Error::invalid(
                "dataset.kind",
                format!("unknown dataset kind {s:?} (expected mnist, cifar10 or fashion-mnist)"),
            )
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(default = "default_arch")]
    pub arch: Arch,
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            arch: default_arch(),
        }
    }
}

fn default_arch() -> Arch {
    Arch::BadnetCnn
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    BadnetCnn,
    #[serde(rename = "preact-resnet18")]
    PreactResnet18,
    /// torchvision's `resnet18` (its parameter names).
    Resnet18,
}

impl Arch {
    pub fn as_str(&self) -> &'static str {
        match self {
            Arch::BadnetCnn => "badnet-cnn",
            Arch::PreactResnet18 => "preact-resnet18",
            Arch::Resnet18 => "resnet18",
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "badnet-cnn" => Ok(Arch::BadnetCnn),
            "preact-resnet18" => Ok(Arch::PreactResnet18),
            "resnet18" => Ok(Arch::Resnet18),
            other => Err(Error::invalid(
                "model.arch",
                format!("unknown architecture {other:?} (expected badnet-cnn, preact-resnet18 or resnet18)"),
            )),
        }
    }
}

/// A trigger plus a poisoning recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttackSpec {
    pub trigger: TriggerSpec,
    #[serde(default)]
    pub target_mode: TargetMode,
    /// Target label for all-to-one.
    #[serde(default)]
    pub target: i64,
    /// Share of eligible training images that are poisoned, in [0, 1].
    pub rate: f64,
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetMode {
    #[default]
    AllToOne,
    AllToAll,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TriggerSpec {
    /// BadNets patch.
    Patch {
        /// Side of the square patch in pixels.
        size: i64,
        #[serde(default)]
        position: PatchPosition,
        #[serde(default)]
        pattern: PatchPattern,
        /// Pixel value of a solid patch (and the light squares of a checkerboard).
        #[serde(default = "one")]
        value: f64,
    },
    /// Blended trigger: x' = (1 - alpha) x + alpha pattern.
    Blend {
        alpha: f64,
        #[serde(default)]
        pattern: BlendPattern,
    },
    /// SIG (Barni, Kallas, Tondi 2019), clean-label: a horizontal sinusoid
    /// `v(i, j) = delta * sin(2 pi j frequency / width)` added to the image
    /// and clipped to [0, 1]. Only target-class training images are
    /// poisoned and they keep their labels (`rate` is the share of the
    /// target class); at test time the signal, of amplitude `test_delta`,
    /// is added to the other classes' images. All-to-one only.
    Sig {
        /// Amplitude on the poisoned training images (pixel scale [0, 1]).
        #[serde(default = "sig_delta")]
        delta: f64,
        /// Amplitude at test time; unset = `delta`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        test_delta: Option<f64>,
        /// Periods across the image width (the paper's f = 6).
        #[serde(default = "sig_frequency")]
        frequency: f64,
    },
    /// WaNet (Nguyen & Tran, ICLR 2021): a fixed, smooth random warp. A
    /// `k` x `k` grid of uniform [-1, 1] offsets (normalised by their mean
    /// absolute value, seeded by `seed`) is upsampled bicubically to the
    /// image, scaled by `s / side`, added to the identity sampling grid,
    /// times `grid_rescale`, clamped to the image, and applied with
    /// bilinear `grid_sample`. Noise mode: `cross_ratio` times as many
    /// further training images as are poisoned are warped with the field
    /// plus per-pixel random noise and keep their labels, so the model
    /// learns this exact warp, not warps in general.
    Wanet {
        /// Side of the control grid (the paper's k = 4).
        #[serde(default = "wanet_k")]
        k: i64,
        /// Strength of the warp (the paper's s = 0.5).
        #[serde(default = "wanet_s")]
        s: f64,
        /// Scale of the warped grid (the paper's 1).
        #[serde(default = "one")]
        grid_rescale: f64,
        /// Noise-mode images per poisoned image (the paper's 2; 0 = off).
        #[serde(default = "wanet_cross_ratio")]
        cross_ratio: f64,
        /// Seed of the warping field.
        #[serde(default)]
        seed: u64,
    },
}

fn one() -> f64 {
    1.0
}
/// 20/255 (Barni et al.'s training amplitude on 8-bit pixels).
pub fn sig_delta() -> f64 {
    20.0 / 255.0
}
pub fn sig_frequency() -> f64 {
    6.0
}
pub fn wanet_k() -> i64 {
    4
}
pub fn wanet_s() -> f64 {
    0.5
}
pub fn wanet_cross_ratio() -> f64 {
    2.0
}

impl TriggerSpec {
    /// The trigger's `kind` as written in a spec.
    pub fn kind_str(&self) -> &'static str {
        match self {
            TriggerSpec::Patch { .. } => "patch",
            TriggerSpec::Blend { .. } => "blend",
            TriggerSpec::Sig { .. } => "sig",
            TriggerSpec::Wanet { .. } => "wanet",
        }
    }

    /// Whether poisoning keeps the labels (clean-label: only target-class
    /// images are poisoned).
    pub fn clean_label(&self) -> bool {
        matches!(self, TriggerSpec::Sig { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PatchPosition {
    Corner(Corner),
    At { row: i64, col: i64 },
}

impl Default for PatchPosition {
    fn default() -> Self {
        PatchPosition::Corner(Corner::BottomRight)
    }
}

impl PatchPosition {
    /// Top-left pixel of a `size` patch in an `h` x `w` image (saturating:
    /// a nonsensical size gives a position the fit check refuses).
    pub fn top_left(&self, size: i64, h: i64, w: i64) -> (i64, i64) {
        match self {
            PatchPosition::At { row, col } => (*row, *col),
            PatchPosition::Corner(Corner::TopLeft) => (0, 0),
            PatchPosition::Corner(Corner::TopRight) => (0, w.saturating_sub(size)),
            PatchPosition::Corner(Corner::BottomLeft) => (h.saturating_sub(size), 0),
            PatchPosition::Corner(Corner::BottomRight) => {
                (h.saturating_sub(size), w.saturating_sub(size))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Corner {
    TopLeft,
    TopRight,
    BottomLeft,
    BottomRight,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PatchPattern {
    #[default]
    Solid,
    Checkerboard,
    /// A PNG file (grayscale or RGB), resized to the patch.
    Image(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlendPattern {
    /// Seeded uniform noise in [0, 1].
    Noise { seed: u64 },
    /// A PNG file, resized to the image.
    Image(PathBuf),
}

impl Default for BlendPattern {
    fn default() -> Self {
        BlendPattern::Noise { seed: 0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSpec {
    #[serde(default)]
    pub optimizer: OptimizerKind,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub schedule: Schedule,
    /// Step schedule: multiply the lr by `gamma` every `step_size` epochs.
    #[serde(default = "default_step_size")]
    pub step_size: usize,
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default)]
    pub device: DeviceSpec,
    /// CPU threads for libtorch; 0 keeps libtorch's default.
    #[serde(default)]
    pub threads: usize,
}

impl Default for TrainingSpec {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

fn default_lr() -> f64 {
    0.01
}
fn default_momentum() -> f64 {
    0.9
}
fn default_step_size() -> usize {
    10
}
fn default_gamma() -> f64 {
    0.1
}
fn default_epochs() -> usize {
    6
}
fn default_batch_size() -> usize {
    64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    #[default]
    Sgd,
    Adam,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    Constant,
    #[default]
    Cosine,
    Step,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl std::str::FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda),
            other => Err(Error::invalid(
                "device",
                format!("unknown device {other:?} (expected auto, cpu or cuda)"),
            )),
        }
    }
}

/// The defense: statistics, synthetic trigger, pruning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefenseSpec {
    /// Prunable layer; empty = the model's default.
    #[serde(default)]
    pub layer: Option<String>,
    #[serde(default = "default_criteria")]
    pub criteria: Vec<Criterion>,
    /// Chosen k: smallest k with validation ASR at or below this.
    #[serde(default = "default_target_asr")]
    pub target_asr: f64,
    /// ... subject to validation ACC dropping at most this much (fraction).
    #[serde(default = "default_max_acc_drop")]
    pub max_acc_drop: f64,
    /// Fine-tune the pruned model for this many epochs on clean validation data.
    #[serde(default)]
    pub fine_tune_epochs: usize,
    /// Images used to compute activation statistics (0 = the whole validation split).
    #[serde(default = "default_stats_images")]
    pub stats_images: usize,
    /// Seed for the `random` criterion.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub synthetic: SyntheticSpec,
    /// Use the real trigger (true: the defender knows it) or the synthetic one
    /// to make the triggered inputs that rank the channels. Both are reported.
    #[serde(default = "default_true")]
    pub use_real_trigger: bool,
}

impl Default for DefenseSpec {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

fn default_true() -> bool {
    true
}
fn default_criteria() -> Vec<Criterion> {
    Criterion::ALL.to_vec()
}
fn default_target_asr() -> f64 {
    0.05
}
fn default_max_acc_drop() -> f64 {
    0.02
}
fn default_stats_images() -> usize {
    500
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Criterion {
    Linf,
    L1,
    L2,
    LinfDiff,
    FinePruning,
    Random,
}

impl Criterion {
    pub const ALL: [Criterion; 6] = [
        Criterion::Linf,
        Criterion::L1,
        Criterion::L2,
        Criterion::LinfDiff,
        Criterion::FinePruning,
        Criterion::Random,
    ];
    pub fn as_str(&self) -> &'static str {
        match self {
            Criterion::Linf => "linf",
            Criterion::L1 => "l1",
            Criterion::L2 => "l2",
            Criterion::LinfDiff => "linf-diff",
            Criterion::FinePruning => "fine-pruning",
            Criterion::Random => "random",
        }
    }
}

impl std::str::FromStr for Criterion {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Criterion::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| Error::invalid("criterion", format!("unknown criterion {s:?}")))
    }
}

/// Neural Cleanse-style reverse engineering budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSpec {
    /// Optimisation steps per candidate label.
    #[serde(default = "default_nc_steps")]
    pub steps: usize,
    /// Clean images used for the optimisation.
    #[serde(default = "default_nc_images")]
    pub images: usize,
    #[serde(default = "default_nc_lr")]
    pub lr: f64,
    /// Weight of the L1 penalty on the mask.
    #[serde(default = "default_nc_lambda")]
    pub lambda: f64,
    /// Anomaly index above which a label is flagged.
    #[serde(default = "default_nc_threshold")]
    pub anomaly_threshold: f64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

fn default_nc_steps() -> usize {
    300
}
fn default_nc_images() -> usize {
    256
}
fn default_nc_lr() -> f64 {
    0.1
}
fn default_nc_lambda() -> f64 {
    0.01
}
fn default_nc_threshold() -> f64 {
    2.0
}

/// The dotted key (`table.key`) of the TOML line holding byte `offset` of
/// `text`, when that line is a `key = value` line (or a `[table]` header).
fn key_at(text: &str, offset: usize) -> Option<String> {
    let mut table = String::new();
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let end = start + line.len();
        let t = line.trim();
        if t.starts_with('[') {
            let name = t
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim();
            table = name.to_string();
            if (start..end).contains(&offset) {
                return (!table.is_empty()).then(|| table.clone());
            }
        } else if (start..end).contains(&offset) {
            let key = t.split('=').next()?.trim().trim_matches('"');
            if key.is_empty() || key.starts_with('#') || !t.contains('=') {
                return None;
            }
            return Some(if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}.{key}")
            });
        }
        start = end;
    }
    None
}

impl ExperimentSpec {
    /// Parses and validates a TOML spec; errors name the offending key.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let spec: ExperimentSpec = toml::from_str(text).map_err(|e| {
            // toml reports the span of the offending key/value: name the
            // dotted key there (`training.epochs`), else show the text
            let field = e.span().and_then(|s| key_at(text, s.start));
            match field {
                Some(field) => Error::Invalid {
                    field,
                    message: e.message().trim().to_string(),
                },
                None => {
                    let at = e
                        .span()
                        .map(|s| text.get(s).unwrap_or("").trim().to_string());
                    Error::Spec(match at {
                        Some(k) if !k.is_empty() => format!("{} (at `{k}`)", e.message()),
                        _ => e.message().to_string(),
                    })
                }
            }
        })?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        ExperimentSpec::from_toml_str(&text).map_err(|e| match e {
            Error::Spec(m) => Error::Spec(format!("{}: {m}", path.display())),
            Error::Invalid { field, message } => Error::Spec(format!(
                "{}: invalid value for `{field}`: {message}",
                path.display()
            )),
            other => other,
        })
    }

    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("spec serializes")
    }

    /// Checks values (ranges, sizes); errors name the key.
    pub fn validate(&self) -> Result<()> {
        let d = &self.dataset;
        if !(0.0..1.0).contains(&d.validation_fraction) {
            return Err(Error::invalid(
                "dataset.validation_fraction",
                "must be in [0, 1)",
            ));
        }
        if let Some(a) = &self.attack {
            a.validate()?;
        }
        let t = &self.training;
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(Error::invalid("training.lr", "must be a positive number"));
        }
        if !(0.0..1.0).contains(&t.momentum) {
            return Err(Error::invalid("training.momentum", "must be in [0, 1)"));
        }
        if t.weight_decay < 0.0 {
            return Err(Error::invalid("training.weight_decay", "must be >= 0"));
        }
        if t.epochs == 0 {
            return Err(Error::invalid("training.epochs", "must be >= 1"));
        }
        if t.batch_size == 0 {
            return Err(Error::invalid("training.batch_size", "must be >= 1"));
        }
        if t.schedule == Schedule::Step && (t.step_size == 0 || t.gamma <= 0.0) {
            return Err(Error::invalid(
                "training.step_size",
                "step schedule needs step_size >= 1 and gamma > 0",
            ));
        }
        let df = &self.defense;
        if !(0.0..=1.0).contains(&df.target_asr) {
            return Err(Error::invalid("defense.target_asr", "must be in [0, 1]"));
        }
        if !(0.0..=1.0).contains(&df.max_acc_drop) {
            return Err(Error::invalid("defense.max_acc_drop", "must be in [0, 1]"));
        }
        if df.criteria.is_empty() {
            return Err(Error::invalid("defense.criteria", "must name at least one"));
        }
        // each criterion at most once: the list is never longer than the
        // known criteria, whatever a client sends
        if df.criteria.len() > Criterion::ALL.len() {
            return Err(Error::invalid(
                "defense.criteria",
                format!(
                    "{} criteria given; there are {} (each may be listed once)",
                    df.criteria.len(),
                    Criterion::ALL.len()
                ),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(c) = df.criteria.iter().find(|c| !seen.insert(**c)) {
            return Err(Error::invalid(
                "defense.criteria",
                format!("{} is listed twice", c.as_str()),
            ));
        }
        let s = &df.synthetic;
        if s.steps == 0 || s.images == 0 {
            return Err(Error::invalid(
                "defense.synthetic.steps",
                "steps and images must be >= 1",
            ));
        }
        if !(s.lr > 0.0 && s.lr.is_finite()) {
            return Err(Error::invalid(
                "defense.synthetic.lr",
                "lr must be a finite number > 0",
            ));
        }
        if !(s.lambda >= 0.0 && s.lambda.is_finite()) {
            return Err(Error::invalid(
                "defense.synthetic.lambda",
                "lambda must be a finite number >= 0",
            ));
        }
        Ok(())
    }
}

impl AttackSpec {
    /// An attack from TOML: a whole spec with an `[attack]` table, a file
    /// with only the `[attack]` table, or the attack's keys at top level.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Only {
            attack: AttackSpec,
        }
        let value: toml::Table =
            toml::from_str(text).map_err(|e| Error::Spec(e.message().to_string()))?;
        let attack = if value.contains_key("dataset") {
            ExperimentSpec::from_toml_str(text)?
                .attack
                .ok_or_else(|| Error::invalid("attack", "the spec has no [attack] table"))?
        } else if value.contains_key("attack") {
            toml::from_str::<Only>(text)
                .map_err(|e| Error::Spec(e.message().to_string()))?
                .attack
        } else {
            toml::from_str::<AttackSpec>(text).map_err(|e| Error::Spec(e.message().to_string()))?
        };
        attack.validate()?;
        Ok(attack)
    }

    /// Checks the recipe on its own; [`AttackSpec::validate_for`] also checks
    /// it against an image size and class count.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.rate) || self.rate.is_nan() {
            return Err(Error::invalid(
                "attack.rate",
                format!("{} is outside [0, 1]", self.rate),
            ));
        }
        match &self.trigger {
            TriggerSpec::Patch {
                size,
                value,
                position,
                ..
            } => {
                if *size < 1 {
                    return Err(Error::invalid("attack.trigger.size", "must be >= 1"));
                }
                if let PatchPosition::At { row, col } = position {
                    // the patch's far edge must be a number: no position
                    // (i64::MAX) overflows the fit check
                    let fits = |v: i64| v >= 0 && v.checked_add(*size).is_some();
                    if !fits(*row) || !fits(*col) {
                        return Err(Error::invalid(
                            "attack.trigger.position",
                            format!("row {row}, col {col}: must be >= 0 and inside an image"),
                        ));
                    }
                }
                if !(0.0..=1.0).contains(value) {
                    return Err(Error::invalid("attack.trigger.value", "must be in [0, 1]"));
                }
            }
            TriggerSpec::Blend { alpha, .. } => {
                if !(0.0..=1.0).contains(alpha) || alpha.is_nan() {
                    return Err(Error::invalid("attack.trigger.alpha", "must be in [0, 1]"));
                }
            }
            TriggerSpec::Sig {
                delta,
                test_delta,
                frequency,
            } => {
                let amplitude = |field: &str, v: f64| {
                    if v > 0.0 && v <= 1.0 {
                        Ok(())
                    } else {
                        Err(Error::invalid(
                            field,
                            format!("{v} is outside (0, 1] (pixels are in [0, 1])"),
                        ))
                    }
                };
                amplitude("attack.trigger.delta", *delta)?;
                if let Some(t) = test_delta {
                    amplitude("attack.trigger.test_delta", *t)?;
                }
                if !(frequency.is_finite() && *frequency > 0.0) {
                    return Err(Error::invalid(
                        "attack.trigger.frequency",
                        "must be a finite number > 0",
                    ));
                }
                if self.target_mode != TargetMode::AllToOne {
                    return Err(Error::invalid(
                        "attack.target_mode",
                        "sig is a clean-label attack (poisoned images keep their label): all-to-one only",
                    ));
                }
            }
            TriggerSpec::Wanet {
                k,
                s,
                grid_rescale,
                cross_ratio,
                ..
            } => {
                if *k < 2 {
                    return Err(Error::invalid("attack.trigger.k", "must be >= 2"));
                }
                if !(s.is_finite() && *s > 0.0 && *s <= 64.0) {
                    return Err(Error::invalid("attack.trigger.s", "must be in (0, 64]"));
                }
                if !(grid_rescale.is_finite() && *grid_rescale > 0.0 && *grid_rescale <= 2.0) {
                    return Err(Error::invalid(
                        "attack.trigger.grid_rescale",
                        "must be in (0, 2]",
                    ));
                }
                if !(cross_ratio.is_finite() && *cross_ratio >= 0.0) {
                    return Err(Error::invalid(
                        "attack.trigger.cross_ratio",
                        "must be a finite number >= 0",
                    ));
                }
                if self.rate * (1.0 + cross_ratio) > 1.0 {
                    return Err(Error::invalid(
                        "attack.trigger.cross_ratio",
                        format!(
                            "rate {} x (1 + cross_ratio {cross_ratio}) is over 1: \
                             not enough images for the noise mode",
                            self.rate
                        ),
                    ));
                }
            }
        }
        if self.target < 0 {
            return Err(Error::invalid("attack.target", "must be >= 0"));
        }
        Ok(())
    }

    /// Checks the recipe against images of `h` x `w` pixels and `classes` labels.
    pub fn validate_for(&self, h: i64, w: i64, classes: i64) -> Result<()> {
        self.validate()?;
        if self.target_mode == TargetMode::AllToOne && self.target >= classes {
            return Err(Error::invalid(
                "attack.target",
                format!(
                    "{} is not a class (the dataset has {classes} classes)",
                    self.target
                ),
            ));
        }
        if let TriggerSpec::Sig { frequency, .. } = &self.trigger {
            // above w / 2 periods the sampled sinusoid aliases to a lower one
            if *frequency > w as f64 / 2.0 {
                return Err(Error::invalid(
                    "attack.trigger.frequency",
                    format!(
                        "{frequency} periods across a {w}-pixel row alias: at most {}",
                        w as f64 / 2.0
                    ),
                ));
            }
        }
        if let TriggerSpec::Wanet { k, .. } = &self.trigger {
            if *k > h || *k > w {
                return Err(Error::invalid(
                    "attack.trigger.k",
                    format!("a {k}x{k} control grid is finer than the {h}x{w} image"),
                ));
            }
        }
        if let TriggerSpec::Patch { size, position, .. } = &self.trigger {
            if *size > h || *size > w {
                return Err(Error::invalid(
                    "attack.trigger.size",
                    format!("a {size}x{size} patch is bigger than the {h}x{w} image"),
                ));
            }
            let (r, c) = position.top_left(*size, h, w);
            let past =
                |at: i64, side: i64| at < 0 || at.checked_add(*size).is_none_or(|e| e > side);
            if past(r, h) || past(c, w) {
                return Err(Error::invalid(
                    "attack.trigger.position",
                    format!("a {size}x{size} patch at row {r}, col {c} does not fit in the {h}x{w} image"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
        [dataset]
        kind = "mnist"
        [attack]
        rate = 0.1
        target = 0
        [attack.trigger]
        kind = "patch"
        size = 3
        position = "bottom-right"
    "#;

    #[test]
    fn parses_minimal_spec_with_defaults() {
        let s = ExperimentSpec::from_toml_str(MIN).unwrap();
        assert_eq!(s.model.arch, Arch::BadnetCnn);
        assert_eq!(s.training.epochs, 6);
        assert_eq!(s.defense.criteria.len(), 6);
        let a = s.attack.unwrap();
        assert_eq!(
            a.trigger,
            TriggerSpec::Patch {
                size: 3,
                position: PatchPosition::Corner(Corner::BottomRight),
                pattern: PatchPattern::Solid,
                value: 1.0
            }
        );
    }

    #[test]
    fn explicit_row_col_position() {
        let t = MIN.replace(
            "position = \"bottom-right\"",
            "position = { row = 2, col = 5 }",
        );
        let s = ExperimentSpec::from_toml_str(&t).unwrap();
        match s.attack.unwrap().trigger {
            TriggerSpec::Patch { position, .. } => {
                assert_eq!(position, PatchPosition::At { row: 2, col: 5 })
            }
            _ => panic!("expected patch"),
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let t = format!("{MIN}\n[training]\nepochz = 3\n");
        let e = ExperimentSpec::from_toml_str(&t).unwrap_err().to_string();
        assert!(e.contains("epochz"), "{e}");
    }

    #[test]
    fn wrong_value_is_named() {
        let t = MIN.replace("rate = 0.1", "rate = 1.5");
        let e = ExperimentSpec::from_toml_str(&t).unwrap_err().to_string();
        assert!(e.contains("attack.rate"), "{e}");
        let t = format!("{MIN}\n[training]\noptimizer = \"rmsprop\"\n");
        let e = ExperimentSpec::from_toml_str(&t).unwrap_err().to_string();
        assert!(e.contains("rmsprop"), "{e}");
    }

    #[test]
    fn trigger_bigger_than_image_and_bad_target_rejected() {
        let s = ExperimentSpec::from_toml_str(MIN).unwrap();
        let mut a = s.attack.unwrap();
        assert!(a.validate_for(28, 28, 10).is_ok());
        assert!(a
            .validate_for(2, 2, 10)
            .unwrap_err()
            .to_string()
            .contains("attack.trigger.size"));
        a.target = 10;
        assert!(a
            .validate_for(28, 28, 10)
            .unwrap_err()
            .to_string()
            .contains("attack.target"));
    }

    #[test]
    fn criteria_are_each_listed_at_most_once() {
        let field = |t: &str| match ExperimentSpec::from_toml_str(t) {
            Err(Error::Invalid { field, message }) => (field, message),
            other => panic!("{other:?}"),
        };
        let many = vec!["\"l1\""; 10_000].join(", ");
        let (f, m) = field(&format!("{MIN}\n[defense]\ncriteria = [{many}]\n"));
        assert_eq!(f, "defense.criteria");
        assert!(m.contains("10000"), "{m}");
        let (f, m) = field(&format!(
            "{MIN}\n[defense]\ncriteria = [\"l1\", \"linf\", \"l1\"]\n"
        ));
        assert_eq!(f, "defense.criteria");
        assert!(m.contains("l1 is listed twice"), "{m}");
        let all = Criterion::ALL
            .map(|c| format!("{:?}", c.as_str()))
            .join(", ");
        ExperimentSpec::from_toml_str(&format!("{MIN}\n[defense]\ncriteria = [{all}]\n")).unwrap();
    }

    #[test]
    fn huge_or_negative_positions_are_refused_without_overflow() {
        for (row, col) in [
            (i64::MAX, 0),
            (0, i64::MAX - 1),
            (-1, 0),
            (i64::MIN, i64::MIN),
        ] {
            let t = MIN.replace(
                "position = \"bottom-right\"",
                &format!("position = {{ row = {row}, col = {col} }}"),
            );
            match ExperimentSpec::from_toml_str(&t) {
                Err(Error::Invalid { field, .. }) => assert_eq!(field, "attack.trigger.position"),
                other => panic!("{row},{col}: {other:?}"),
            }
        }
        // a position that passes alone but not against the image: refused,
        // no overflow
        let t = MIN.replace(
            "position = \"bottom-right\"",
            "position = { row = 9223372036854775000, col = 0 }",
        );
        let a = ExperimentSpec::from_toml_str(&t).unwrap().attack.unwrap();
        assert_eq!(
            a.validate_for(28, 28, 10).unwrap_err().field(),
            Some("attack.trigger.position")
        );
        // corners saturate
        let p = PatchPosition::Corner(Corner::BottomRight);
        assert_eq!(p.top_left(i64::MIN, 28, 28), (i64::MAX, i64::MAX));
    }

    fn with_trigger(trigger: &str) -> String {
        MIN.replace(
            "kind = \"patch\"\n        size = 3\n        position = \"bottom-right\"",
            trigger,
        )
    }

    #[test]
    fn sig_and_wanet_parse_with_the_papers_defaults() {
        let s = ExperimentSpec::from_toml_str(&with_trigger("kind = \"sig\"")).unwrap();
        assert_eq!(
            s.attack.as_ref().unwrap().trigger,
            TriggerSpec::Sig {
                delta: 20.0 / 255.0,
                test_delta: None,
                frequency: 6.0
            }
        );
        assert!(s.attack.unwrap().trigger.clean_label());
        let s = ExperimentSpec::from_toml_str(&with_trigger(
            "kind = \"sig\"\ndelta = 0.1\ntest_delta = 0.2\nfrequency = 4",
        ))
        .unwrap();
        assert_eq!(
            s.attack.unwrap().trigger,
            TriggerSpec::Sig {
                delta: 0.1,
                test_delta: Some(0.2),
                frequency: 4.0
            }
        );
        let s = ExperimentSpec::from_toml_str(&with_trigger("kind = \"wanet\"")).unwrap();
        let a = s.attack.unwrap();
        assert_eq!(
            a.trigger,
            TriggerSpec::Wanet {
                k: 4,
                s: 0.5,
                grid_rescale: 1.0,
                cross_ratio: 2.0,
                seed: 0
            }
        );
        assert!(!a.trigger.clean_label());
        assert_eq!(a.trigger.kind_str(), "wanet");
        // both round-trip
        for t in [
            "kind = \"sig\"\ntest_delta = 0.3",
            "kind = \"wanet\"\nk = 8\ns = 1.0",
        ] {
            let s = ExperimentSpec::from_toml_str(&with_trigger(t)).unwrap();
            assert_eq!(
                ExperimentSpec::from_toml_str(&s.to_toml_string()).unwrap(),
                s
            );
        }
    }

    #[test]
    fn sig_and_wanet_options_are_checked_naming_the_key() {
        let field = |t: &str| match ExperimentSpec::from_toml_str(t) {
            Err(Error::Invalid { field, message }) => (field, message),
            other => panic!("{t}: {other:?}"),
        };
        for (trigger, key) in [
            ("kind = \"sig\"\ndelta = 0", "attack.trigger.delta"),
            ("kind = \"sig\"\ndelta = 1.5", "attack.trigger.delta"),
            (
                "kind = \"sig\"\ntest_delta = -0.1",
                "attack.trigger.test_delta",
            ),
            ("kind = \"sig\"\nfrequency = 0", "attack.trigger.frequency"),
            (
                "kind = \"sig\"\nfrequency = inf",
                "attack.trigger.frequency",
            ),
            ("kind = \"wanet\"\nk = 1", "attack.trigger.k"),
            ("kind = \"wanet\"\ns = 0", "attack.trigger.s"),
            ("kind = \"wanet\"\ns = nan", "attack.trigger.s"),
            (
                "kind = \"wanet\"\ngrid_rescale = 0",
                "attack.trigger.grid_rescale",
            ),
            (
                "kind = \"wanet\"\ncross_ratio = -1",
                "attack.trigger.cross_ratio",
            ),
            (
                "kind = \"wanet\"\ncross_ratio = 9.5",
                "attack.trigger.cross_ratio",
            ),
        ] {
            assert_eq!(field(&with_trigger(trigger)).0, key, "{trigger}");
        }
        let (f, m) = field(
            &with_trigger("kind = \"sig\"")
                .replace("rate = 0.1", "rate = 0.1\ntarget_mode = \"all-to-all\""),
        );
        assert_eq!(f, "attack.target_mode");
        assert!(m.contains("clean-label"), "{m}");
        let e = ExperimentSpec::from_toml_str(&with_trigger("kind = \"wanet\"\nbogus = 1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        // against the image: frequency under Nyquist, k inside the image
        let sig = ExperimentSpec::from_toml_str(&with_trigger("kind = \"sig\"\nfrequency = 15"))
            .unwrap()
            .attack
            .unwrap();
        assert!(sig.validate_for(32, 32, 10).is_ok());
        assert_eq!(
            sig.validate_for(28, 28, 10).unwrap_err().field(),
            Some("attack.trigger.frequency")
        );
        let w = ExperimentSpec::from_toml_str(&with_trigger("kind = \"wanet\"\nk = 30"))
            .unwrap()
            .attack
            .unwrap();
        assert!(w.validate_for(32, 32, 10).is_ok());
        assert_eq!(
            w.validate_for(28, 28, 10).unwrap_err().field(),
            Some("attack.trigger.k")
        );
    }

    /// Every spec in `examples/` parses and validates (a new attack's
    /// example cannot drift from the spec).
    #[test]
    fn every_example_spec_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut kinds = std::collections::BTreeSet::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let s = ExperimentSpec::from_file(&p).unwrap_or_else(|e| panic!("{e}"));
                if let Some(a) = s.attack {
                    kinds.insert(a.trigger.kind_str());
                }
            }
        }
        for k in ["patch", "sig", "wanet"] {
            assert!(kinds.contains(k), "no example plants {k}: {kinds:?}");
        }
    }

    #[test]
    fn fashion_mnist_is_a_dataset_kind() {
        let s =
            ExperimentSpec::from_toml_str(&MIN.replace("\"mnist\"", "\"fashion-mnist\"")).unwrap();
        assert_eq!(s.dataset.kind, DatasetKind::FashionMnist);
        assert_eq!(s.dataset.kind.input_shape(), (1, 28, 28));
        assert_eq!(s.dataset.kind.train_images(), 60_000);
        for k in [
            DatasetKind::Mnist,
            DatasetKind::Cifar10,
            DatasetKind::FashionMnist,
        ] {
            assert_eq!(k.as_str().parse::<DatasetKind>().unwrap(), k);
        }
        let e = "fashion".parse::<DatasetKind>().unwrap_err().to_string();
        assert!(e.contains("fashion-mnist"), "{e}");
    }

    #[test]
    fn round_trips_through_toml() {
        let s = ExperimentSpec::from_toml_str(MIN).unwrap();
        let again = ExperimentSpec::from_toml_str(&s.to_toml_string()).unwrap();
        assert_eq!(s, again);
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn type_errors_name_their_key() {
        let text = "name = \"x\"\n[dataset]\nkind = \"mnist\"\n[training]\nepochs = -3\n";
        match ExperimentSpec::from_toml_str(text) {
            Err(Error::Invalid { field, .. }) => assert_eq!(field, "training.epochs"),
            other => panic!("{other:?}"),
        }
        let text = "[dataset]\nkind = \"mnist\"\n[training]\nbogus = 1\n";
        match ExperimentSpec::from_toml_str(text) {
            Err(Error::Invalid { field, .. }) => assert!(field.starts_with("training"), "{field}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(key_at("a = 1\n[b.c]\nd = 2\n", 14), Some("b.c.d".into()));
    }
}
