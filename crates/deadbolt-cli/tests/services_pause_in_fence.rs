//! A worker paused *inside* a fenced write (Postgres + S3, separate
//! processes; issue 18 §1). Both trainers run with the failpoint
//! `DEADBOLT_FAILPOINT=stop-before-commit:record_artifact` and one
//! once-file (`DEADBOLT_FAILPOINT_ONCE`): the first trainer about to commit
//! an artifact record (its transaction holds the job's row `FOR SHARE` and
//! has inserted the record) stops itself with SIGSTOP, deterministically,
//! as a GC pause or a stuck read would; the other goes on. Postgres ends
//! the stopped trainer's idle transaction (a third of the lease), so the
//! other trainer leases the job within two leases of being free to, and
//! the run finishes. Then the stopped trainer is resumed: its commit
//! fails, and nothing it writes lands.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use deadbolt_store::JobStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_before_its_commit_loses_the_job_within_a_lease() {
    let t0 = Instant::now();
    let lease = Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = tiny_spec(d, 2, 3000);
    let pg = Pg::fresh().await;
    let (moto, art_url) = s3_bucket("pause");
    let s3 = moto.config();
    let base = fault_config(d, pg.url(), &art_url, lease.as_secs_f64(), &s3);
    let once = d.join("failpoint-fired");
    let once = once.to_str().unwrap().to_string();
    let env = [
        ("DEADBOLT_FAILPOINT", "stop-before-commit:record_artifact"),
        ("DEADBOLT_FAILPOINT_ONCE", once.as_str()),
    ];
    let Cluster {
        others,
        trainers,
        gateway: gw,
    } = cluster(d, base, &env);
    let mut c = gateway(&gw.url("gateway")).await;
    let run_id = submit_toml(&mut c, &spec, "pause-1").await.run_id;
    let id: uuid::Uuid = run_id.parse().unwrap();
    let store = deadbolt_store::connect(pg.url()).await.unwrap();

    // the first trainer to write an artifact stops itself inside that
    // write; the other goes on
    let (z, paused_at) = wait_for(
        "a trainer to stop at the failpoint",
        Duration::from_secs(180),
        || {
            let stopped = trainers.iter().position(|t| t.state() == Some('T'));
            async move { stopped.map(|z| (z, Instant::now())) }
        },
    )
    .await;
    let (a, b) = (&trainers[z], &trainers[1 - z]);
    assert!(std::path::Path::new(&once).exists());
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
        .expect("the stopped trainer holds a job");
    assert_eq!(held.status, JobStatus::Leased);
    eprintln!(
        "{} stopped in a fenced write of {} after {:.1} s",
        a.name,
        held.stage,
        t0.elapsed().as_secs_f64()
    );

    // the other trainer takes the job within two leases of being free to (it may
    // be training the other model when the stopped trainer stops)
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
        "re-leased {:.2} s after the pause ({:.2} s after the other trainer was free)",
        paused_at.elapsed().as_secs_f64(),
        free_at.map_or(0.0, |f| f.elapsed().as_secs_f64())
    );
    assert_eq!(taken.leased_by.as_deref().and_then(pid_of), Some(b.pid()));

    let (_, run) = watch(&mut c, &run_id, Duration::from_secs(240)).await;
    assert_succeeded(&run, &b.log_tail());

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
    // no record of the job comes from the stopped trainer's attempt
    let prefix = format!("/jobs/{}/a1/", held.id.simple());
    for (name, (uri, _)) in &before {
        assert!(
            !uri.contains(&prefix),
            "{name}: {uri} is the paused attempt's"
        );
    }

    // resumed, the stopped trainer's commit fails and it stops its job
    a.signal("CONT");
    let log = wait_for(
        "the stopped trainer to notice",
        Duration::from_secs(30),
        || {
            let log = a.log_text();
            async move { log.contains("lease lost").then_some(log) }
        },
    )
    .await;
    assert!(!log.contains("job succeeded"), "{log}");
    // its attempt ends (the result dropped, or the outcome refused); every
    // write it tried on the way was refused
    wait_for(
        "the stopped trainer to end its attempt",
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
    drop(trainers);
    drop(others);
    pg.drop_db().await;
    eprintln!(
        "pause-in-fence test took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
