//! A worker paused *inside* a fenced write (Postgres + S3, separate
//! processes; issue 18 §1). trainer-a runs with the failpoint
//! `DEADBOLT_FAILPOINT=stop-before-commit:record_artifact`: the first time
//! it is about to commit an artifact record (its transaction holds the
//! job's row `FOR SHARE` and has inserted the record) it stops itself with
//! SIGSTOP, deterministically, as a GC pause or a stuck read would. Postgres
//! ends its idle transaction (a third of the lease), so trainer-b leases the
//! job within two leases of being free to, and the run finishes. Then
//! trainer-a is resumed: its commit fails, and nothing it writes lands.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use deadbolt_proto::v1 as pb;
use deadbolt_store::JobStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_before_its_commit_loses_the_job_within_a_lease() {
    let t0 = Instant::now();
    let lease = Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = tiny_spec(d, 2, 3000);
    let pg = Pg::fresh().await;
    let moto = Moto::shared();
    let bucket = format!("pause-{}", uuid::Uuid::new_v4().simple());
    moto.create_bucket(&bucket);
    let art_url = format!("s3://{bucket}/pause");
    let base = |name: &str, extra: &str| {
        let work = d.join(format!("work-{name}"));
        std::fs::create_dir_all(&work).unwrap();
        config_with_lease(
            pg.url(),
            &art_url,
            &work,
            lease.as_secs_f64(),
            &format!("{extra}\n{}", moto.config()),
        )
    };
    let others = serve(d, "others", "poisoner,analyzer,pruner", &base("others", ""));
    let a = serve_env(
        d,
        "trainer-a",
        "trainer",
        &base("trainer-a", ""),
        &[("DEADBOLT_FAILPOINT", "stop-before-commit:record_artifact")],
    );
    let b = serve(d, "trainer-b", "trainer", &base("trainer-b", ""));
    let peer_list = vec![
        ("poisoner", vec![others.url("poisoner")]),
        ("analyzer", vec![others.url("analyzer")]),
        ("pruner", vec![others.url("pruner")]),
        ("trainer", vec![a.url("trainer"), b.url("trainer")]),
    ];
    let gw = serve(
        d,
        "gateway",
        "gateway",
        &base("gateway", &peers(&peer_list)),
    );
    let mut c = gateway(&gw.url("gateway")).await;
    let run_id = submit_toml(&mut c, &spec, "pause-1").await.run_id;
    let id: uuid::Uuid = run_id.parse().unwrap();
    let store = deadbolt_store::connect(pg.url()).await.unwrap();

    // trainer-a stops itself inside its first artifact write
    let paused_at = wait_for(
        "trainer-a to stop at the failpoint",
        Duration::from_secs(180),
        || {
            let stopped = a.state() == Some('T');
            async move { stopped.then(Instant::now) }
        },
    )
    .await;
    assert!(
        a.log_text().contains("failpoint: stopping this process"),
        "{}",
        a.log_tail()
    );
    let held = store
        .list_jobs(id)
        .await
        .unwrap()
        .into_iter()
        .find(|j| j.leased_by.as_deref().and_then(pid_of) == Some(a.pid()))
        .expect("trainer-a holds a job");
    assert_eq!(held.status, JobStatus::Leased);
    eprintln!(
        "trainer-a stopped in a fenced write of {} after {:.1} s",
        held.stage,
        t0.elapsed().as_secs_f64()
    );

    // trainer-b takes the job within two leases of being free to (it may
    // be training the other model when trainer-a stops)
    let mut free_at: Option<Instant> = None;
    let taken = loop {
        let jobs = store.list_jobs(id).await.unwrap();
        let j = jobs.iter().find(|j| j.id == held.id).unwrap();
        if j.attempts >= 2 {
            break j.clone();
        }
        let b_busy = jobs.iter().any(|j| {
            j.status == JobStatus::Leased
                && j.leased_by.as_deref().and_then(pid_of) == Some(b.pid())
        });
        if !b_busy && free_at.is_none() {
            free_at = Some(Instant::now());
        }
        if let Some(f) = free_at {
            let since = f.max(paused_at);
            assert!(
                since.elapsed() < 2 * lease,
                "the job was not leased again within two leases: {j:?}\n{}",
                b.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "re-leased {:.2} s after the pause ({:.2} s after trainer-b was free)",
        paused_at.elapsed().as_secs_f64(),
        free_at.map_or(0.0, |f| f.elapsed().as_secs_f64())
    );
    assert_eq!(taken.leased_by.as_deref().and_then(pid_of), Some(b.pid()));

    let (_, run) = watch(&mut c, &run_id, Duration::from_secs(240)).await;
    assert_eq!(
        run.status,
        pb::JobStatus::Succeeded as i32,
        "run failed: {}\n{}",
        run.error,
        b.log_tail()
    );

    let records = || async {
        store
            .list_artifacts(id)
            .await
            .unwrap()
            .into_iter()
            .map(|a| (a.name, (a.uri, a.sha256)))
            .collect::<BTreeMap<String, (String, String)>>()
    };
    let before = records().await;
    // no record of the job comes from trainer-a's attempt
    let prefix = format!("/jobs/{}/a1/", held.id.simple());
    for (name, (uri, _)) in &before {
        assert!(
            !uri.contains(&prefix),
            "{name}: {uri} is the paused attempt's"
        );
    }

    // resumed, trainer-a's commit fails and it stops its job
    a.signal("CONT");
    let log = wait_for("trainer-a to notice", Duration::from_secs(30), || {
        let log = a.log_text();
        async move { log.contains("lease lost").then_some(log) }
    })
    .await;
    assert!(!log.contains("job succeeded"), "{log}");
    // its attempt ends (the result dropped, or the outcome refused); every
    // write it tried on the way was refused
    wait_for(
        "trainer-a to end its attempt",
        Duration::from_secs(60),
        || {
            let log = a.log_text();
            async move {
                (log.contains("result dropped") || log.contains("could not record the job outcome"))
                    .then_some(())
            }
        },
    )
    .await;
    let after = records().await;
    assert_eq!(before, after, "artifact records changed after SIGCONT");
    drop(gw);
    drop((a, b, others));
    pg.drop_db().await;
    eprintln!(
        "pause-in-fence test took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
