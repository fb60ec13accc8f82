//! `deadbolt runs` and `deadbolt cancel`: the caller's runs listed, one
//! cancelled.

use anyhow::Result;
use deadbolt_proto::v1 as pb;

use super::{connect, run_line, status_error};

/// `deadbolt runs`: one line per run, newest first.
pub async fn list(gateway: &str, limit: u32) -> Result<()> {
    let mut c = connect(gateway).await?;
    let runs = c
        .list_experiments(pb::ListExperimentsRequest {
            page_size: limit,
            page_token: String::new(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .runs;
    for r in &runs {
        println!("{}", run_line(r));
    }
    Ok(())
}

/// `deadbolt cancel`: prints the cancelled run.
pub async fn cancel(gateway: &str, run_id: &str) -> Result<()> {
    let mut c = connect(gateway).await?;
    let r = c
        .cancel_experiment(pb::CancelExperimentRequest {
            run_id: run_id.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!("{}", run_line(&r));
    Ok(())
}
