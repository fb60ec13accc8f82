//! `deadbolt submit` and `deadbolt submit-scan`: a run handed to the
//! gateway (and with `submit --watch`, followed to its end).

use std::path::Path;

use anyhow::{Context, Result};
use deadbolt_proto::v1 as pb;

use super::{connect, status_error, watch, Client};
use crate::args::SubmitScanArgs;

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

/// The line `submit` and `submit-scan` print: the run's id, and whether
/// this request created it (false: an earlier one with its request id did).
fn print_submitted(run_id: &str, created: bool) {
    println!(
        "{}",
        serde_json::json!({ "run_id": run_id, "created": created })
    );
}

/// `deadbolt submit`: prints the run id; with `follow`, then watches the
/// run to its end on the same connection and fails unless it succeeded.
pub async fn submit_spec(
    gateway: &str,
    spec: &Path,
    request_id: Option<String>,
    follow: bool,
    quiet: bool,
) -> Result<()> {
    let mut c = connect(gateway).await?;
    let r = submit(&mut c, spec, request_id).await?;
    print_submitted(&r.run_id, r.created);
    if follow {
        let run = watch::watch(&mut c, &r.run_id, quiet).await?;
        watch::finished(&run)?;
    }
    Ok(())
}

/// `deadbolt submit-scan`: a scan (and repair) of an uploaded model;
/// prints the run id.
pub async fn submit_scan(args: SubmitScanArgs) -> Result<()> {
    let SubmitScanArgs {
        model,
        data,
        repair,
        options,
        name,
        gateway,
        request_id,
    } = args;
    let options_toml = match options {
        Some(p) => std::fs::read_to_string(&p)
            .with_context(|| format!("reading --options {}", p.display()))?,
        None => String::new(),
    };
    let mut c = connect(&gateway).await?;
    let r = c
        .submit_scan(pb::SubmitScanRequest {
            client_request_id: request_id.unwrap_or_default(),
            model,
            data,
            repair,
            options_toml,
            name: name.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    print_submitted(&r.run_id, r.created);
    Ok(())
}
