//! Runs in flight continue across a gateway restart: the gateway is killed
//! (SIGKILL) while a run trains; a new gateway claims the run's drive once
//! the dead gateway's lease expired, re-calls the stages (finished ones answer from their jobs,
//! the running one is waited on) and the run completes without redoing work.

mod common;

use std::time::{Duration, Instant};

use common::*;
use deadbolt_store::JobStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_gateway_resumes_runs_in_flight() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = tiny_spec(d, 2, 2400);
    let db = format!("sqlite://{}", d.join("meta.db").display());
    let art = d.join("artifacts").display().to_string();
    std::fs::create_dir_all(d.join("work")).unwrap();
    let (_stages, peer_config) = serve_stages(d, &config(&db, &art, &d.join("work"), ""), false);
    let gw_config = config(&db, &art, &d.join("work"), &peer_config);
    let mut gw1 = serve(d, "gateway-1", "gateway", &gw_config);
    let mut c = gateway(&gw1.url("gateway")).await;
    let run_id = submit_toml(&mut c, &spec, "restart-1").await.run_id;
    let id: uuid::Uuid = run_id.parse().unwrap();
    let store = deadbolt_store::connect(&db).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "training never started");
        let jobs = store.list_jobs(id).await.unwrap();
        if jobs
            .iter()
            .any(|j| j.stage == "train-clean" && j.status == JobStatus::Leased)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw1.kill();
    let gw2 = serve(d, "gateway-2", "gateway", &gw_config);
    let mut c = gateway(&gw2.url("gateway")).await;
    let (events, run) = watch(&mut c, &run_id, Duration::from_secs(180)).await;
    assert_succeeded(&run, &gw2.log_tail());
    // the data stage was called by both gateways (two "started" events)
    let data_started = events
        .iter()
        .filter(|e| e.stage == "data" && e.kind == "started")
        .count();
    assert_eq!(data_started, 2, "the new gateway walked the stages again");
    for j in store.list_jobs(id).await.unwrap() {
        assert_eq!(
            (j.status, j.attempts),
            (JobStatus::Succeeded, 1),
            "{}",
            j.stage
        );
    }
    eprintln!(
        "gateway restart test took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
