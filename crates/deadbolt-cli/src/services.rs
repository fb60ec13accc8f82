//! The service side of the CLI: `serve` (any subset of the five services in
//! one process), the embedded `experiment` (all services in-process on
//! loopback, SQLite + local artifact store, driven over gRPC), and the
//! client commands (`submit`, `watch`, `runs`, `report`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use deadbolt_core::report::Report;
use deadbolt_gateway::Gateway;
use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::experiment_service_client::ExperimentServiceClient;
use deadbolt_runtime::config::ServiceKind;
use deadbolt_runtime::{server, Config, Shared};
use deadbolt_store::{ArtifactRecord, ArtifactStore};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Services running in this process; dropping it stops them at once.
pub struct Running {
    pub addrs: BTreeMap<ServiceKind, SocketAddr>,
    /// The stage workers (they end after a drain).
    workers: Vec<JoinHandle<()>>,
    /// Background tasks that end with the process (the claim loop).
    tasks: Vec<JoinHandle<()>>,
    servers: Vec<JoinHandle<Result<()>>>,
    gateway: Option<Gateway>,
    shared: Shared,
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() -> Result<&'static str> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => Ok("SIGTERM"),
        r = tokio::signal::ctrl_c() => r.map(|_| "ctrl-c").map_err(Into::into),
    }
}

impl Running {
    /// Serves until a server stops (an error) or SIGTERM/Ctrl-C, which
    /// drains the process ([`Running::drain`]).
    pub async fn wait(mut self) -> Result<()> {
        let servers = std::mem::take(&mut self.servers);
        let first_down = async move {
            if servers.is_empty() {
                return futures::future::pending().await;
            }
            let (r, _, _) = futures::future::select_all(servers.into_iter().map(|h| {
                Box::pin(async move { h.await.map_err(anyhow::Error::from).and_then(|r| r) })
            }))
            .await;
            r
        };
        tokio::select! {
            r = first_down => r,
            sig = shutdown_signal() => {
                tracing::info!(signal = sig?, "draining");
                self.drain().await;
                Ok(())
            }
        }
    }

    /// Graceful drain: stop leasing jobs and claiming runs; let each
    /// current job finish its epoch within `drain_secs` (then stop it),
    /// release its lease without counting the attempt so another worker
    /// takes it at once, clean its work folder; release the runs this
    /// gateway drives. Servers stop last.
    pub async fn drain(&mut self) {
        self.shared.drain.start();
        let limit = self.shared.config.drain() + std::time::Duration::from_secs(10);
        let workers = std::mem::take(&mut self.workers);
        if tokio::time::timeout(limit, futures::future::join_all(workers))
            .await
            .is_err()
        {
            tracing::warn!("workers did not wind down in time");
        }
        if let Some(g) = &self.gateway {
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            while g.driving() > 0 && Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        tracing::info!("drained");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in self.workers.iter().chain(&self.tasks) {
            t.abort();
        }
        for s in &self.servers {
            s.abort();
        }
    }
}

/// Starts the named services. Stage services start first; a gateway with
/// no configured peers for a stage calls the instance started here.
pub async fn start(shared: &Shared, kinds: &[ServiceKind]) -> Result<Running> {
    let mut run = Running {
        addrs: BTreeMap::new(),
        workers: Vec::new(),
        tasks: Vec::new(),
        servers: Vec::new(),
        gateway: None,
        shared: shared.clone(),
    };
    let mut shared = shared.clone();
    for &k in kinds.iter().filter(|k| **k != ServiceKind::Gateway) {
        let listener = server::bind(&shared.config.listen_addr(k)).await?;
        let (routes, name, handlers) =
            deadbolt_stages::service(k, shared.clone()).expect("the gateway is started below");
        let (addr, task) = server::spawn(name, routes, listener).await?;
        run.servers.push(task);
        run.addrs.insert(k, addr);
        let worker = shared.worker(k.as_str(), handlers)?;
        run.workers.push(tokio::spawn(worker.run()));
    }
    if kinds.contains(&ServiceKind::Gateway) {
        for (k, addr) in &run.addrs {
            if shared.config.peers.get(*k).is_none_or(|p| p.is_empty()) {
                shared.config.peers.set(*k, vec![format!("http://{addr}")]);
            }
        }
        let listener = server::bind(&shared.config.listen_addr(ServiceKind::Gateway)).await?;
        let g = Gateway::new(shared.clone())?;
        // runs whose driver died (or that nobody drives yet) are claimed
        // now and every third of a lease
        let claimed = g.claim_orphans().await?;
        if claimed > 0 {
            tracing::info!(runs = claimed, "claimed unfinished runs");
        }
        run.tasks.push(tokio::spawn(g.clone().claim_loop()));
        run.gateway = Some(g.clone());
        let (addr, task) = server::spawn_with(
            "deadbolt.v1.ExperimentService",
            deadbolt_gateway::routes(g),
            listener,
            Some(shared.config.request_timeout()),
        )
        .await?;
        run.servers.push(task);
        run.addrs.insert(ServiceKind::Gateway, addr);
    }
    Ok(run)
}

/// `deadbolt serve`.
pub async fn serve(config: Config, kinds: Vec<ServiceKind>) -> Result<()> {
    if config.metrics_listen.is_some() {
        // before the workers start, so that nothing they record is lost
        deadbolt_runtime::metrics::install()?;
    }
    let shared = Shared::connect(config).await?;
    let mut running = start(&shared, &kinds).await?;
    if let Some(listen) = shared.config.metrics_listen.clone() {
        let (addr, task) = deadbolt_runtime::metrics::serve(&listen).await?;
        running.tasks.push(task);
        running
            .tasks
            .push(deadbolt_runtime::metrics::spawn_queue_gauges(
                shared.store.clone(),
                std::time::Duration::from_secs(2),
            ));
        println!("metrics listening on {addr}");
    }
    for (k, a) in &running.addrs {
        // one line per service, for scripts and tests to find the ports
        println!("{} listening on {a}", k.as_str());
    }
    running.wait().await
}

pub async fn client(url: &str) -> Result<ExperimentServiceClient<Channel>> {
    ExperimentServiceClient::connect(url.to_string())
        .await
        .with_context(|| format!("connecting to the gateway at {url}"))
}

/// Submits a TOML spec file.
pub async fn submit(
    c: &mut ExperimentServiceClient<Channel>,
    spec: &Path,
    request_id: Option<String>,
) -> Result<pb::SubmitExperimentResponse> {
    let text =
        std::fs::read_to_string(spec).with_context(|| format!("reading {}", spec.display()))?;
    let r = c
        .submit_experiment(pb::SubmitExperimentRequest {
            client_request_id: request_id.unwrap_or_default(),
            spec: Some(pb::submit_experiment_request::Spec::SpecToml(text)),
        })
        .await
        .map_err(status_error)?;
    Ok(r.into_inner())
}

/// A status as an error that names the bad fields.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    let fields = deadbolt_proto::validate::field_violations(&s);
    if fields.is_empty() {
        anyhow::anyhow!("{:?}: {}", s.code(), s.message())
    } else {
        let f: Vec<String> = fields.iter().map(|(f, d)| format!("{f}: {d}")).collect();
        anyhow::anyhow!("{:?}: {}", s.code(), f.join("; "))
    }
}

