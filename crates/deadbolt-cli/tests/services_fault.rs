//! A trainer dies mid-training (SIGKILL after epoch 1's checkpoint is
//! complete: its sidecar, recorded last, is stored); a second trainer, already running, leases the job once the
//! 3 s lease expires, resumes from the last epoch checkpoint (weights and
//! optimizer state), and the run completes with no lost or duplicated rows
//! and exactly the figures of an uninterrupted run.

mod common;

use std::time::{Duration, Instant};

use common::*;
use deadbolt_store::JobStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_trainer_is_replaced_and_the_job_resumes_from_its_checkpoint() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = tiny_spec(d, 3, 3000);
    let pg = Pg::fresh().await;
    let art_url = d.join("artifacts").display().to_string();
    let Cluster {
        others,
        mut trainers,
        gateway: gw,
    } = cluster(d, fault_config(d, pg.url(), &art_url, 3.0, ""), &[]);
    let mut c = gateway(&gw.url("gateway")).await;
    let run_id = submit_toml(&mut c, &spec, "fault-1").await.run_id;
    let id: uuid::Uuid = run_id.parse().unwrap();
    let store = deadbolt_store::connect(pg.url()).await.unwrap();

    // wait for epoch 1's complete checkpoint of the clean model (its
    // sidecar is recorded last: a checkpoint without one is not resumed
    // from), then kill its trainer
    let holder = train_clean_holder(&store, id, "clean/epoch-1/model.json", "killed").await;
    let victim = index_of(&trainers, holder);
    trainers[victim].kill();
    let survivor = trainers[1 - victim].pid();
    eprintln!(
        "killed {} after {:.1} s",
        trainers[victim].name,
        t0.elapsed().as_secs_f64()
    );

    let (_events, run) = watch(&mut c, &run_id, Duration::from_secs(240)).await;
    assert_succeeded(&run, &trainers[1 - victim].log_tail());
    let job = job_of(store.as_ref(), id, "train-clean").await.unwrap();
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(job.attempts, 2, "{job:?}");
    assert!(job
        .leased_by
        .as_ref()
        .unwrap()
        .contains(&format!("-{survivor}-")));
    let result = job.result.unwrap();
    assert!(result["resumed_from"].as_u64().unwrap() >= 1, "{result}");
    assert_eq!(result["attempt"], 2);
    assert!(result["epochs"].as_array().unwrap().len() <= 2, "{result}");

    // no lost or duplicated rows
    let pool = sqlx::PgPool::connect(pg.url()).await.unwrap();
    let dup_metrics: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT stage, name, step FROM metrics WHERE run_id = $1 \
         GROUP BY stage, name, step HAVING count(*) > 1) d",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(dup_metrics, 0);
    let steps: Vec<i64> = sqlx::query_scalar(
        "SELECT step FROM metrics WHERE run_id = $1 AND stage = 'train-clean' AND name = 'train_loss' ORDER BY step",
    )
    .bind(id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(steps, [1, 2, 3], "one loss row per epoch, none lost");
    let dup_points: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT criterion, k FROM pruning_curves_v WHERE run_id = $1 \
         GROUP BY criterion, k HAVING count(*) > 1) d",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(dup_points, 0);
    let curves = store.list_pruning_curves(id).await.unwrap();
    assert_eq!(curves.len(), 3);
    for c in &curves {
        let ks: Vec<i64> = c.points.iter().map(|p| p.k).collect();
        assert_eq!(
            ks,
            (0..ks.len() as i64).collect::<Vec<_>>(),
            "{}",
            c.criterion
        );
    }
    let summary = store.run_summary(id).await.unwrap();
    assert!(summary.clean_acc.is_some() && summary.linf.is_some());

    // exactly what an uninterrupted run gives: the same per-epoch losses
    // (the resumed epochs included) and the same test accuracy
    let (want, report) = uninterrupted(d, 3);
    let losses: Vec<f64> = sqlx::query_scalar(
        "SELECT value FROM metrics WHERE run_id = $1 AND stage = 'train-clean' AND name = 'train_loss' ORDER BY step",
    )
    .bind(id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        losses, want,
        "per-epoch training loss, resumed vs uninterrupted"
    );
    assert_eq!(summary.clean_acc, report["clean_model"]["acc"].as_f64());
    pool.close().await;
    drop(gw);
    drop(trainers);
    drop(others);
    pg.drop_db().await;
    eprintln!("fault test took {:.1} s", t0.elapsed().as_secs_f64());
}
