//! The service side of the CLI: `serve` (any subset of the five services in
//! one process), the embedded `experiment` (all services in-process on
//! loopback, SQLite + local artifact store, driven over gRPC), and the
//! client commands (`submit`, `watch`, `runs`, `report`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use deadbolt_core::pipeline::report::Report;
use deadbolt_core::report::Document;
use deadbolt_gateway::Gateway;
use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::experiment_service_client::ExperimentServiceClient;
use deadbolt_runtime::auth::WithBearer;
use deadbolt_runtime::config::ServiceKind;
use deadbolt_runtime::{server, Config, Shared};
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
    shared.config.check_serving(kinds)?;
    let mut shared = shared.clone();
    let internal = shared.config.internal_token.clone();
    deadbolt_stages::bundle::keep_written(
        kinds.contains(&ServiceKind::Poisoner)
            && kinds.iter().any(|k| {
                matches!(
                    k,
                    ServiceKind::Trainer | ServiceKind::Analyzer | ServiceKind::Pruner
                )
            }),
    );
    for &k in kinds.iter().filter(|k| **k != ServiceKind::Gateway) {
        let Some(token) = internal.as_deref() else {
            bail!(
                "the {} service needs internal_token (DEADBOLT_INTERNAL_TOKEN): stage \
                 services answer only the gateway, which presents it",
                k.as_str()
            );
        };
        let listener = server::bind(&shared.config.listen_addr(k)).await?;
        let (routes, name, handlers) =
            deadbolt_stages::service(k, shared.clone()).expect("the gateway is started below");
        let guard = server::Guard::Internal(deadbolt_runtime::auth::InternalLayer {
            token: token.into(),
        });
        let tls = shared.config.server_tls(k)?;
        let (addr, task) = server::spawn_with(name, routes, listener, None, guard, tls).await?;
        run.servers.push(task);
        run.addrs.insert(k, addr);
        let worker = shared.worker(k.as_str(), handlers)?;
        run.workers.push(tokio::spawn(worker.run()));
    }
    if kinds.contains(&ServiceKind::Gateway) {
        for (k, addr) in &run.addrs {
            if shared.config.peers.get(*k).is_none_or(|p| p.is_empty()) {
                let scheme = shared.config.scheme();
                shared
                    .config
                    .peers
                    .set(*k, vec![format!("{scheme}://{addr}")]);
            }
        }
        let tls = shared.config.server_tls(ServiceKind::Gateway)?;
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
            server::Guard::Keys(deadbolt_runtime::auth::AuthLayer::new(
                shared.store.clone(),
                shared.config.auth,
                shared.config.key_cache(),
            )),
            tls,
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

/// A gateway client. It presents the API key of `DEADBOLT_API_KEY`, or of
/// the file named by `DEADBOLT_API_KEY_FILE` (keys never go on the command
/// line, where shell history would keep them).
pub type Client = ExperimentServiceClient<WithBearer<Channel>>;

pub async fn client(url: &str) -> Result<Client> {
    let key = match (
        std::env::var("DEADBOLT_API_KEY")
            .ok()
            .filter(|k| !k.is_empty()),
        std::env::var_os("DEADBOLT_API_KEY_FILE"),
    ) {
        (Some(k), _) => Some(k),
        (None, Some(f)) => Some(
            std::fs::read_to_string(&f)
                .with_context(|| {
                    format!("reading DEADBOLT_API_KEY_FILE {}", Path::new(&f).display())
                })?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .with_context(|| format!("bad gateway address {url:?}"))?;
    // https://: the CA bundle of DEADBOLT_TLS_CA (else the system roots)
    let mut tls = deadbolt_runtime::tls::TlsConfig::default();
    tls.apply_env(|n| std::env::var(n).ok().filter(|v| !v.is_empty()));
    if let Some(c) = deadbolt_runtime::tls::client_for(url, Some(&tls))? {
        endpoint = endpoint
            .tls_config(c)
            .with_context(|| format!("TLS for the gateway at {url}"))?;
    }
    let ch = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to the gateway at {url}"))?;
    Ok(ExperimentServiceClient::new(WithBearer::new(
        ch,
        key.as_deref(),
        "DEADBOLT_API_KEY",
    )?))
}

/// Bytes per upload message (the servers decode at most 4 MiB).
const UPLOAD_CHUNK: usize = 1 << 20;

/// The files of a dataset upload and the names they are stored under:
/// a file as its file name; a folder as its files (`FILE`) and the files of
/// its sub-folders (`CLASS/FILE`, an image folder's layout). Deeper
/// folders are refused, naming them.
pub fn dataset_files(paths: &[PathBuf]) -> Result<Vec<(String, PathBuf)>> {
    fn name_of(p: &Path) -> Result<String> {
        p.file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .with_context(|| format!("{}: not a UTF-8 file name", p.display()))
    }
    fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
        let mut v = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<Vec<_>>>()
            .with_context(|| format!("reading {}", dir.display()))?;
        v.sort();
        Ok(v)
    }
    let mut out = Vec::new();
    for p in paths {
        if !p.is_dir() {
            out.push((name_of(p)?, p.clone()));
            continue;
        }
        for e in entries(p)? {
            if !e.is_dir() {
                out.push((name_of(&e)?, e));
                continue;
            }
            let class = name_of(&e)?;
            for f in entries(&e)? {
                if f.is_dir() {
                    anyhow::bail!(
                        "{}: an image folder has one level of class folders (CLASS/FILE)",
                        f.display()
                    );
                }
                out.push((format!("{class}/{}", name_of(&f)?), f));
            }
        }
    }
    Ok(out)
}

/// Uploads one file as `file_name` (a name, or `CLASS/NAME` in a dataset):
/// its sha256 and size first (one pass over the file), then its bytes in
/// 1 MiB messages (a second pass, streamed).
pub async fn upload(
    c: &mut Client,
    kind: pb::UploadKind,
    name: &str,
    file_name: &str,
    file: &Path,
) -> Result<pb::UploadResponse> {
    use sha2::Digest;
    use tokio::io::AsyncReadExt;
    let (sha256, size) = {
        let mut f =
            std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let mut h = sha2::Sha256::new();
        let size =
            std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", file.display()))?;
        (hex::encode(h.finalize()), size)
    };
    let header = pb::UploadHeader {
        kind: kind as i32,
        name: name.to_string(),
        file: file_name.to_string(),
        sha256,
        size,
    };
    let f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("opening {}", file.display()))?;
    let chunks = futures::stream::unfold((f, Some(header)), |(mut f, header)| async move {
        let mut buf = vec![0u8; UPLOAD_CHUNK];
        let n = match f.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "reading the upload");
                return None;
            }
        };
        if n == 0 && header.is_none() {
            return None;
        }
        buf.truncate(n);
        Some((pb::UploadChunk { header, data: buf }, (f, None)))
    });
    let r = c
        .upload(chunks)
        .await
        .map_err(status_error)
        .with_context(|| format!("uploading {}", file.display()))?;
    Ok(r.into_inner())
}

