//! `deadbolt`: plant, find and remove backdoors in image classifiers.
//!
//! Built with the default `torch` feature it runs everything: the local
//! science commands, the embedded experiment, all five services and the
//! clients. Built without it (`--no-default-features`, the gateway
//! image), it links no libtorch: it serves the gateway and runs the client
//! and admin commands; the others fail naming the feature.

mod admin;
mod args;
mod client;
#[cfg(feature = "torch")]
mod embedded;
mod headline;
#[cfg(feature = "torch")]
mod progress;
#[cfg(feature = "torch")]
mod scan_repair;
mod serve;
#[cfg(feature = "torch")]
mod training;

use anyhow::Result;
use clap::Parser;
use deadbolt_runtime::config::ServiceKind;
use deadbolt_runtime::Config;

use args::{Cli, Command, UploadsCommand};

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
    #[cfg(feature = "torch")]
    let bars =
        progress::Bars::new(cli.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let quiet = cli.quiet;
    match cli.command {
        #[cfg(feature = "torch")]
        Command::Data {
            command: args::DataCommand::FetchMnist { out },
        } => training::fetch_mnist(&out),
        #[cfg(feature = "torch")]
        Command::Train(args) => training::train(args, &bars),
        #[cfg(feature = "torch")]
        Command::Evaluate(args) => training::evaluate(args),
        #[cfg(feature = "torch")]
        Command::Experiment { spec, out, direct } => experiment(&spec, &out, direct, quiet, &bars),
        #[cfg(feature = "torch")]
        Command::Scan(args) => scan_repair::scan_command(&args, &bars),
        #[cfg(feature = "torch")]
        Command::Repair(args) => scan_repair::repair_command(&args, &bars),
        #[cfg(not(feature = "torch"))]
        Command::Data { .. }
        | Command::Train(_)
        | Command::Evaluate(_)
        | Command::Experiment { .. }
        | Command::Scan(_)
        | Command::Repair(_) => Err(needs_torch(&typed_command())),
        Command::Serve {
            config,
            services: names,
        } => {
            let kinds = names
                .iter()
                .map(|n| n.parse::<ServiceKind>())
                .collect::<Result<Vec<_>>>()?;
            let config = Config::load(config.as_deref())?;
            tokio_rt()?.block_on(serve::serve(config, kinds))
        }
        Command::Submit {
            spec,
            gateway,
            request_id,
            watch,
        } => tokio_rt()?.block_on(client::submit::submit_spec(
            &gateway, &spec, request_id, watch, quiet,
        )),
        Command::SubmitScan(args) => tokio_rt()?.block_on(client::submit::submit_scan(args)),
        Command::Watch { run, gateway } => {
            tokio_rt()?.block_on(client::watch::follow(&gateway, &run, quiet))
        }
        Command::Admin { config, command } => {
            let config = Config::load(config.as_deref())?;
            tokio_rt()?.block_on(admin::admin(config, command))
        }
        Command::Cancel { run, gateway } => {
            tokio_rt()?.block_on(client::runs::cancel(&gateway, &run))
        }
        Command::Upload {
            kind,
            name,
            files,
            gateway,
        } => tokio_rt()?.block_on(client::uploads::upload_files(
            &gateway, &kind, &name, &files,
        )),
        Command::Runs { gateway, limit } => {
            tokio_rt()?.block_on(client::runs::list(&gateway, limit))
        }
        Command::Uploads { command } => match command {
            UploadsCommand::List { gateway } => {
                tokio_rt()?.block_on(client::uploads::list(&gateway))
            }
            UploadsCommand::Delete {
                kind,
                name,
                file,
                gateway,
            } => tokio_rt()?.block_on(client::uploads::delete(&gateway, &kind, &name, file)),
        },
        Command::Report {
            run,
            out,
            gateway,
            config: _,
            models,
        } => tokio_rt()?.block_on(client::download::report(&gateway, &run, &out, models)),
    }
}

fn tokio_rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// `deadbolt experiment`: through the services in this process (or with
/// `direct`, the core pipeline called directly); prints the headline
/// figures.
#[cfg(feature = "torch")]
fn experiment(
    spec: &std::path::Path,
    out: &std::path::Path,
    direct: bool,
    quiet: bool,
    bars: &progress::Bars,
) -> Result<()> {
    let t0 = std::time::Instant::now();
    let report = if direct {
        let spec = deadbolt_spec::ExperimentSpec::from_file(spec)?;
        deadbolt_core::pipeline::experiment::run(&spec, out, bars)?
    } else {
        tokio_rt()?.block_on(embedded::experiment(spec, out, quiet))?
    };
    headline::Headline::of(&report)?.print();
    eprintln!(
        "report written to {} in {:.1} s",
        out.join("report.md").display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The subcommand on this process's command line (which parsed before),
/// as `deadbolt NAME`.
#[cfg(not(feature = "torch"))]
fn typed_command() -> String {
    let m = <Cli as clap::CommandFactory>::command().get_matches();
    format!("`deadbolt {}`", m.subcommand_name().unwrap_or_default())
}

/// The error of a command or service that needs libtorch, in a binary
/// built without it.
#[cfg(not(feature = "torch"))]
fn needs_torch(what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{what} needs libtorch, and this deadbolt was built without it (cargo feature \
         `torch`, default on): run it from the worker image, or build deadbolt-cli \
         with default features"
    )
}
