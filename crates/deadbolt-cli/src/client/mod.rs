//! The gateway's clients: every command that talks to a gateway over
//! gRPC (`submit`, `submit-scan`, `watch`, `runs`, `cancel`, `upload`,
//! `uploads`, `report`). None of them needs libtorch.

pub mod download;
pub mod runs;
pub mod submit;
pub mod uploads;
pub mod watch;

use std::path::Path;

use anyhow::{Context, Result};
use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::experiment_service_client::ExperimentServiceClient;
use deadbolt_runtime::auth::WithBearer;
use tonic::transport::Channel;

/// A gateway client. It presents the API key of `DEADBOLT_API_KEY`, or of
/// the file named by `DEADBOLT_API_KEY_FILE` (keys never go on the command
/// line, where shell history would keep them).
pub type Client = ExperimentServiceClient<WithBearer<Channel>>;

pub async fn connect(url: &str) -> Result<Client> {
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

/// The run as the gateway has it now.
pub async fn get_run(c: &mut Client, run_id: &str) -> Result<pb::Run> {
    Ok(c.get_experiment(pb::GetExperimentRequest {
        run_id: run_id.to_string(),
    })
    .await
    .map_err(status_error)?
    .into_inner())
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
