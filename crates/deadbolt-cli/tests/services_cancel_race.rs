//! Cancel races (Postgres + S3, separate processes): 50 submit/cancel
//! pairs at offsets spread over the duration of a first run. Every run whose cancel
//! was accepted ends cancelled and stays cancelled (the driver's final
//! status is compare-and-set in SQL, so it cannot flip it back); a cancel
//! that came after the run ended answers FAILED_PRECONDITION; cancelling a
//! finished run answers FAILED_PRECONDITION, and `deadbolt cancel` says so.

mod common;

use std::time::{Duration, Instant};

use common::*;
use deadbolt_proto::v1 as pb;
use tonic::Code;

const PAIRS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_runs_stay_cancelled_and_finished_runs_cannot_be_cancelled() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = tiny_spec(d, 1, 600);
    let pg = Pg::fresh().await;
    let (moto, art_url) = s3_bucket("race");
    let work = d.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let all = serve_all(d, &config(pg.url(), &art_url, &work, &moto.config())).0;
    let mut c = gateway(&all.url("gateway")).await;

    // a finished run cannot be cancelled
    let started = Instant::now();
    let done = submit_toml(&mut c, &spec, "race-finished").await.run_id;
    let (_, run) = watch(&mut c, &done, Duration::from_secs(180)).await;
    // how long a run takes here: the cancels are spread over it,
    // so that most land while a run is going and some after it ended,
    // however fast this machine and build are
    let span = started.elapsed();
    assert_eq!(
        run.status,
        pb::JobStatus::Succeeded as i32,
        "{}",
        all.log_tail()
    );
    let e = c
        .cancel_experiment(pb::CancelExperimentRequest {
            run_id: done.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let out = std::process::Command::new(bin())
        .args(["cancel", &done, "--gateway", &all.url("gateway")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("FailedPrecondition"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // submit/cancel pairs at varied offsets
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..PAIRS {
        let id = submit_toml(&mut c, &spec, &format!("race-{i}"))
            .await
            .run_id;
        let offset = span.mul_f64(((i * 37) % PAIRS) as f64 / PAIRS as f64);
        tokio::time::sleep(offset).await;
        match c
            .cancel_experiment(pb::CancelExperimentRequest { run_id: id.clone() })
            .await
        {
            Ok(r) => {
                assert_eq!(r.get_ref().status, pb::JobStatus::Cancelled as i32);
                accepted.push(id);
            }
            Err(e) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                refused += 1;
            }
        }
    }
    assert!(
        accepted.len() >= PAIRS / 2,
        "most cancels land while the run is going"
    );
    // every accepted cancel ends cancelled, and stays so once the drivers
    // and workers have wound down
    for id in &accepted {
        let (_, run) = watch(&mut c, id, Duration::from_secs(60)).await;
        assert_eq!(run.status, pb::JobStatus::Cancelled as i32, "run {id}");
    }
    let store = deadbolt_store::connect(pg.url()).await.unwrap();
    wait_for("every job to settle", Duration::from_secs(60), || {
        let store = store.clone();
        async move {
            let runs = store.list_runs(None, 500, 0).await.unwrap();
            let mut busy = false;
            for r in runs {
                busy |= store
                    .list_jobs(r.id)
                    .await
                    .unwrap()
                    .iter()
                    .any(|j| j.status == deadbolt_store::JobStatus::Leased);
            }
            (!busy).then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for id in &accepted {
        let run = store.get_run(id.parse().unwrap()).await.unwrap();
        assert_eq!(
            run.status,
            deadbolt_store::RunStatus::Cancelled,
            "run {id} flipped back"
        );
    }
    drop(all);
    pg.drop_db().await;
    eprintln!(
        "{PAIRS} pairs, cancels over {:.1} s: {} cancelled, {refused} already finished; took {:.1} s",
        span.as_secs_f64(),
        accepted.len(),
        t0.elapsed().as_secs_f64()
    );
}
