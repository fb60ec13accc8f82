//! `deadbolt serve` child processes on loopback ephemeral ports, their
//! config, and gateway client helpers (submit, watch to the end).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::experiment_service_client::ExperimentServiceClient;
use futures::StreamExt;
use tonic::transport::Channel;

/// A `deadbolt serve` child process, killed (SIGKILL) on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    /// service -> `host:port`.
    pub addrs: HashMap<String, String>,
    pub log: PathBuf,
}

impl Proc {
    pub fn url(&self, service: &str) -> String {
        format!("http://{}", self.addrs[service])
    }
    /// The `https://` address of a service serving TLS.
    pub fn url_tls(&self, service: &str) -> String {
        format!("https://{}", self.addrs[service])
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// The process state letter of /proc/<pid>/stat (`T`: stopped).
    pub fn state(&self) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        // "pid (comm) S ...": the state follows the last ')'
        stat.rsplit_once(')')?.1.trim_start().chars().next()
    }
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// Sends a signal by name (`TERM`, `STOP`, `CONT`, ...).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} {}", self.pid());
    }
    /// Waits for the process to exit on its own (None after `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    /// The whole log of the process.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    pub fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `deadbolt serve --config <dir>/<name>.toml --services <services>`
/// and waits until every service printed its address (the metrics
/// endpoint's, when configured, is `addrs["metrics"]`).
pub fn serve(bin: &Path, dir: &Path, name: &str, services: &str, config: &str) -> Proc {
    serve_env(bin, dir, name, services, config, &[])
}

/// [`serve`] with extra environment variables (e.g. a failpoint).
pub fn serve_env(
    bin: &Path,
    dir: &Path,
    name: &str,
    services: &str,
    config: &str,
    env: &[(&str, &str)],
) -> Proc {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, config).unwrap();
    let log = dir.join(format!("{name}.log"));
    let mut cmd = Command::new(bin);
    crate::fixture::die_with_fixture(&mut cmd);
    let mut child = cmd
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--services", services])
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let want: Vec<&str> = services.split(',').collect();
    let mut addrs = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    // `metrics listening on ...` comes first when metrics are configured
    while !want.iter().all(|w| addrs.contains_key(*w)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some((svc, addr)) = line.split_once(" listening on ") {
                    addrs.insert(svc.to_string(), addr.trim().to_string());
                }
            }
            Err(_) => panic!(
                "{name} did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    }
    Proc {
        name: name.into(),
        child,
        addrs,
        log,
    }
}

/// Polls `f` every 20 ms until it returns `Some`, panicking with `what`
/// after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pid in a worker or driver id (`<service>-<pid>-<random>`).
pub fn pid_of(holder: &str) -> Option<u32> {
    holder.split('-').nth(1)?.parse().ok()
}

/// The internal credential of the test configs (stage services refuse
/// calls without it; the gateway presents it).
pub const INTERNAL_TOKEN: &str = "test-internal-credential-0123456789abcdef";

/// A tonic interceptor that presents [`INTERNAL_TOKEN`], for tests that
/// call stage services directly.
pub fn internal(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {INTERNAL_TOKEN}")
            .parse()
            .expect("a valid header value"),
    );
    Ok(req)
}

/// A client channel to `url`.
pub async fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("a valid url")
        .connect()
        .await
        .expect("connecting")
}

/// Config TOML for a service process (`extra` is appended): a 3 s lease,
/// heartbeats every 0.5 s, `auth = "none"` (the tests of other features;
/// `services_auth` runs with keys).
pub fn config(database_url: &str, artifact_url: &str, work: &Path, extra: &str) -> String {
    config_with(database_url, artifact_url, work, 3.0, "none", extra)
}

/// [`config`] with another lease period (heartbeats at a sixth of it).
pub fn config_with_lease(
    database_url: &str,
    artifact_url: &str,
    work: &Path,
    lease_secs: f64,
    extra: &str,
) -> String {
    config_with(database_url, artifact_url, work, lease_secs, "none", extra)
}

/// The config of every test process: the lease, the gateway's `auth`
/// (`keys` or `none`), the internal credential, and the real MNIST digits
/// offered as the dataset `mnist` (remote specs name datasets, never
/// server paths).
pub fn config_with(
    database_url: &str,
    artifact_url: &str,
    work: &Path,
    lease_secs: f64,
    auth: &str,
    extra: &str,
) -> String {
    format!(
        "database_url = \"{database_url}\"\nartifact_url = \"{artifact_url}\"\nwork_dir = \"{}\"\nlease_secs = {lease_secs:?}\nheartbeat_secs = {:?}\npoll_ms = 100\nmax_attempts = 3\nauth = \"{auth}\"\ninternal_token = \"{INTERNAL_TOKEN}\"\n{extra}\n[listen]\npoisoner = \"127.0.0.1:0\"\ntrainer = \"127.0.0.1:0\"\nanalyzer = \"127.0.0.1:0\"\npruner = \"127.0.0.1:0\"\ngateway = \"127.0.0.1:0\"\n[datasets.mnist]\nroot = \"{}\"\n",
        work.display(),
        lease_secs / 6.0,
        crate::specs::mnist_dir().display()
    )
}

/// A `[peers]` table.
pub fn peers(list: &[(&str, Vec<String>)]) -> String {
    let mut s = String::from("[peers]\n");
    for (k, v) in list {
        let urls: Vec<String> = v.iter().map(|u| format!("\"{u}\"")).collect();
        s.push_str(&format!("{k} = [{}]\n", urls.join(", ")));
    }
    s
}

pub async fn gateway(url: &str) -> ExperimentServiceClient<Channel> {
    ExperimentServiceClient::connect(url.to_string())
        .await
        .unwrap()
}

pub async fn submit_toml(
    c: &mut ExperimentServiceClient<Channel>,
    spec: &Path,
    request_id: &str,
) -> pb::SubmitExperimentResponse {
    c.submit_experiment(pb::SubmitExperimentRequest {
        client_request_id: request_id.into(),
        spec: Some(pb::submit_experiment_request::Spec::SpecToml(
            std::fs::read_to_string(spec).unwrap(),
        )),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Watches a run to its end over any client transport (a plain channel,
/// a keyed one); returns the events and the final run. Panics after
/// `timeout`.
pub async fn watch<T>(
    c: &mut ExperimentServiceClient<T>,
    run_id: &str,
    timeout: Duration,
) -> (Vec<pb::RunEvent>, pb::Run)
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    watch_logged(c, run_id, timeout, None).await
}

/// [`watch`], with the tail of `server`'s log in the panic message when
/// the run does not end in time.
pub async fn watch_logged<T>(
    c: &mut ExperimentServiceClient<T>,
    run_id: &str,
    timeout: Duration,
    server: Option<&Proc>,
) -> (Vec<pb::RunEvent>, pb::Run)
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut s = c
        .watch_experiment(pb::WatchExperimentRequest {
            run_id: run_id.into(),
            after_seq: 0,
        })
        .await
        .unwrap_or_else(|e| panic!("watching run {run_id}: {e:?}"))
        .into_inner();
    let mut events = Vec::new();
    tokio::time::timeout(timeout, async {
        while let Some(e) = s.next().await {
            events.push(e.unwrap_or_else(|e| panic!("watching run {run_id}: {e:?}")));
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "run {run_id} did not finish within {timeout:?}\n{}",
            server.map(Proc::log_tail).unwrap_or_default()
        )
    });
    let run = c
        .get_experiment(pb::GetExperimentRequest {
            run_id: run_id.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("getting run {run_id}: {e:?}"))
        .into_inner();
    (events, run)
}
