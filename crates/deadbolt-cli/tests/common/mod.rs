//! Helpers of the process-level service tests (from
//! `deadbolt-test-support`), bound to this crate's `deadbolt` binary.
#![allow(dead_code, unused_imports)]

use std::path::Path;

pub use deadbolt_test_support::fixture;
pub use deadbolt_test_support::pg::Pg;
pub use deadbolt_test_support::s3::Moto;
pub use deadbolt_test_support::serve::{
    channel, config, config_with, config_with_lease, gateway, internal, peers, pid_of, submit_toml,
    wait_for, watch, watch_logged, Proc,
};
pub use deadbolt_test_support::specs::{repo, tiny_spec, tiny_spec_local};
pub use deadbolt_test_support::upload;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_deadbolt")
}

/// `deadbolt serve --config <dir>/<name>.toml --services <services>`, once
/// every service printed its address.
pub fn serve(dir: &Path, name: &str, services: &str, config: &str) -> Proc {
    deadbolt_test_support::serve::serve(Path::new(bin()), dir, name, services, config)
}

/// [`serve`] with extra environment variables (e.g. a failpoint).
pub fn serve_env(
    dir: &Path,
    name: &str,
    services: &str,
    config: &str,
    env: &[(&str, &str)],
) -> Proc {
    deadbolt_test_support::serve::serve_env(Path::new(bin()), dir, name, services, config, env)
}

/// The separate-process cluster of the fault tests: the poisoner, analyzer
/// and pruner in one process (`others`), two trainers (`trainer-a`,
/// `trainer-b`, started with `trainer_env`) and a gateway calling them;
/// `base(name, extra)` is each process's config.
pub struct Cluster {
    pub others: Proc,
    pub trainers: Vec<Proc>,
    pub gateway: Proc,
}

/// The `base` of a fault test's [`cluster`]: each process gets a work
/// folder of its own (`<dir>/work-<name>`), the lease (heartbeats at a
/// sixth of it), the test's `extra` config (top-level keys first, then
/// tables such as `[s3]`) and the process's own (the gateway's `[peers]`).
pub fn fault_config<'a>(
    dir: &'a Path,
    database_url: &'a str,
    artifact_url: &'a str,
    lease_secs: f64,
    extra: &'a str,
) -> impl Fn(&str, &str) -> String + 'a {
    move |name, own| {
        let work = dir.join(format!("work-{name}"));
        std::fs::create_dir_all(&work).unwrap();
        config_with_lease(
            database_url,
            artifact_url,
            &work,
            lease_secs,
            &format!("{extra}\n{own}"),
        )
    }
}

/// A bucket of its own on the shared S3 server: the server and the
/// artifact URL `s3://<prefix>-<uuid>/<prefix>`.
pub fn s3_bucket(prefix: &str) -> (std::sync::Arc<Moto>, String) {
    let moto = Moto::shared();
    let bucket = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    moto.create_bucket(&bucket);
    (moto, format!("s3://{bucket}/{prefix}"))
}

/// The job of `stage` of run `id`, if it exists.
pub async fn job_of(
    store: &dyn deadbolt_store::MetadataStore,
    id: uuid::Uuid,
    stage: &str,
) -> Option<deadbolt_store::Job> {
    store
        .list_jobs(id)
        .await
        .unwrap()
        .into_iter()
        .find(|j| j.stage == stage)
}

/// Waits (2 minutes at most) until `artifact` of run `id` is recorded
/// while the clean model's training job is still leased; the pid of the
/// worker leasing it. A job no longer leased by then fails the test
/// (`"{what} too late"`: the fault would land after the training).
pub async fn train_clean_holder(
    store: &std::sync::Arc<dyn deadbolt_store::MetadataStore>,
    id: uuid::Uuid,
    artifact: &str,
    what: &str,
) -> u32 {
    wait_for(
        &format!("{artifact} of run {id}"),
        std::time::Duration::from_secs(120),
        || {
            let store = store.clone();
            async move {
                store.get_artifact(id, artifact).await.ok()?;
                let j = job_of(store.as_ref(), id, "train-clean").await?;
                assert_eq!(
                    j.status,
                    deadbolt_store::JobStatus::Leased,
                    "{what} too late: {j:?}"
                );
                pid_of(j.leased_by.as_deref()?)
            }
        },
    )
    .await
}

/// The index in `procs` of the process with pid `pid`.
pub fn index_of(procs: &[Proc], pid: u32) -> usize {
    procs
        .iter()
        .position(|p| p.pid() == pid)
        .unwrap_or_else(|| {
            panic!(
                "pid {pid} is none of {:?}",
                procs.iter().map(|p| &p.name).collect::<Vec<_>>()
            )
        })
}

pub fn cluster(
    dir: &Path,
    base: impl Fn(&str, &str) -> String,
    trainer_env: &[(&str, &str)],
) -> Cluster {
    let others = serve(
        dir,
        "others",
        "poisoner,analyzer,pruner",
        &base("others", ""),
    );
    let trainers: Vec<Proc> = ["trainer-a", "trainer-b"]
        .into_iter()
        .map(|name| serve_env(dir, name, "trainer", &base(name, ""), trainer_env))
        .collect();
    let peer_list = vec![
        ("poisoner", vec![others.url("poisoner")]),
        ("analyzer", vec![others.url("analyzer")]),
        ("pruner", vec![others.url("pruner")]),
        (
            "trainer",
            trainers.iter().map(|t| t.url("trainer")).collect(),
        ),
    ];
    let gateway = serve(
        dir,
        "gateway",
        "gateway",
        &base("gateway", &peers(&peer_list)),
    );
    Cluster {
        others,
        trainers,
        gateway,
    }
}

