//! `deadbolt watch`: a run's events streamed until it ends.

use anyhow::Result;
use deadbolt_proto::v1 as pb;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{connect, get_run, run_line, status_error, Client};

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
    get_run(c, run_id).await
}

/// Prints the run's line; fails unless the run succeeded.
pub fn finished(r: &pb::Run) -> Result<()> {
    println!("{}", run_line(r));
    if r.status != pb::JobStatus::Succeeded as i32 {
        anyhow::bail!("run {} did not succeed: {}", r.id, r.error);
    }
    Ok(())
}

/// `deadbolt watch`: follows the run to its end; fails unless it
/// succeeded.
pub async fn follow(gateway: &str, run_id: &str, quiet: bool) -> Result<()> {
    let mut c = connect(gateway).await?;
    let r = watch(&mut c, run_id, quiet).await?;
    finished(&r)
}