/// Makes the upload `name` hold exactly the files `keep` (just uploaded):
/// deletes the files an earlier upload of that name stored that this one
/// lacks, so a re-upload replaces the old one and leaves nothing behind.
pub async fn prune_upload(
    c: &mut Client,
    kind: pb::UploadKind,
    name: &str,
    keep: &[&str],
) -> Result<()> {
    let listed = c
        .list_uploads(pb::ListUploadsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let Some(u) = listed
        .uploads
        .iter()
        .find(|u| u.kind == kind as i32 && u.name == name)
    else {
        return Ok(());
    };
    for f in u.files.iter().filter(|f| !keep.contains(&f.file.as_str())) {
        c.delete_upload(pb::DeleteUploadRequest {
            kind: kind as i32,
            name: name.to_string(),
            file: f.file.clone(),
        })
        .await
        .map_err(status_error)
        .with_context(|| format!("deleting {} of the earlier upload {name}", f.file))?;
        eprintln!("deleted {} (of the earlier upload {name})", f.file);
    }
    Ok(())
}

/// Submits a TOML spec file.
pub async fn submit(
    c: &mut Client,
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
pub async fn watch(c: &mut Client, run_id: &str, quiet: bool) -> Result<pb::Run> {
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

/// Refuses an artifact name (from the server) that is not a plain relative
/// path of safe segments.
pub fn safe_name(name: &str) -> Result<()> {
    deadbolt_store::validate_name(name)
        .with_context(|| format!("the server sent artifact name {name:?}; refusing to write it"))?;
    let p = Path::new(name);
    if !p
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        bail!("the server sent artifact name {name:?} that would leave --out; refusing it");
    }
    Ok(())
}

/// One artifact arriving from a download: written to `<path>.part`,
/// hashed as it comes, moved to `path` only once its size and sha256 are
/// the ones the gateway announced; dropped before that, the part file is
/// removed.
struct Incoming {
    name: String,
    size: u64,
    sha256: String,
    written: u64,
    hasher: sha2::Sha256,
    /// None: an artifact not kept (its bytes are checked, not written).
    file: Option<(std::fs::File, PathBuf, PathBuf)>,
}

impl Incoming {
    fn start(c: &pb::DownloadChunk, dest: Option<PathBuf>) -> Result<Incoming> {
        use sha2::Digest;
        let file = match dest {
            Some(path) => {
                if let Some(d) = path.parent() {
                    std::fs::create_dir_all(d)
                        .with_context(|| format!("creating {}", d.display()))?;
                }
                let mut part = path.clone().into_os_string();
                part.push(".part");
                let part = PathBuf::from(part);
                let f = std::fs::File::create(&part)
                    .with_context(|| format!("creating {}", part.display()))?;
                Some((f, part, path))
            }
            None => None,
        };
        Ok(Incoming {
            name: c.name.clone(),
            size: c.size,
            sha256: c.sha256.to_ascii_lowercase(),
            written: 0,
            hasher: sha2::Sha256::new(),
            file,
        })
    }

    fn write(&mut self, c: &pb::DownloadChunk) -> Result<()> {
        use sha2::Digest;
        use std::io::Write;
        if c.offset != self.written
            || self.written + c.data.len() as u64 > self.size
            || c.size != self.size
            || !c.sha256.eq_ignore_ascii_case(&self.sha256)
        {
            bail!(
                "the gateway sent {} out of order (offset {} after {} of {} bytes)",
                self.name,
                c.offset,
                self.written,
                self.size
            );
        }
        self.hasher.update(&c.data);
        self.written += c.data.len() as u64;
        if let Some((f, part, _)) = &mut self.file {
            f.write_all(&c.data)
                .with_context(|| format!("writing {}", part.display()))?;
        }
        Ok(())
    }

    /// Checks the whole artifact and moves it into place.
    fn finish(mut self) -> Result<()> {
        use sha2::Digest;
        let actual = hex::encode(self.hasher.clone().finalize());
        if self.written != self.size || actual != self.sha256 {
            bail!(
                "{}: {} bytes hashing to {actual} arrived, not the announced {} bytes hashing to {} (refused)",
                self.name,
                self.written,
                self.size,
                self.sha256
            );
        }
        if let Some((f, part, path)) = self.file.take() {
            f.sync_all()
                .with_context(|| format!("writing {}", part.display()))?;
            drop(f);
            std::fs::rename(&part, &path)
                .with_context(|| format!("moving {} to {}", part.display(), path.display()))?;
        }
        Ok(())
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some((_, part, _)) = self.file.take() {
            let _ = std::fs::remove_file(part);
        }
    }
}

/// Downloads the run's artifacts of `target` through the gateway (the
/// client holds no storage credentials; the gateway reads only its team's
/// runs) and writes those that `keep` places under `out`, each checked
/// against the sha256 the gateway announces; returns how many it wrote.
async fn download_artifacts(
    c: &mut Client,
    run: &pb::Run,
    out: &Path,
    target: pb::download_request::Target,
    keep: impl Fn(&str) -> Option<PathBuf>,
) -> Result<usize> {
    let mut stream = c
        .download(pb::DownloadRequest {
            run_id: run.id.clone(),
            target: Some(target),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut n = 0;
    let mut cur: Option<Incoming> = None;
    while let Some(chunk) = stream.message().await.map_err(status_error)? {
        if cur.as_ref().is_none_or(|i| i.name != chunk.name) {
            if let Some(done) = cur.take() {
                n += usize::from(done.file.is_some());
                done.finish()?;
            }
            // the names come from the server: one that could leave `out`
            // (an absolute path, `..`, odd characters) is refused, never
            // written
            safe_name(&chunk.name)?;
            let dest = keep(&chunk.name).map(|rel| out.join(rel));
            cur = Some(Incoming::start(&chunk, dest)?);
        }
        cur.as_mut().expect("started").write(&chunk)?;
    }
    if let Some(done) = cur.take() {
        n += usize::from(done.file.is_some());
        done.finish()?;
    }
    Ok(n)
}

/// Whether the run is a scan (bring-your-own-model) run: its artifacts
/// are under `scan/` (and `repair/`).
pub fn is_scan_run(run: &pb::Run) -> bool {
    run.stages.iter().any(|s| s.stage == "scan")
}

/// Downloads a scan run's files into `out`: `scan/` (report.json,
/// report.md, figures, the synthetic trigger) and `repair/` (the repaired
/// model.safetensors and card.toml, report, figures).
pub async fn download_scan(c: &mut Client, run: &pb::Run, out: &Path) -> Result<usize> {
    let n = download_artifacts(
        c,
        run,
        out,
        pb::download_request::Target::Report(pb::ReportFiles { models: false }),
        |name| {
            (name.starts_with("scan/") || name.starts_with("repair/")).then(|| PathBuf::from(name))
        },
    )
    .await?;
    if n == 0 {
        bail!("scan run {} has no files yet", run.id);
    }
    tracing::info!(run_id = %run.id, files = n, out = %out.display(), "scan files downloaded");
    Ok(n)
}

/// Downloads a run's report (and with `with_models` its models) into `out`
/// through the gateway (sha256-verified), then rebases the report's paths
/// onto `out`.
pub async fn download_report(
    c: &mut Client,
    run: &pb::Run,
    out: &Path,
    with_models: bool,
) -> Result<Report> {
    let n = download_artifacts(
        c,
        run,
        out,
        pb::download_request::Target::Report(pb::ReportFiles {
            models: with_models,
        }),
        |name| local_path(name, with_models),
    )
    .await?;
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
        // the user's own machine and files: one local team, and a fresh
        // internal credential between the in-process services
        allow_local_paths: true,
        auth: deadbolt_runtime::auth::AuthMode::None,
        internal_token: Some(format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        )),
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
    let report = download_report(&mut c, &run, out, true).await?;
    drop(running);
    tracing::info!(seconds = t0.elapsed().as_secs_f64(), run_id = %run.id, "experiment done");
    Ok(report)
}

/// `deadbolt admin`: teams and API keys, straight in the metadata store
/// named by the config (operators only; keys are printed once).
#[derive(clap::Subcommand, Debug)]
pub enum Admin {
    /// Create a team.
    TeamCreate { name: String },
    /// List the teams.
    Teams,
    /// Create an API key; prints it once (only its hash is stored).
    KeyCreate {
        #[arg(long)]
        team: String,
        #[arg(long)]
        name: String,
        /// Comma-separated: submit, read, admin.
        #[arg(long, value_delimiter = ',', default_value = "submit,read")]
        scopes: Vec<String>,
        /// Expire after this many days (none: never).
        #[arg(long, allow_negative_numbers = true)]
        expires_in_days: Option<f64>,
    },
    /// List keys (never the keys themselves).
    Keys {
        #[arg(long)]
        team: Option<String>,
    },
    /// Revoke a key by id.
    KeyRevoke { id: uuid::Uuid },
    /// Set (or with no --days, clear) a key's expiry.
    KeyExpire {
        id: uuid::Uuid,
        #[arg(long, allow_negative_numbers = true)]
        days: Option<f64>,
    },
}

pub async fn admin(config: Config, cmd: Admin) -> Result<()> {
    // as the services do: with `migrate = false` (a role without DDL
    // rights) the schema is checked, not migrated
    let store = deadbolt_store::connect_with_options(
        &config.database_url,
        deadbolt_store::SessionLimits::for_lease(config.lease()),
        config.migrate,
    )
    .await?;
    let days = |d: f64| -> Result<chrono::DateTime<chrono::Utc>> {
        anyhow::ensure!(d.is_finite(), "days must be a number");
        Ok(chrono::Utc::now() + chrono::Duration::milliseconds((d * 86_400_000.0) as i64))
    };
    let key_line = |k: &deadbolt_store::ApiKey| {
        serde_json::json!({
            "id": k.id, "team": k.team, "name": k.name, "prefix": k.prefix,
            "scopes": k.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "expires_at": k.expires_at, "revoked_at": k.revoked_at,
            "last_used_at": k.last_used_at,
        })
    };
    match cmd {
        Admin::TeamCreate { name } => {
            let t = store.create_team(&name).await?;
            println!("{}", serde_json::json!({ "team": t.name }));
        }
        Admin::Teams => {
            for t in store.list_teams().await? {
                println!("{}", t.name);
            }
        }
        Admin::KeyCreate {
            team,
            name,
            scopes,
            expires_in_days,
        } => {
            let scopes = scopes
                .iter()
                .map(|s| s.trim().parse::<deadbolt_store::Scope>())
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let expires = expires_in_days.map(days).transpose()?;
            let (k, plain) = store.create_api_key(&team, &name, &scopes, expires).await?;
            let mut line = key_line(&k);
            line["key"] = serde_json::Value::String(plain);
            println!("{line}");
            eprintln!("the key is shown once; only its hash is stored");
        }
        Admin::Keys { team } => {
            for k in store.list_api_keys(team.as_deref()).await? {
                println!("{}", key_line(&k));
            }
        }
        Admin::KeyRevoke { id } => println!("{}", key_line(&store.revoke_api_key(id).await?)),
        Admin::KeyExpire { id, days: d } => {
            let at = d.map(days).transpose()?;
            println!("{}", key_line(&store.set_api_key_expiry(id, at).await?));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_artifact_names_are_refused() {
        for bad in [
            "../escape.png",
            "report/../../etc/passwd",
            "/etc/passwd",
            "report//x.png",
            "report/./x.png",
            "report\\..\\x",
            "",
        ] {
            assert!(safe_name(bad).is_err(), "{bad:?} was accepted");
        }
        for ok in ["report/report.json", "pruned/linf/model.safetensors"] {
            safe_name(ok).unwrap();
        }
    }
}
