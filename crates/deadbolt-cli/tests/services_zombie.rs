//! A zombie writer (Postgres + S3, separate processes): the trainer holding
//! the clean model's job is paused with SIGSTOP past its 2 s lease; the
//! other trainer takes the job over, resumes from the last stored epoch and
//! the run completes. Then the paused trainer is resumed with SIGCONT: it
//! finds its lease gone, its late writes are refused (fenced by the lease),
//! and every artifact record and row of the run stays the winner's, with
//! every object's checksum verified on read.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use deadbolt_store::ArtifactStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_trainer_cannot_overwrite_the_winner() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = tiny_spec(d, 4, 3000);
    let pg = Pg::fresh().await;
    let (moto, art_url) = s3_bucket("zombie");
    let s3 = moto.config();
    let Cluster {
        others,
        trainers,
        gateway: gw,
    } = cluster(d, fault_config(d, pg.url(), &art_url, 2.0, &s3), &[]);
    let mut c = gateway(&gw.url("gateway")).await;
    let run_id = submit_toml(&mut c, &spec, "zombie-1").await.run_id;
    let id: uuid::Uuid = run_id.parse().unwrap();
    let store = deadbolt_store::connect(pg.url()).await.unwrap();

    let holder = train_clean_holder(&store, id, "clean/epoch-1/model.safetensors", "paused").await;
    let z = index_of(&trainers, holder);
    trainers[z].signal("STOP");
    eprintln!(
        "paused {} after {:.1} s",
        trainers[z].name,
        t0.elapsed().as_secs_f64()
    );

    let (_, run) = watch(&mut c, &run_id, Duration::from_secs(240)).await;
    assert_succeeded(&run, &trainers[1 - z].log_tail());
    let job = job_of(store.as_ref(), id, "train-clean").await.unwrap();
    assert_eq!(job.attempts, 2, "{job:?}");
    assert_eq!(
        job.leased_by.as_deref().and_then(pid_of),
        Some(trainers[1 - z].pid())
    );

    // what the winner left, before the zombie wakes up
    let records = |store: std::sync::Arc<dyn deadbolt_store::MetadataStore>| async move {
        let arts: BTreeMap<String, (String, String)> = store
            .list_artifacts(id)
            .await
            .unwrap()
            .into_iter()
            .map(|a| (a.name, (a.uri, a.sha256)))
            .collect();
        let mut metrics: Vec<(String, String, i64, u64)> = store
            .list_metrics(id)
            .await
            .unwrap()
            .into_iter()
            .map(|m| (m.stage, m.name, m.step, m.value.to_bits()))
            .collect();
        metrics.sort();
        (arts, metrics)
    };
    let before = records(store.clone()).await;

    trainers[z].signal("CONT");
    let log = wait_for("the zombie to notice", Duration::from_secs(30), || {
        let log = trainers[z].log_text();
        async move { log.contains("lease lost").then_some(log) }
    })
    .await;
    // give a late write every chance to land
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = records(store.clone()).await;
    assert_eq!(before.0, after.0, "artifact records changed after SIGCONT");
    assert_eq!(before.1, after.1, "metrics changed after SIGCONT");
    assert!(!log.contains("job succeeded"), "{log}");

    // the final clean model is the winner's object, and every recorded
    // object reads back with its recorded checksum
    let (uri, _) = &after.0["clean/model.safetensors"];
    assert!(
        uri.contains(&format!("/jobs/{}/a2/", job.id.simple())),
        "{uri}"
    );
    let s3 = ArtifactStore::from_url_with(&art_url, &moto.options()).unwrap();
    for rec in store.list_artifacts(id).await.unwrap() {
        let r = s3.ref_from_record(&rec).unwrap();
        s3.get(&r)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", rec.name));
    }
    // the epochs the winner trained that are still kept (keep_epochs = 2)
    // are recorded from its attempt
    let resumed = job.result.unwrap()["resumed_from"].as_u64().unwrap();
    for e in (resumed + 1).max(3)..=4 {
        let (uri, _) = &after.0[&format!("clean/epoch-{e}/model.safetensors")];
        assert!(uri.contains("/a2/"), "epoch {e}: {uri}");
    }
    drop(gw);
    drop(trainers);
    drop(others);
    pg.drop_db().await;
    eprintln!("zombie test took {:.1} s", t0.elapsed().as_secs_f64());
}
