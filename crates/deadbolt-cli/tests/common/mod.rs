//! Helpers of the process-level service tests: the tiny spec, `deadbolt
//! serve` child processes on loopback ephemeral ports, a fresh Postgres
//! database, and a `moto_server` S3.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::experiment_service_client::ExperimentServiceClient;
use futures::StreamExt;
use tonic::transport::Channel;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_deadbolt")
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The tiny spec (tests/tiny.toml) with the absolute data path, `epochs`
/// and `train_limit`, written into `dir`.
pub fn tiny_spec(dir: &Path, epochs: usize, train_limit: usize) -> PathBuf {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tiny.toml"))
            .unwrap()
            .replace(
                "kind = \"mnist\"",
                &format!(
                    "kind = \"mnist\"\npath = \"{}\"",
                    repo().join("data/mnist").display()
                ),
            )
            .replace("epochs = 1", &format!("epochs = {epochs}"))
            .replace(
                "train_limit = 1200",
                &format!("train_limit = {train_limit}"),
            );
    let p = dir.join(format!("spec-{epochs}-{train_limit}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

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
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
/// and waits until every service printed its address.
pub fn serve(dir: &Path, name: &str, services: &str, config: &str) -> Proc {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, config).unwrap();
    let log = dir.join(format!("{name}.log"));
    let mut child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--services", services])
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
    while addrs.len() < want.len() {
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

/// Config TOML for a service process (`extra` is appended).
pub fn config(database_url: &str, artifact_url: &str, work: &Path, extra: &str) -> String {
    format!(
        "database_url = \"{database_url}\"\nartifact_url = \"{artifact_url}\"\nwork_dir = \"{}\"\nlease_secs = 3.0\nheartbeat_secs = 0.5\npoll_ms = 100\nmax_attempts = 3\n{extra}\n[listen]\npoisoner = \"127.0.0.1:0\"\ntrainer = \"127.0.0.1:0\"\nanalyzer = \"127.0.0.1:0\"\npruner = \"127.0.0.1:0\"\ngateway = \"127.0.0.1:0\"\n",
        work.display()
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

/// A fresh Postgres database; dropped (best effort) with the guard.
pub struct Pg {
    pub url: String,
    admin: String,
    db: String,
}

impl Pg {
    pub async fn fresh() -> Pg {
        let admin = std::env::var("DEADBOLT_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let pool = sqlx::PgPool::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("cannot reach Postgres at {admin} ({e})"));
        let db = format!("deadbolt_svc_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let mut url = url::Url::parse(&admin).unwrap();
        url.set_path(&format!("/{db}"));
        Pg {
            url: url.to_string(),
            admin,
            db,
        }
    }

    pub async fn drop_db(&self) {
        if let Ok(pool) = sqlx::PgPool::connect(&self.admin).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.db
            )))
            .execute(&pool)
            .await;
        }
    }
}

/// A moto_server child process (S3 on loopback), killed on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(port: u16, req: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(req.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

impl Moto {
    /// Starts moto_server ($DEADBOLT_VENV/bin or PATH) and creates `bucket`.
    pub fn start(bucket: &str) -> Moto {
        let venv = std::env::var_os("DEADBOLT_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var("HOME").unwrap())
                    .join(".cache/deadbolt/venv-torch-2.13.0")
            });
        let bin = [venv.join("bin/moto_server")]
            .into_iter()
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("moto_server"));
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}); run scripts/setup-test-deps.sh",
                    bin.display()
                )
            });
        let m = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(
            port,
            &format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"),
        )
        .map(|r| !r.starts_with("HTTP/1."))
        .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let r = http(
            port,
            &format!("PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        )
        .unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "create bucket: {r}");
        m
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `[s3]` config table.
    pub fn config(&self) -> String {
        format!(
            "[s3]\nendpoint = \"{}\"\nallow_http = true\nregion = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n",
            self.endpoint()
        )
    }

    pub fn options(&self) -> deadbolt_store::S3Options {
        deadbolt_store::S3Options {
            endpoint: Some(self.endpoint()),
            allow_http: Some(true),
            region: Some("us-east-1".into()),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
        }
    }
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

/// Watches a run to its end; returns the events and the final run.
pub async fn watch(
    c: &mut ExperimentServiceClient<Channel>,
    run_id: &str,
    timeout: Duration,
) -> (Vec<pb::RunEvent>, pb::Run) {
    let mut s = c
        .watch_experiment(pb::WatchExperimentRequest {
            run_id: run_id.into(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    tokio::time::timeout(timeout, async {
        while let Some(e) = s.next().await {
            events.push(e.unwrap());
        }
    })
    .await
    .unwrap_or_else(|_| panic!("run {run_id} did not finish within {timeout:?}"));
    let run = c
        .get_experiment(pb::GetExperimentRequest {
            run_id: run_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    (events, run)
}
