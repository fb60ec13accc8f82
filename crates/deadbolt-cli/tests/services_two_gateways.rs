//! Two gateway replicas on one metadata store (Postgres + S3, separate
//! processes): the one that took a run's drive is killed with SIGKILL
//! mid-run; the other claims the run once the dead driver's lease expired
//! and finishes it. The run's events show one driver at a time, and no
//! stage ran twice (every stage job has one attempt).

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_takes_over_a_dead_gateways_run() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = tiny_spec(d, 3, 3000);
    let pg = Pg::fresh().await;
    let (moto, art_url) = s3_bucket("gw");
    let s3 = moto.config();
    let base = fault_config(d, pg.url(), &art_url, 3.0, &s3);
    let (stages, peer_config) = serve_stages(d, &base("stages", ""), false);
    let mut gws = vec![
        serve(d, "gateway-1", "gateway", &base("g1", &peer_config)),
        serve(d, "gateway-2", "gateway", &base("g2", &peer_config)),
    ];

    let mut c1 = gateway(&gws[0].url("gateway")).await;
    let run_id = submit_toml(&mut c1, &spec, "two-gateways").await.run_id;
    let id: uuid::Uuid = run_id.parse().unwrap();
    let store = deadbolt_store::connect(pg.url()).await.unwrap();
    // whichever replica claimed the drive (the submitting one, or the
    // other's claim loop, a moment earlier) is killed once training started
    let driver = wait_for("the run to train", Duration::from_secs(120), || {
        let store = store.clone();
        async move {
            let run = store.get_run(id).await.unwrap();
            let training = store
                .list_jobs(id)
                .await
                .unwrap()
                .iter()
                .any(|j| j.stage == "train-clean");
            if training {
                run.driver_id
            } else {
                None
            }
        }
    })
    .await;
    let dead = gws
        .iter()
        .position(|g| Some(g.pid()) == pid_of(&driver))
        .unwrap_or_else(|| panic!("{driver} is not one of the gateways"));
    let g1_pid = gws[dead].pid();
    gws[dead].kill();
    let killed = Instant::now();
    let g2 = gws.remove(1 - dead);

    let mut c2 = gateway(&g2.url("gateway")).await;
    let (events, run) = watch(&mut c2, &run_id, Duration::from_secs(240)).await;
    assert_succeeded(&run, &g2.log_tail());
    let drivers: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "driver")
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(drivers.len(), 2, "{drivers:?}");
    assert!(drivers[0].contains(&format!("-{g1_pid}-")), "{drivers:?}");
    assert!(
        drivers[1].contains(&format!("-{}-", g2.pid())),
        "{drivers:?}"
    );
    // one driver at a time: nothing from the first after the second claimed
    let second = events
        .iter()
        .position(|e| e.kind == "driver" && e.message.contains(&format!("-{}-", g2.pid())))
        .unwrap();
    assert!(!events[second..]
        .iter()
        .any(|e| e.message.contains(&format!("-{g1_pid}-"))));
    // no stage ran twice
    for j in store.list_jobs(id).await.unwrap() {
        assert_eq!(j.attempts, 1, "{} ran {} times", j.stage, j.attempts);
    }
    drop(g2);
    drop(gws);
    drop(stages);
    pg.drop_db().await;
    eprintln!(
        "two-gateway test: finished {:.1} s after the kill; took {:.1} s",
        killed.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
