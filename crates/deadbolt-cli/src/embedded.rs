//! `deadbolt experiment` (embedded): every service in this process on
//! loopback, SQLite and the local artifact store under `OUT/.deadbolt`,
//! the spec submitted, watched and downloaded over gRPC as a remote
//! client would.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use deadbolt_core::pipeline::report::Report;
use deadbolt_proto::v1 as pb;
use deadbolt_runtime::config::ServiceKind;
use deadbolt_runtime::{Config, Shared};

use crate::client::{self, download, submit, watch};
use crate::serve;

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
    let running = serve::start(&shared, &ServiceKind::ALL).await?;
    let url = format!("http://{}", running.addrs[&ServiceKind::Gateway]);
    let mut c = client::connect(&url).await?;
    let submitted = submit::submit(&mut c, spec, None).await?;
    tracing::info!(run_id = %submitted.run_id, gateway = %url, "experiment submitted");
    let run = watch::watch(&mut c, &submitted.run_id, quiet).await?;
    if run.status != pb::JobStatus::Succeeded as i32 {
        bail!(
            "run {} ended {:?}: {}",
            run.id,
            pb::JobStatus::try_from(run.status).unwrap_or_default(),
            run.error
        );
    }
    let report = download::download_report(&mut c, &run, out, true).await?;
    drop(running);
    tracing::info!(seconds = t0.elapsed().as_secs_f64(), run_id = %run.id, "experiment done");
    Ok(report)
}