/// Streams a run's events until it ends (progress bars on a terminal,
/// lines otherwise); returns the final run.
pub async fn watch(
    c: &mut ExperimentServiceClient<Channel>,
    run_id: &str,
    quiet: bool,
) -> Result<pb::Run> {
    let hidden = quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = ProgressBar::new(1000);
    if hidden {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{msg:<40} [{bar:30}] {percent:>3}% {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut stream = c
        .watch_experiment(pb::WatchExperimentRequest {
            run_id: run_id.to_string(),
            after_seq: 0,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    while let Some(e) = stream.next().await {
        let e = e.map_err(status_error)?;
        match e.kind.as_str() {
            "progress" => {
                bar.set_message(format!("{}: {}", e.stage, e.message));
                bar.set_position((e.progress.unwrap_or(0.0) * 1000.0) as u64);
            }
            kind => {
                let line = format!("{:<22} {kind} {}", e.stage, e.message);
                if hidden {
                    if !quiet {
                        eprintln!("{line}");
                    }
                } else {
                    bar.println(line);
                }
            }
        }
    }
    bar.finish_and_clear();
    let run = c
        .get_experiment(pb::GetExperimentRequest {
            run_id: run_id.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(run)
}

/// Which recorded artifacts land where in an output folder: the report
/// (`report/*` -> `*`), the final models, pruned models and the synthetic
/// trigger (same layout as the core's `experiment::run`).
fn local_path(name: &str, with_models: bool) -> Option<PathBuf> {
    if let Some(rest) = name.strip_prefix("report/") {
        return Some(PathBuf::from(rest));
    }
    if !with_models {
        return None;
    }
    let keep = matches!(
        name,
        "clean/model.safetensors"
            | "clean/model.json"
            | "backdoored/model.safetensors"
            | "backdoored/model.json"
            | "synthetic/trigger.safetensors"
    ) || name.starts_with("pruned/");
    keep.then(|| PathBuf::from(name))
}

/// Downloads a run's report (and with `with_models` its models) into `out`
/// (sha256-verified), then rebases the report's paths onto `out`.
pub async fn download_report(
    artifacts: &ArtifactStore,
    run: &pb::Run,
    out: &Path,
    with_models: bool,
) -> Result<Report> {
    let run_id: uuid::Uuid = run.id.parse()?;
    let mut n = 0;
    for a in &run.artifacts {
        let Some(rel) = local_path(&a.name, with_models) else {
            continue;
        };
        let r = a.r#ref.clone().unwrap_or_default();
        let rec = ArtifactRecord {
            run_id,
            name: a.name.clone(),
            uri: r.uri,
            sha256: r.sha256,
            size: r.size,
            content_type: None,
        };
        let bytes = artifacts.get(&artifacts.ref_from_record(&rec)?).await?;
        let path = out.join(&rel);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        n += 1;
    }
    let path = out.join("report.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("run {} has no report (read {})", run.id, path.display()))?;
    let mut report = Report::from_json(&text)?;
    rebase(&mut report, out);
    report.write(out)?;
    tracing::info!(run_id = %run.id, files = n, out = %out.display(), "report downloaded");
    Ok(report)
}

/// Makes the report's relative paths (as the services store them) relative
/// to `out`, as the core writes them.
fn rebase(r: &mut Report, out: &Path) {
    let j = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            out.join(p)
        }
    };
    r.clean_model.checkpoint = j(&r.clean_model.checkpoint);
    r.backdoored_model.checkpoint = j(&r.backdoored_model.checkpoint);
    r.synthetic_trigger.trigger_file = j(&r.synthetic_trigger.trigger_file);
    for f in r.figures.iter_mut() {
        *f = j(f);
    }
    for t in [&mut r.pruning, &mut r.pruning_synthetic] {
        for c in t.values_mut() {
            if let Some(p) = c.checkpoint.as_mut() {
                *p = j(p);
            }
        }
    }
}

/// The embedded configuration of `deadbolt experiment`: SQLite and the
/// artifact store under `<out>/.deadbolt/`, every service on a loopback
/// ephemeral port.
pub fn embedded_config(out: &Path) -> Result<Config> {
    let state = out.join(".deadbolt");
    std::fs::create_dir_all(&state)?;
    let state = state.canonicalize()?;
    let mut c = Config {
        database_url: format!("sqlite://{}", state.join("meta.db").display()),
        artifact_url: state.join("artifacts").display().to_string(),
        work_dir: Some(state.join("work")),
        lease_secs: 60.0,
        heartbeat_secs: 1.0,
        poll_ms: 100,
        // the user's own machine and files
        allow_local_paths: true,
        limits: deadbolt_runtime::policy::Limits::unbounded(),
        ..Config::default()
    };
    for k in ServiceKind::ALL {
        c.listen.set(k, "127.0.0.1:0".into());
    }
    Ok(c)
}

/// `deadbolt experiment` (embedded): all services in-process, the spec
/// submitted and watched over gRPC, the report written into `out`.
pub async fn experiment(spec: &Path, out: &Path, quiet: bool) -> Result<Report> {
    let t0 = Instant::now();
    let parsed = deadbolt_core::spec::ExperimentSpec::from_file(spec)?;
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("spec.toml"), parsed.to_toml_string())?;
    let shared = Shared::connect(embedded_config(out)?).await?;
    let running = start(&shared, &ServiceKind::ALL).await?;
    let url = format!("http://{}", running.addrs[&ServiceKind::Gateway]);
    let mut c = client(&url).await?;
    let submitted = submit(&mut c, spec, None).await?;
    tracing::info!(run_id = %submitted.run_id, gateway = %url, "experiment submitted");
    let run = watch(&mut c, &submitted.run_id, quiet).await?;
    if run.status != pb::JobStatus::Succeeded as i32 {
        bail!(
            "run {} ended {:?}: {}",
            run.id,
            pb::JobStatus::try_from(run.status).unwrap_or_default(),
            run.error
        );
    }
    let report = download_report(&shared.artifacts, &run, out, true).await?;
    drop(running);
    tracing::info!(seconds = t0.elapsed().as_secs_f64(), run_id = %run.id, "experiment done");
    Ok(report)
}

/// One line per run for `deadbolt runs`.
pub fn run_line(r: &pb::Run) -> String {
    let f = r.figures.clone().unwrap_or_default();
    let pct = |v: Option<f64>| {
        v.map(|v| format!("{:.2}%", 100.0 * v))
            .unwrap_or_else(|| "-".into())
    };
    format!(
        "{}  {:<10} {:<24} clean_acc {:>7}  backdoored_acc {:>7}  asr {:>7}",
        r.id,
        pb::JobStatus::try_from(r.status)
            .map(|s| s
                .as_str_name()
                .trim_start_matches("JOB_STATUS_")
                .to_lowercase())
            .unwrap_or_default(),
        r.name,
        pct(f.clean_acc),
        pct(f.backdoored_acc),
        pct(f.backdoored_asr),
    )
}