/// Every service in one `deadbolt serve` process (`all`), and the config
/// file it reads (`<dir>/all.toml`, for the CLI's `--config`).
pub fn serve_all(dir: &Path, config: &str) -> (Proc, std::path::PathBuf) {
    let all = serve(
        dir,
        "all",
        "poisoner,trainer,analyzer,pruner,gateway",
        config,
    );
    (all, dir.join("all.toml"))
}

/// `deadbolt --quiet ARGS...`; its stdout. Panics with stderr when it fails.
pub fn cli(args: &[&str]) -> String {
    cli_as(None, args)
}

/// [`cli`] presenting `key` in `DEADBOLT_API_KEY`.
pub fn cli_as(key: Option<&str>, args: &[&str]) -> String {
    let mut c = std::process::Command::new(bin());
    c.arg("--quiet").args(args);
    if let Some(k) = key {
        c.env("DEADBOLT_API_KEY", k);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "deadbolt {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// What an uninterrupted run of `tiny_spec_local(dir, epochs, 3000)` gives
/// (`experiment --direct` into `dir/reference`): the clean model's
/// per-epoch training losses and the report. The reference of the tests
/// that stop a training midway and resume it.
pub fn uninterrupted(dir: &Path, epochs: usize) -> (Vec<f64>, serde_json::Value) {
    let reference = dir.join("reference");
    cli(&[
        "experiment",
        "--direct",
        &tiny_spec_local(dir, epochs, 3000).to_string_lossy(),
        "--out",
        &reference.to_string_lossy(),
    ]);
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(reference.join(name)).unwrap()).unwrap()
    };
    let losses = read("clean/model.json")["metrics"]["train"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["loss"].as_f64().unwrap())
        .collect();
    (losses, read("report.json"))
}

/// The run succeeded; else the test fails with the run's error and
/// `context` (a log tail, the events).
pub fn assert_succeeded(run: &deadbolt_proto::v1::Run, context: &str) {
    assert_eq!(
        run.status,
        deadbolt_proto::v1::JobStatus::Succeeded as i32,
        "run {} did not succeed: {}\n{context}",
        run.id,
        run.error
    );
}

/// `n` records of an IDX file spread evenly over it (the files are sorted
/// by class), after its header of `header` bytes, records of `record`
/// bytes, with the count in the header rewritten.
pub fn cut_idx(src: &Path, header: usize, record: usize, n: usize) -> Vec<u8> {
    let b = std::fs::read(src).unwrap();
    let total = (b.len() - header) / record;
    let mut out = b[..header].to_vec();
    out[4..8].copy_from_slice(&(n as u32).to_be_bytes());
    for i in 0..n {
        let at = header + (i * total / n) * record;
        out.extend_from_slice(&b[at..at + record]);
    }
    out
}

/// The fields of a status's BadRequest violations.
pub fn field_of(st: &tonic::Status) -> Vec<String> {
    tonic_types::StatusExt::get_details_bad_request(st)
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// `deadbolt admin --config CFG ARGS...`; its last stdout line as JSON
/// (null when none). Panics with stderr when it fails.
pub fn admin(cfg: &Path, args: &[&str]) -> serde_json::Value {
    let cfg = cfg.display().to_string();
    let mut all = vec!["admin", "--config", &cfg];
    all.extend_from_slice(args);
    let text = cli(&all);
    serde_json::from_str(text.lines().last().unwrap_or("null")).unwrap_or(serde_json::Value::Null)
}

/// `admin key-create --team TEAM --name NAME --scopes SCOPES`: the new
/// key.
pub fn team_key(cfg: &Path, team: &str, name: &str, scopes: &str) -> String {
    admin(
        cfg,
        &[
            "key-create",
            "--team",
            team,
            "--name",
            name,
            "--scopes",
            scopes,
        ],
    )["key"]
        .as_str()
        .unwrap_or_else(|| panic!("admin key-create printed no key for team {team}"))
        .to_string()
}

pub type AddKey =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
pub type Keyed = deadbolt_proto::v1::experiment_service_client::ExperimentServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AddKey>,
>;

/// A gateway client that sends `key` as its bearer token (none: no
/// `authorization` header).
pub async fn as_key(url: &str, key: Option<&str>) -> Keyed {
    let header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
        key.map(|k| format!("Bearer {k}").parse().unwrap());
    let f: AddKey = Box::new(move |mut r| {
        if let Some(h) = &header {
            r.metadata_mut().insert("authorization", h.clone());
        }
        Ok(r)
    });
    deadbolt_proto::v1::experiment_service_client::ExperimentServiceClient::with_interceptor(
        channel(url).await,
        f,
    )
}

/// The four stage services in one `deadbolt serve` process (`stages`), and
/// the `[peers]` config of a gateway that calls them (over TLS when `tls`).
pub fn serve_stages(dir: &Path, config: &str, tls: bool) -> (Proc, String) {
    let stages = serve(dir, "stages", "poisoner,trainer,analyzer,pruner", config);
    let peer_list: Vec<(&str, Vec<String>)> = ["poisoner", "trainer", "analyzer", "pruner"]
        .iter()
        .map(|s| {
            let url = if tls {
                stages.url_tls(s)
            } else {
                stages.url(s)
            };
            (*s, vec![url])
        })
        .collect();
    let peer_config = peers(&peer_list);
    (stages, peer_config)
}
