//! Graceful drain (Postgres + S3, separate processes): a trainer gets
//! SIGTERM mid-training. It stops leasing, finishes and stores its current
//! epoch, releases the job without counting the attempt, removes its work
//! folder and exits; the other trainer resumes from the last epoch within
//! a few seconds (the lease is 20 s, so this is the release, not an
//! expiry), and the run's figures equal an uninterrupted run's.

mod common;

use std::time::{Duration, Instant};

use common::*;
use deadbolt_store::JobStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_trainer_hands_its_job_over_at_once() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = tiny_spec(d, 4, 3000);
    let pg = Pg::fresh().await;
    let (moto, art_url) = s3_bucket("drain");
    let extra = format!("drain_secs = 20.0\n{}", moto.config());
    let Cluster {
        others,
        mut trainers,
        gateway: gw,
    } = cluster(d, fault_config(d, pg.url(), &art_url, 20.0, &extra), &[]);
    let mut c = gateway(&gw.url("gateway")).await;
    let run_id = submit_toml(&mut c, &spec, "drain-1").await.run_id;
    let id: uuid::Uuid = run_id.parse().unwrap();
    let store = deadbolt_store::connect(pg.url()).await.unwrap();

    // epoch 1 of the clean model stored: SIGTERM its trainer
    let holder =
        train_clean_holder(&store, id, "clean/epoch-1/model.safetensors", "signalled").await;
    let victim = index_of(&trainers, holder);
    let survivor = trainers[1 - victim].pid();
    let signalled = Instant::now();
    trainers[victim].signal("TERM");
    let status = trainers[victim]
        .wait_exit(Duration::from_secs(40))
        .expect("the drained trainer exits");
    assert!(
        status.success(),
        "drained trainer exit status {status}: {}",
        trainers[victim].log_tail()
    );
    let drained_in = signalled.elapsed();
    // the other trainer takes the job well before the 20 s lease would
    // have expired
    wait_for(
        "the survivor to lease the job",
        Duration::from_secs(15),
        || {
            let store = store.clone();
            async move {
                let j = job_of(store.as_ref(), id, "train-clean").await?;
                (j.leased_by.as_deref().and_then(pid_of) == Some(survivor)).then_some(())
            }
        },
    )
    .await;
    let taken_over_in = signalled.elapsed();
    assert!(
        taken_over_in < Duration::from_secs(12),
        "takeover after {taken_over_in:?}: not the release"
    );
    let log = trainers[victim].log_text();
    assert!(log.contains("released"), "{log}");
    let leftover: Vec<_> =
        std::fs::read_dir(d.join(format!("work-trainer-{}", ["a", "b"][victim])))
            .unwrap()
            .collect();
    assert!(leftover.is_empty(), "work folders left: {leftover:?}");

    let (events, run) = watch(&mut c, &run_id, Duration::from_secs(240)).await;
    assert_succeeded(&run, &trainers[1 - victim].log_tail());
    assert!(events
        .iter()
        .any(|e| e.stage == "train-clean" && e.kind == "released"));
    let job = job_of(store.as_ref(), id, "train-clean").await.unwrap();
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(
        job.attempts, 1,
        "the drained attempt is not counted: {job:?}"
    );
    let result = job.result.unwrap();
    assert!(result["resumed_from"].as_u64().unwrap() >= 1, "{result}");

    // the figures of an uninterrupted run
    let (want, report) = uninterrupted(d, 4);
    let mut losses: Vec<(i64, f64)> = store
        .list_metrics(id)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.stage == "train-clean" && m.name == "train_loss")
        .map(|m| (m.step, m.value))
        .collect();
    losses.sort_by_key(|l| l.0);
    assert_eq!(
        losses.iter().map(|l| l.1).collect::<Vec<_>>(),
        want,
        "per-epoch training loss, drained and resumed vs uninterrupted"
    );
    let summary = store.run_summary(id).await.unwrap();
    assert_eq!(summary.clean_acc, report["clean_model"]["acc"].as_f64());
    assert_eq!(
        summary.backdoored_asr,
        report["backdoored_model"]["asr"].as_f64()
    );
    drop(gw);
    drop(trainers);
    drop(others);
    pg.drop_db().await;
    eprintln!(
        "drain test: exited {:.1} s and taken over {:.1} s after SIGTERM; took {:.1} s",
        drained_in.as_secs_f64(),
        taken_over_in.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
