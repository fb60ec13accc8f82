//! The metadata-store behaviour suite, written once against
//! `Arc<dyn MetadataStore>`. [`metadata_test_suite!`] expands every case into
//! one test per backend (`sqlite_file::<case>`, `sqlite_memory::<case>`,
//! `postgres::<case>`), each on a fresh store: a new SQLite file, a new
//! in-memory database, or a new Postgres database on DEADBOLT_TEST_PG_URL
//! (default postgres://postgres@127.0.0.1:5432/postgres), dropped afterwards.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use deadbolt_store::*;
use deadbolt_test_support::pg::Pg;
use serde_json::json;
use uuid::Uuid;

type Store = Arc<dyn MetadataStore>;

fn stage(tag: &str) -> String {
    format!("{tag}-{}", Uuid::new_v4().simple())
}

async fn new_run(s: &Store, name: &str) -> Run {
    s.create_run(NewRun {
        client_request_id: None,
        name: name.into(),
        spec_json: json!({"name": name}),
    })
    .await
    .unwrap()
    .0
}

async fn enqueue(s: &Store, run: Uuid, stage: &str, max_attempts: i32) -> Job {
    s.enqueue_job(NewJob {
        run_id: run,
        stage: stage.into(),
        payload: json!({"stage": stage}),
        max_attempts,
    })
    .await
    .unwrap()
    .0
}

fn failure(code: &str, message: &str) -> JobFailure {
    JobFailure::new(code, message)
}

async fn lease_one(s: &Store, stage: &str) -> Job {
    s.lease_job("w", &[stage.to_string()], Duration::from_secs(30))
        .await
        .unwrap()
        .expect("a runnable job")
}

fn is_failed_precondition<T: std::fmt::Debug>(r: &Result<T>) -> bool {
    matches!(r, Err(StoreError::FailedPrecondition(_)))
}

async fn runs_are_idempotent(s: Store) {
    let key = format!("req-{}", Uuid::new_v4());
    let new = NewRun {
        client_request_id: Some(key.clone()),
        name: "mnist-badnets".into(),
        spec_json: json!({"seed": 1, "attack": {"rate": 0.1}}),
    };
    let (a, created_a) = s.create_run(new.clone()).await.unwrap();
    let (b, created_b) = s.create_run(new.clone()).await.unwrap();
    assert!(created_a && !created_b);
    assert_eq!(a.id, b.id);
    assert_eq!(a.status, RunStatus::Queued);
    assert_eq!(b.spec_json, new.spec_json);

    // Same key, different spec: a conflict, not a silent reuse.
    let mut other = new.clone();
    other.spec_json = json!({"seed": 2});
    assert!(matches!(
        s.create_run(other).await,
        Err(StoreError::Conflict(_))
    ));

    // Racing creators with one key: exactly one creates.
    let key = format!("race-{}", Uuid::new_v4());
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            let new = NewRun {
                client_request_id: Some(key.clone()),
                name: "race".into(),
                spec_json: json!({}),
            };
            tokio::spawn(async move { s.create_run(new).await.unwrap() })
        })
        .collect();
    let mut ids = HashSet::new();
    let mut created = 0;
    for t in tasks {
        let (run, c) = t.await.unwrap();
        ids.insert(run.id);
        created += c as usize;
    }
    assert_eq!((ids.len(), created), (1, 1));

    // No key: every call creates.
    let x = new_run(&s, "x").await;
    let y = new_run(&s, "x").await;
    assert_ne!(x.id, y.id);

    let got = s.get_run(a.id).await.unwrap();
    assert_eq!(got, a);
    let listed = s.list_runs(1000, 0).await.unwrap();
    assert!(listed.iter().any(|r| r.id == a.id));
    assert_eq!(s.list_runs(1, 0).await.unwrap().len(), 1);

    let r = s
        .set_run_status(a.id, RunStatus::Failed, Some("boom".into()))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.error.as_deref()),
        (RunStatus::Failed, Some("boom"))
    );
    assert!(r.updated_at >= a.updated_at);
}

async fn not_found(s: Store) {
    let id = Uuid::new_v4();
    assert!(matches!(
        s.get_run(id).await,
        Err(StoreError::NotFound { what: "run", .. })
    ));
    assert!(s.get_job(id).await.unwrap_err().is_not_found());
    assert!(s
        .set_run_status(id, RunStatus::Running, None)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(s.cancel_run(id).await.unwrap_err().is_not_found());
    assert!(s.run_summary(id).await.unwrap_err().is_not_found());
    assert!(s.get_artifact(id, "x").await.unwrap_err().is_not_found());
    // Writes that reference a missing run.
    let e = s
        .enqueue_job(NewJob {
            run_id: id,
            stage: "train".into(),
            payload: json!({}),
            max_attempts: 1,
        })
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(s
        .record_metric(None, id, "train", "acc", 0, 1.0)
        .await
        .unwrap_err()
        .is_not_found());
    let tok = Uuid::new_v4();
    assert!(s
        .heartbeat(id, tok, Duration::from_secs(1), None)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(s
        .complete_job(id, tok, json!({}))
        .await
        .unwrap_err()
        .is_not_found());
}

async fn enqueue_is_idempotent(s: Store) {
    let run = new_run(&s, "enqueue").await;
    let st = stage("train");
    let (a, ca) = s
        .enqueue_job(NewJob {
            run_id: run.id,
            stage: st.clone(),
            payload: json!({"epochs": 3}),
            max_attempts: 3,
        })
        .await
        .unwrap();
    let (b, cb) = s
        .enqueue_job(NewJob {
            run_id: run.id,
            stage: st.clone(),
            payload: json!({"epochs": 99}),
            max_attempts: 3,
        })
        .await
        .unwrap();
    assert!(ca && !cb);
    assert_eq!(a.id, b.id);
    assert_eq!(b.payload, json!({"epochs": 3}));
    assert_eq!((a.status, a.attempts), (JobStatus::Queued, 0));
    assert_eq!(s.list_jobs(run.id).await.unwrap().len(), 1);
    assert!(matches!(
        s.enqueue_job(NewJob {
            run_id: run.id,
            stage: "x".into(),
            payload: json!({}),
            max_attempts: 0
        })
        .await,
        Err(StoreError::Invalid { .. })
    ));
}

async fn concurrent_leasers_never_share(s: Store) {
    let st = stage("analyze");
    let stages = vec![st.clone()];
    let mut all = HashSet::new();
    for i in 0..4 {
        let run = new_run(&s, &format!("lease-{i}")).await;
        for j in 0..5 {
            let sub = if j == 0 {
                st.clone()
            } else {
                format!("{st}-{j}")
            };
            let job = enqueue(&s, run.id, &sub, 3).await;
            if j == 0 {
                all.insert(job.id);
            }
        }
    }
    // Only jobs of `st` are leasable with `stages`; add more of them.
    for _ in 0..12 {
        let run = new_run(&s, "lease-more").await;
        all.insert(enqueue(&s, run.id, &st, 3).await.id);
    }
    let tasks: Vec<_> = (0..4)
        .map(|w| {
            let s = s.clone();
            let stages = stages.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(j) = s
                    .lease_job(&format!("worker-{w}"), &stages, Duration::from_secs(60))
                    .await
                    .unwrap()
                {
                    assert_eq!(j.status, JobStatus::Leased);
                    assert_eq!(j.attempts, 1);
                    assert_eq!(j.leased_by.as_deref(), Some(format!("worker-{w}").as_str()));
                    got.push(j.id);
                }
                got
            })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "a job was leased twice");
    assert_eq!(unique, all);
}

async fn oldest_job_first(s: Store) {
    let st = stage("poison");
    let run = new_run(&s, "order-a").await;
    let first = enqueue(&s, run.id, &st, 1).await;
    let run2 = new_run(&s, "order-b").await;
    let second = enqueue(&s, run2.id, &st, 1).await;
    let l = s
        .lease_job("w", std::slice::from_ref(&st), Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l.id, first.id);
    let l = s
        .lease_job("w", std::slice::from_ref(&st), Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l.id, second.id);
    // Other stages are not leased.
    assert!(s
        .lease_job("w", &[stage("none")], Duration::from_secs(30))
        .await
        .unwrap()
        .is_none());
}

async fn lease_expiry_and_release(s: Store) {
    let st = stage("train");
    let stages = vec![st.clone()];
    let run = new_run(&s, "expiry").await;
    let job = enqueue(&s, run.id, &st, 3).await;
    let short = Duration::from_millis(300);
    let a = s
        .lease_job("w1", &stages, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.id, job.id);
    let tok_a = a.lease_token.unwrap();
    // Held: nobody else gets it.
    assert!(s.lease_job("w2", &stages, short).await.unwrap().is_none());
    // Heartbeat renews the lease (here: shortens it) and records progress.
    let hb = s
        .heartbeat(job.id, tok_a, Duration::from_secs(10), None)
        .await
        .unwrap();
    assert!(hb.lease_expires_at.unwrap() > a.lease_expires_at.unwrap());
    let hb = s
        .heartbeat(job.id, tok_a, short, Some((0.25, "epoch 1/4".into())))
        .await
        .unwrap();
    assert_eq!(hb.progress, Some(0.25));
    assert_eq!(hb.progress_message.as_deref(), Some("epoch 1/4"));
    assert_eq!(hb.lease_token, Some(tok_a));
    // Let the lease lapse: another worker takes the job with a new token.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let b = s
        .lease_job("w2", &stages, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("expired lease is re-leased");
    let tok_b = b.lease_token.unwrap();
    assert_eq!(b.id, job.id);
    assert_ne!(tok_a, tok_b);
    assert_eq!(b.attempts, 2);
    assert_eq!(b.leased_by.as_deref(), Some("w2"));
    // The old token is dead everywhere.
    let lost =
        |r: Result<Job>| matches!(r, Err(StoreError::LeaseLost { job_id }) if job_id == job.id);
    assert!(lost(s.heartbeat(job.id, tok_a, short, None).await));
    assert!(lost(s.complete_job(job.id, tok_a, json!({})).await));
    assert!(lost(
        s.fail_job(job.id, tok_a, &failure("internal", "late"), Duration::ZERO)
            .await
    ));
    // The new holder completes; repeating the completion is a no-op.
    let done = s
        .complete_job(job.id, tok_b, json!({"checkpoint": "ckpt"}))
        .await
        .unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.result, Some(json!({"checkpoint": "ckpt"})));
    let again = s
        .complete_job(job.id, tok_b, json!({"x": 1}))
        .await
        .unwrap();
    assert_eq!(again.result, Some(json!({"checkpoint": "ckpt"})));
    assert!(lost(s.heartbeat(job.id, tok_b, short, None).await));
    assert!(s.lease_job("w3", &stages, short).await.unwrap().is_none());
}

async fn retries_with_backoff_then_fail(s: Store) {
    let st = stage("prune");
    let stages = vec![st.clone()];
    let run = new_run(&s, "retry").await;
    let job = enqueue(&s, run.id, &st, 2).await;
    let lease = Duration::from_secs(30);
    let a = s.lease_job("w", &stages, lease).await.unwrap().unwrap();
    let f = s
        .fail_job(
            job.id,
            a.lease_token.unwrap(),
            &failure("resource_exhausted", "oom"),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    assert_eq!((f.status, f.attempts), (JobStatus::Queued, 1));
    assert_eq!(f.error, Some(failure("resource_exhausted", "oom")));
    assert!(f.lease_token.is_none());
    // Backing off: not runnable yet.
    assert!(s.lease_job("w", &stages, lease).await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let b = s.lease_job("w", &stages, lease).await.unwrap().unwrap();
    assert_eq!(b.attempts, 2);
    let f = s
        .fail_job(
            job.id,
            b.lease_token.unwrap(),
            &failure("resource_exhausted", "oom again"),
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert_eq!((f.status, f.attempts), (JobStatus::Failed, 2));
    assert!(s.lease_job("w", &stages, lease).await.unwrap().is_none());
    assert_eq!(s.get_job(job.id).await.unwrap().status, JobStatus::Failed);

    // A lease that expires with no attempts left fails the job.
    let st = stage("exhaust");
    let job = enqueue(&s, run.id, &st, 1).await;
    let a = s
        .lease_job("w", std::slice::from_ref(&st), Duration::from_millis(200))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.attempts, 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(s
        .lease_job("w", std::slice::from_ref(&st), lease)
        .await
        .unwrap()
        .is_none());
    let j = s.get_job(job.id).await.unwrap();
    assert_eq!(j.status, JobStatus::Failed);
    let e = j.error.unwrap();
    assert_eq!(e.code, "unavailable");
    assert!(e.message.contains("lease expired"), "{e}");
    assert_eq!(e.field, None);
}

async fn abort_fails_at_once(s: Store) {
    let st = stage("analyze");
    let stages = vec![st.clone()];
    let run = new_run(&s, "abort").await;
    let job = enqueue(&s, run.id, &st, 3).await;
    let lease = Duration::from_secs(30);
    let a = s.lease_job("w", &stages, lease).await.unwrap().unwrap();
    let tok = a.lease_token.unwrap();
    // A stale token cannot abort.
    assert!(matches!(
        s.abort_job(job.id, Uuid::new_v4(), &failure("internal", "x"))
            .await,
        Err(StoreError::LeaseLost { .. })
    ));
    let f = s
        .abort_job(job.id, tok, &failure("data_loss", "checksum mismatch"))
        .await
        .unwrap();
    assert_eq!((f.status, f.attempts), (JobStatus::Failed, 1));
    assert_eq!(f.error, Some(failure("data_loss", "checksum mismatch")));
    assert!(f.lease_token.is_none());
    // Attempts were left, but the job is not leased again.
    assert!(s.lease_job("w", &stages, lease).await.unwrap().is_none());
}

async fn upserts_do_not_duplicate(s: Store) {
    let run = new_run(&s, "upserts").await;
    for v in [0.5, 0.9] {
        s.record_metric(None, run.id, "train-clean", "loss", 3, v)
            .await
            .unwrap();
    }
    s.record_metric(None, run.id, "train-clean", "loss", 4, 0.1)
        .await
        .unwrap();
    let m = s.list_metrics(run.id).await.unwrap();
    assert_eq!(m.len(), 2);
    assert_eq!((m[0].step, m[0].value), (3, 0.9));

    let stats: Vec<NeuronStat> = (0..4)
        .flat_map(|c| {
            ["l1", "l2", "linf", "mean"].map(|norm| NeuronStat {
                layer: "conv2".into(),
                model: "backdoored".into(),
                input: "triggered".into(),
                norm: norm.into(),
                channel: c,
                value: c as f64,
            })
        })
        .collect();
    s.put_neuron_stats(None, run.id, &stats).await.unwrap();
    let mut again = stats.clone();
    again[0].value = 42.0;
    s.put_neuron_stats(None, run.id, &again).await.unwrap();
    let got = s.list_neuron_stats(run.id).await.unwrap();
    assert_eq!(got.len(), 16);
    assert!(got.iter().any(|n| n.value == 42.0 && n.channel == 0));
    let mut bad = stats[0].clone();
    bad.norm = "l3".into();
    assert!(matches!(
        s.put_neuron_stats(None, run.id, &[bad]).await,
        Err(StoreError::Invalid { .. })
    ));

    let curve: Vec<CurvePoint> = (0..5)
        .map(|k| CurvePoint {
            k,
            acc: 0.98 - 0.001 * k as f64,
            asr: 1.0 / (1.0 + k as f64),
            ra: 0.1 * k as f64,
        })
        .collect();
    s.put_pruning_curve(None, run.id, "linf", &curve)
        .await
        .unwrap();
    s.put_pruning_curve(None, run.id, "linf", &curve)
        .await
        .unwrap();
    s.put_pruning_curve(None, run.id, "l1", &curve[..3])
        .await
        .unwrap();
    s.set_pruning_choice(None, run.id, "linf", curve[2])
        .await
        .unwrap();
    s.set_pruning_choice(None, run.id, "linf", curve[4])
        .await
        .unwrap();
    let curves = s.list_pruning_curves(run.id).await.unwrap();
    assert_eq!(curves.len(), 2);
    assert_eq!(curves[0].criterion, "l1");
    assert_eq!(curves[0].chosen_k, None);
    assert_eq!(curves[1].points, curve);
    assert_eq!(curves[1].chosen_k, Some(4));
    let choices = s.list_pruning_choices(run.id).await.unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0].point, curve[4]);

    let rec = ArtifactRecord {
        run_id: run.id,
        name: "model.safetensors".into(),
        uri: "file:///tmp/a".into(),
        sha256: "ab".repeat(32),
        size: 10,
        content_type: Some("application/octet-stream".into()),
    };
    s.record_artifact(None, rec.clone()).await.unwrap();
    let mut rec2 = rec.clone();
    rec2.size = 11;
    rec2.sha256 = "cd".repeat(32);
    s.record_artifact(None, rec2.clone()).await.unwrap();
    assert_eq!(s.list_artifacts(run.id).await.unwrap(), vec![rec2.clone()]);
    assert_eq!(
        s.get_artifact(run.id, "model.safetensors").await.unwrap(),
        rec2
    );
    let mut bad = rec.clone();
    bad.sha256 = "nothex".into();
    assert!(matches!(
        s.record_artifact(None, bad).await,
        Err(StoreError::Invalid { .. })
    ));
}

async fn views_report_figures(s: Store) {
    let run = new_run(&s, "summary").await;
    let sum = s.run_summary(run.id).await.unwrap();
    assert_eq!(sum.name, "summary");
    assert_eq!((sum.clean_acc, sum.linf), (None, None));
    s.record_metric(
        None,
        run.id,
        "train-clean",
        metric_names::CLEAN_ACC,
        1,
        0.90,
    )
    .await
    .unwrap();
    s.record_metric(
        None,
        run.id,
        "train-clean",
        metric_names::CLEAN_ACC,
        2,
        0.976,
    )
    .await
    .unwrap();
    s.record_metric(
        None,
        run.id,
        "train-backdoored",
        metric_names::BACKDOORED_ACC,
        6,
        0.975,
    )
    .await
    .unwrap();
    s.record_metric(
        None,
        run.id,
        "train-backdoored",
        metric_names::BACKDOORED_ASR,
        6,
        0.998,
    )
    .await
    .unwrap();
    let p = CurvePoint {
        k: 4,
        acc: 0.971,
        asr: 0.016,
        ra: 0.95,
    };
    s.put_pruning_curve(None, run.id, HEADLINE_CRITERION, &[p])
        .await
        .unwrap();
    s.set_pruning_choice(None, run.id, HEADLINE_CRITERION, p)
        .await
        .unwrap();
    s.set_pruning_choice(
        None,
        run.id,
        "l1",
        CurvePoint {
            k: 8,
            acc: 0.9,
            asr: 0.02,
            ra: 0.9,
        },
    )
    .await
    .unwrap();
    s.set_run_status(run.id, RunStatus::Succeeded, None)
        .await
        .unwrap();
    let sum = s.run_summary(run.id).await.unwrap();
    assert_eq!(sum.status, RunStatus::Succeeded);
    assert_eq!(sum.clean_acc, Some(0.976));
    assert_eq!(sum.backdoored_acc, Some(0.975));
    assert_eq!(sum.backdoored_asr, Some(0.998));
    assert_eq!(sum.linf, Some(p));
}

async fn events_are_ordered(s: Store) {
    let run = new_run(&s, "events").await;
    let other = new_run(&s, "events-other").await;
    let a = s
        .append_event(None, run.id, "train", "started", "training", Some(0.0))
        .await
        .unwrap();
    s.append_event(None, other.id, "train", "started", "other", None)
        .await
        .unwrap();
    let b = s
        .append_event(None, run.id, "train", "progress", "epoch 1", Some(0.5))
        .await
        .unwrap();
    let c = s
        .append_event(None, run.id, "train", "finished", "done", Some(1.0))
        .await
        .unwrap();
    assert!(a < b && b < c);
    let all = s.list_events(run.id, 0).await.unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![a, b, c]);
    let after = s.list_events(run.id, a).await.unwrap();
    assert_eq!(after.len(), 2);
    assert_eq!(after[0].message, "epoch 1");
    assert_eq!(after[0].progress, Some(0.5));
    assert!(s.list_events(run.id, c).await.unwrap().is_empty());
    assert!(s
        .append_event(None, Uuid::new_v4(), "x", "y", "z", None)
        .await
        .unwrap_err()
        .is_not_found());
}

async fn api_keys(s: Store) {
    let k1 = s.create_api_key("ci").await.unwrap();
    let k2 = s.create_api_key("ci").await.unwrap();
    assert_ne!(k1, k2);
    assert!(k1.len() >= 40);
    assert_eq!(s.verify_api_key(&k1).await.unwrap().as_deref(), Some("ci"));
    assert_eq!(s.verify_api_key(&k2).await.unwrap().as_deref(), Some("ci"));
    assert_eq!(s.verify_api_key("dbk_nope").await.unwrap(), None);
    assert_eq!(s.verify_api_key(&k1[..k1.len() - 1]).await.unwrap(), None);
}

async fn cancel_cancels_jobs(s: Store) {
    let run = new_run(&s, "cancel").await;
    let st1 = stage("train");
    let st2 = stage("analyze");
    let st3 = stage("poison");
    let done = enqueue(&s, run.id, &st3, 1).await;
    let d = s
        .lease_job("w", std::slice::from_ref(&st3), Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    s.complete_job(done.id, d.lease_token.unwrap(), json!({}))
        .await
        .unwrap();
    let leased = enqueue(&s, run.id, &st1, 3).await;
    let queued = enqueue(&s, run.id, &st2, 3).await;
    let l = s
        .lease_job("w", std::slice::from_ref(&st1), Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    s.set_run_status(run.id, RunStatus::Running, None)
        .await
        .unwrap();
    let c = s.cancel_run(run.id).await.unwrap();
    assert_eq!(c.status, RunStatus::Cancelled);
    assert_eq!(
        s.get_job(leased.id).await.unwrap().status,
        JobStatus::Cancelled
    );
    assert_eq!(
        s.get_job(queued.id).await.unwrap().status,
        JobStatus::Cancelled
    );
    assert_eq!(
        s.get_job(done.id).await.unwrap().status,
        JobStatus::Succeeded
    );
    // The worker holding the lease learns on its next heartbeat.
    assert!(matches!(
        s.heartbeat(
            leased.id,
            l.lease_token.unwrap(),
            Duration::from_secs(30),
            None
        )
        .await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(s
        .lease_job("w", &[st1, st2], Duration::from_secs(30))
        .await
        .unwrap()
        .is_none());
}

async fn concurrent_writers(s: Store) {
    // Many writers at once must neither fail (e.g. SQLITE_BUSY) nor lose rows.
    let run = new_run(&s, "writers").await;
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                for step in 0..10 {
                    s.record_metric(None, run.id, "train", &format!("loss-{w}"), step, 0.5)
                        .await
                        .unwrap();
                    s.append_event(None, run.id, "train", "progress", "step", None)
                        .await
                        .unwrap();
                }
                let stats: Vec<NeuronStat> = (0..8)
                    .map(|c| NeuronStat {
                        layer: format!("layer-{w}"),
                        model: "clean".into(),
                        input: "clean".into(),
                        norm: "l2".into(),
                        channel: c,
                        value: 1.0,
                    })
                    .collect();
                s.put_neuron_stats(None, run.id, &stats).await.unwrap();
                let pts: Vec<CurvePoint> = (0..8)
                    .map(|k| CurvePoint {
                        k,
                        acc: 0.9,
                        asr: 0.1,
                        ra: 0.5,
                    })
                    .collect();
                s.put_pruning_curve(None, run.id, &format!("c{w}"), &pts)
                    .await
                    .unwrap();
                s.cancel_run(run.id).await.unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.list_metrics(run.id).await.unwrap().len(), 80);
    assert_eq!(s.list_neuron_stats(run.id).await.unwrap().len(), 64);
    assert_eq!(s.list_pruning_curves(run.id).await.unwrap().len(), 8);
    let events = s.list_events(run.id, 0).await.unwrap();
    assert_eq!(events.len(), 80);
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
}

async fn structured_failures_round_trip(s: Store) {
    let st = stage("train");
    let run = new_run(&s, "failures").await;
    let job = enqueue(&s, run.id, &st, 3).await;
    assert_eq!(job.error, None);

    // A retryable failure with the field at fault survives the requeue and
    // the next lease.
    let a = lease_one(&s, &st).await;
    let bad_epochs = JobFailure::new("invalid_argument", "epochs must be >= 1")
        .with_field("spec.training.epochs");
    let f = s
        .fail_job(job.id, a.lease_token.unwrap(), &bad_epochs, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(f.status, JobStatus::Queued);
    assert_eq!(f.error.as_ref(), Some(&bad_epochs));
    let b = lease_one(&s, &st).await;
    assert_eq!(b.error.as_ref(), Some(&bad_epochs));
    assert_eq!(s.get_job(job.id).await.unwrap().error, Some(bad_epochs));

    // A failure without a field clears the previous one's field.
    let busy = failure("unavailable", "analyzer busy");
    s.fail_job(job.id, b.lease_token.unwrap(), &busy, Duration::ZERO)
        .await
        .unwrap();
    let c = lease_one(&s, &st).await;
    assert_eq!(c.error, Some(busy));

    // A code that is not a lowercase gRPC code name is refused.
    for code in ["", "InvalidArgument", "not a code"] {
        assert!(matches!(
            s.fail_job(
                job.id,
                c.lease_token.unwrap(),
                &failure(code, "m"),
                Duration::ZERO
            )
            .await,
            Err(StoreError::Invalid { .. })
        ));
    }
    // Completing clears the failure.
    let done = s
        .complete_job(job.id, c.lease_token.unwrap(), json!({}))
        .await
        .unwrap();
    assert_eq!(done.error, None);

    // Aborting records the failure at once.
    let st2 = stage("analyze");
    let job2 = enqueue(&s, run.id, &st2, 3).await;
    let l = lease_one(&s, &st2).await;
    let corrupt = JobFailure::new("data_loss", "checksum mismatch").with_field("dataset");
    let f = s
        .abort_job(job2.id, l.lease_token.unwrap(), &corrupt)
        .await
        .unwrap();
    assert_eq!(
        (f.status, f.error),
        (JobStatus::Failed, Some(corrupt.clone()))
    );
    assert_eq!(s.list_jobs(run.id).await.unwrap()[1].error, Some(corrupt));
}

async fn finished_runs_stay_finished(s: Store) {
    // Allowed: queued -> running -> running -> succeeded.
    let run = new_run(&s, "transitions").await;
    for status in [RunStatus::Running, RunStatus::Running, RunStatus::Succeeded] {
        assert_eq!(
            s.set_run_status(run.id, status, None).await.unwrap().status,
            status
        );
    }
    // A running run does not go back to queued.
    let running = new_run(&s, "running").await;
    s.set_run_status(running.id, RunStatus::Running, None)
        .await
        .unwrap();
    assert!(is_failed_precondition(
        &s.set_run_status(running.id, RunStatus::Queued, None).await
    ));

    // No way out of a terminal state, whatever the target.
    let cancelled = new_run(&s, "cancelled").await;
    s.cancel_run(cancelled.id).await.unwrap();
    let failed = new_run(&s, "failed").await;
    s.set_run_status(failed.id, RunStatus::Failed, Some("boom".into()))
        .await
        .unwrap();
    for (id, was) in [
        (run.id, RunStatus::Succeeded),
        (cancelled.id, RunStatus::Cancelled),
        (failed.id, RunStatus::Failed),
    ] {
        let before = s.get_run(id).await.unwrap();
        for to in RunStatus::ALL {
            let r = s.set_run_status(id, *to, Some("late".into())).await;
            match r {
                Err(StoreError::FailedPrecondition(msg)) => {
                    assert!(msg.contains(&id.to_string()), "{msg}");
                    assert!(msg.contains(was.as_str()), "{msg}");
                }
                other => panic!("{was} -> {to}: expected FailedPrecondition, got {other:?}"),
            }
        }
        assert_eq!(s.get_run(id).await.unwrap(), before);
    }
    // The refusal maps to the gRPC code.
    let e = s
        .set_run_status(cancelled.id, RunStatus::Running, None)
        .await
        .unwrap_err();
    assert_eq!(
        tonic::Status::from(e).code(),
        tonic::Code::FailedPrecondition
    );
}

async fn cancelling_a_finished_run_fails(s: Store) {
    for (status, word) in [
        (RunStatus::Succeeded, "succeeded"),
        (RunStatus::Failed, "failed"),
    ] {
        let run = new_run(&s, word).await;
        let st = stage("train");
        let job = enqueue(&s, run.id, &st, 1).await;
        s.set_run_status(run.id, status, None).await.unwrap();
        match s.cancel_run(run.id).await {
            Err(StoreError::FailedPrecondition(msg)) => {
                assert_eq!(msg, format!("run {} already {word}", run.id));
            }
            other => panic!("expected FailedPrecondition, got {other:?}"),
        }
        assert_eq!(s.get_run(run.id).await.unwrap().status, status);
        // Its jobs are left alone.
        assert_eq!(s.get_job(job.id).await.unwrap().status, JobStatus::Queued);
    }
}

async fn cancel_is_idempotent(s: Store) {
    let run = new_run(&s, "cancel-twice").await;
    let st = stage("train");
    let first = s.cancel_run(run.id).await.unwrap();
    assert_eq!(first.status, RunStatus::Cancelled);
    // A job enqueued after the cancel is cancelled by the repeat.
    let late = enqueue(&s, run.id, &st, 1).await;
    let again = s.cancel_run(run.id).await.unwrap();
    assert_eq!(again.status, RunStatus::Cancelled);
    assert_eq!(again.updated_at, first.updated_at);
    assert_eq!(
        s.get_job(late.id).await.unwrap().status,
        JobStatus::Cancelled
    );
    assert!(s
        .lease_job("w", &[st], Duration::from_secs(30))
        .await
        .unwrap()
        .is_none());
}

async fn cancel_races_success(s: Store) {
    // A cancel and a success race on each run: exactly one wins, and a run
    // whose cancel succeeded shows cancelled, never succeeded.
    let mut runs = Vec::new();
    for i in 0..24 {
        let run = new_run(&s, &format!("race-{i}")).await;
        s.set_run_status(run.id, RunStatus::Running, None)
            .await
            .unwrap();
        let job = enqueue(&s, run.id, &stage("train"), 1).await;
        runs.push((run.id, job.id));
    }
    let tasks: Vec<_> = runs
        .iter()
        .map(|&(id, _)| {
            let (a, b) = (s.clone(), s.clone());
            let cancel = tokio::spawn(async move { a.cancel_run(id).await });
            let succeed =
                tokio::spawn(async move { b.set_run_status(id, RunStatus::Succeeded, None).await });
            (cancel, succeed)
        })
        .collect();
    let (mut cancels, mut successes) = (0, 0);
    for (&(id, job), (cancel, succeed)) in runs.iter().zip(tasks) {
        let cancel = cancel.await.unwrap();
        let succeed = succeed.await.unwrap();
        let now = s.get_run(id).await.unwrap().status;
        match (&cancel, &succeed) {
            (Ok(c), Err(StoreError::FailedPrecondition(_))) => {
                cancels += 1;
                assert_eq!(
                    (c.status, now),
                    (RunStatus::Cancelled, RunStatus::Cancelled)
                );
                assert_eq!(s.get_job(job).await.unwrap().status, JobStatus::Cancelled);
            }
            (Err(StoreError::FailedPrecondition(_)), Ok(r)) => {
                successes += 1;
                assert_eq!(
                    (r.status, now),
                    (RunStatus::Succeeded, RunStatus::Succeeded)
                );
                assert_eq!(s.get_job(job).await.unwrap().status, JobStatus::Queued);
            }
            other => panic!("run {id}: both or neither won: {other:?}"),
        }
    }
    assert_eq!(cancels + successes, runs.len());
}

// ---- fenced job writes ----

/// Everything a run's stage jobs write, to check that a refused write changed
/// nothing.
#[derive(Debug, PartialEq)]
struct Snapshot {
    metrics: Vec<Metric>,
    stats: Vec<NeuronStat>,
    curves: Vec<PruningCurve>,
    choices: Vec<PruningChoice>,
    artifacts: Vec<ArtifactRecord>,
    events: Vec<RunEvent>,
}

async fn snapshot(s: &Store, run: Uuid) -> Snapshot {
    Snapshot {
        metrics: s.list_metrics(run).await.unwrap(),
        stats: s.list_neuron_stats(run).await.unwrap(),
        curves: s.list_pruning_curves(run).await.unwrap(),
        choices: s.list_pruning_choices(run).await.unwrap(),
        artifacts: s.list_artifacts(run).await.unwrap(),
        events: s.list_events(run, 0).await.unwrap(),
    }
}

fn artifact(run: Uuid, v: f64) -> ArtifactRecord {
    ArtifactRecord {
        run_id: run,
        name: "epoch-1/model.safetensors".into(),
        uri: format!("file:///ckpt/{v}"),
        sha256: sha256_hex(v.to_string().as_bytes()),
        size: 1,
        content_type: None,
    }
}

/// Each fenced write once, with values `v` (same keys every time, so that
/// later writes upsert earlier ones).
async fn fenced_writes(s: &Store, fence: Option<&Fence>, run: Uuid, v: f64) -> Vec<Result<()>> {
    let point = CurvePoint {
        k: 1,
        acc: v,
        asr: v,
        ra: v,
    };
    let stat = NeuronStat {
        layer: "conv2".into(),
        model: "backdoored".into(),
        input: "triggered".into(),
        norm: "linf".into(),
        channel: 0,
        value: v,
    };
    vec![
        s.record_metric(fence, run, "train", "loss", 1, v).await,
        s.put_neuron_stats(fence, run, &[stat]).await,
        s.put_pruning_curve(fence, run, "linf", &[point]).await,
        s.set_pruning_choice(fence, run, "linf", point).await,
        s.record_artifact(fence, artifact(run, v)).await,
        s.append_event(fence, run, "train", "progress", &format!("v={v}"), Some(v))
            .await
            .map(|_| ()),
    ]
}

fn assert_all_lost(results: Vec<Result<()>>, job: Uuid) {
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Err(StoreError::LeaseLost { job_id }) if job_id == job => {}
            other => panic!("write {i}: expected LeaseLost on {job}, got {other:?}"),
        }
    }
}

fn assert_all_ok(results: Vec<Result<()>>) {
    for (i, r) in results.into_iter().enumerate() {
        if let Err(e) = r {
            panic!("write {i}: {e}");
        }
    }
}

/// The snapshot holds the values of the writes made with `v`.
fn assert_written(snap: &Snapshot, run: Uuid, v: f64) {
    assert_eq!(snap.metrics.len(), 1);
    assert_eq!(snap.metrics[0].value, v);
    assert_eq!(snap.stats.len(), 1);
    assert_eq!(snap.stats[0].value, v);
    assert_eq!(snap.curves[0].points[0].acc, v);
    assert_eq!(snap.choices[0].point.asr, v);
    assert_eq!(snap.artifacts, vec![artifact(run, v)]);
    assert_eq!(snap.events.last().unwrap().progress, Some(v));
}

async fn stale_fence_is_refused(s: Store) {
    let st = stage("train");
    let stages = vec![st.clone()];
    let run = new_run(&s, "zombie").await;
    let job = enqueue(&s, run.id, &st, 3).await;
    assert_eq!(job.fence(), None);
    let a = s
        .lease_job("w1", &stages, Duration::from_millis(300))
        .await
        .unwrap()
        .unwrap();
    let fence_a = a.fence().expect("a leased job has a fence");
    assert_eq!(
        fence_a,
        Fence {
            job_id: job.id,
            lease_token: a.lease_token.unwrap()
        }
    );
    assert_all_ok(fenced_writes(&s, Some(&fence_a), run.id, 1.0).await);
    assert_written(&snapshot(&s, run.id).await, run.id, 1.0);

    // w1 stalls past its lease; w2 takes the job over.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let b = s
        .lease_job("w2", &stages, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("expired lease is re-leased");
    let fence_b = b.fence().unwrap();
    assert_ne!(fence_a, fence_b);

    // w1's late writes are refused and change nothing.
    let before = snapshot(&s, run.id).await;
    assert_all_lost(fenced_writes(&s, Some(&fence_a), run.id, 2.0).await, job.id);
    assert_eq!(snapshot(&s, run.id).await, before);

    // The current holder's writes go through (upserting w1's earlier ones).
    assert_all_ok(fenced_writes(&s, Some(&fence_b), run.id, 3.0).await);
    let after = snapshot(&s, run.id).await;
    assert_written(&after, run.id, 3.0);
    assert_eq!(after.events.len(), 2);

    // Unfenced writes (gateway, tests) still work.
    assert_all_ok(fenced_writes(&s, None, run.id, 4.0).await);
    assert_written(&snapshot(&s, run.id).await, run.id, 4.0);

    // LeaseLost is ABORTED on the wire.
    let e = s
        .record_metric(Some(&fence_a), run.id, "train", "loss", 1, 5.0)
        .await
        .unwrap_err();
    assert_eq!(tonic::Status::from(e).code(), tonic::Code::Aborted);
}

async fn finished_job_fence_is_refused(s: Store) {
    let run = new_run(&s, "finished-fences").await;
    let lease = Duration::from_secs(30);

    // Completed.
    let st = stage("train");
    let job = enqueue(&s, run.id, &st, 3).await;
    let l = lease_one(&s, &st).await;
    let fence = l.fence().unwrap();
    assert_all_ok(fenced_writes(&s, Some(&fence), run.id, 1.0).await);
    s.complete_job(job.id, fence.lease_token, json!({}))
        .await
        .unwrap();
    let before = snapshot(&s, run.id).await;
    assert_all_lost(fenced_writes(&s, Some(&fence), run.id, 2.0).await, job.id);
    assert_eq!(snapshot(&s, run.id).await, before);

    // Failed and waiting for a retry; aborted; released.
    let st = stage("analyze");
    let job = enqueue(&s, run.id, &st, 3).await;
    let l = lease_one(&s, &st).await;
    s.fail_job(
        job.id,
        l.lease_token.unwrap(),
        &failure("unavailable", "x"),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_all_lost(
        fenced_writes(&s, l.fence().as_ref(), run.id, 3.0).await,
        job.id,
    );
    let st = stage("prune");
    let job = enqueue(&s, run.id, &st, 3).await;
    let l = lease_one(&s, &st).await;
    s.abort_job(job.id, l.lease_token.unwrap(), &failure("data_loss", "x"))
        .await
        .unwrap();
    assert_all_lost(
        fenced_writes(&s, l.fence().as_ref(), run.id, 4.0).await,
        job.id,
    );
    let st = stage("poison");
    let job = enqueue(&s, run.id, &st, 3).await;
    let l = lease_one(&s, &st).await;
    s.release_job(job.id, l.lease_token.unwrap()).await.unwrap();
    assert_all_lost(
        fenced_writes(&s, l.fence().as_ref(), run.id, 5.0).await,
        job.id,
    );
    assert_eq!(snapshot(&s, run.id).await, before);

    // Cancelled with its run.
    let st = stage("report");
    let job = enqueue(&s, run.id, &st, 3).await;
    let l = s
        .lease_job("w", std::slice::from_ref(&st), lease)
        .await
        .unwrap()
        .unwrap();
    s.cancel_run(run.id).await.unwrap();
    assert_all_lost(
        fenced_writes(&s, l.fence().as_ref(), run.id, 6.0).await,
        job.id,
    );
    assert_eq!(snapshot(&s, run.id).await, before);
}

async fn fence_names_a_leased_job_of_the_run(s: Store) {
    let st = stage("analyze");
    let run = new_run(&s, "fence-checks").await;
    let other = new_run(&s, "fence-other").await;
    let job = enqueue(&s, run.id, &st, 3).await;
    let fence = lease_one(&s, &st).await.fence().unwrap();

    // A token that was never this job's.
    let wrong = Fence {
        job_id: job.id,
        lease_token: Uuid::new_v4(),
    };
    assert_all_lost(fenced_writes(&s, Some(&wrong), run.id, 1.0).await, job.id);
    // An unknown job.
    let unknown = Fence {
        job_id: Uuid::new_v4(),
        lease_token: fence.lease_token,
    };
    for r in fenced_writes(&s, Some(&unknown), run.id, 1.0).await {
        assert!(
            matches!(&r, Err(StoreError::NotFound { what: "job", .. })),
            "{r:?}"
        );
    }
    // The job's fence does not cover another run.
    for r in fenced_writes(&s, Some(&fence), other.id, 1.0).await {
        assert!(
            matches!(&r, Err(StoreError::Invalid { field: "fence", .. })),
            "{r:?}"
        );
    }
    let empty = snapshot(&s, other.id).await;
    assert!(empty.metrics.is_empty() && empty.events.is_empty() && empty.artifacts.is_empty());
    assert!(snapshot(&s, run.id).await.metrics.is_empty());
    // Validation still comes first.
    let mut bad = artifact(run.id, 1.0);
    bad.sha256 = "nothex".into();
    assert!(matches!(
        s.record_artifact(Some(&wrong), bad).await,
        Err(StoreError::Invalid { .. })
    ));
    // The right fence works.
    assert_all_ok(fenced_writes(&s, Some(&fence), run.id, 2.0).await);
    assert_written(&snapshot(&s, run.id).await, run.id, 2.0);
}

async fn fenced_writes_race_release(s: Store) {
    // Writers hammer a job's lease while it is released and re-leased: every
    // write accepted under the old token committed before the release did.
    let st = stage("train");
    let run = new_run(&s, "race-release").await;
    let job = enqueue(&s, run.id, &st, 3).await;
    let fence = lease_one(&s, &st).await.fence().unwrap();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                for i in 0.. {
                    let name = format!("loss-{w}");
                    match s
                        .record_metric(Some(&fence), run.id, "train", &name, i, 0.5)
                        .await
                    {
                        Ok(()) => {}
                        Err(StoreError::LeaseLost { .. }) => break,
                        Err(e) => panic!("{e}"),
                    }
                    match s
                        .append_event(Some(&fence), run.id, "train", "progress", &name, None)
                        .await
                    {
                        Ok(seq) => accepted.push(seq),
                        Err(StoreError::LeaseLost { .. }) => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                accepted
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.release_job(job.id, fence.lease_token).await.unwrap();
    let marker = s
        .append_event(None, run.id, "gateway", "marker", "released", None)
        .await
        .unwrap();
    let b = lease_one(&s, &st).await;
    assert_eq!(b.attempts, 1);
    let mut accepted = Vec::new();
    for w in writers {
        accepted.extend(w.await.unwrap());
    }
    assert!(!accepted.is_empty(), "no write got in before the release");
    assert!(accepted.iter().all(|&seq| seq < marker));
    let events = s.list_events(run.id, 0).await.unwrap();
    assert_eq!(events.len(), accepted.len() + 1);
    assert_eq!(events.last().unwrap().seq, marker);
    // A refused metric wrote nothing: each writer's metrics are a prefix
    // of its steps, at most one more than its accepted events.
    let metrics = s.list_metrics(run.id).await.unwrap();
    assert!(metrics.len() >= accepted.len() && metrics.len() <= accepted.len() + 4);
}

// ---- graceful drain ----

async fn release_does_not_count_an_attempt(s: Store) {
    let st = stage("train");
    let stages = vec![st.clone()];
    let lease = Duration::from_secs(30);
    let run = new_run(&s, "drain").await;
    let job = enqueue(&s, run.id, &st, 2).await;
    let a = s.lease_job("w1", &stages, lease).await.unwrap().unwrap();
    assert_eq!(a.attempts, 1);
    let tok_a = a.lease_token.unwrap();
    s.heartbeat(job.id, tok_a, lease, Some((0.5, "epoch 2/4".into())))
        .await
        .unwrap();
    let r = s.release_job(job.id, tok_a).await.unwrap();
    assert_eq!(r.status, JobStatus::Queued);
    assert_eq!(r.attempts, 0);
    assert_eq!(
        (r.lease_token, r.leased_by.as_deref(), r.lease_expires_at),
        (None, None, None)
    );
    assert!(r.run_after <= r.updated_at);
    assert_eq!(r.progress, Some(0.5));
    assert_eq!(r.error, None);

    // Another worker takes it at once, as its first attempt.
    let b = s
        .lease_job("w2", &stages, lease)
        .await
        .unwrap()
        .expect("a released job is runnable at once");
    assert_eq!((b.id, b.attempts), (job.id, 1));
    assert_eq!(b.leased_by.as_deref(), Some("w2"));
    assert_ne!(b.lease_token, Some(tok_a));

    // The released token is dead.
    let lost =
        |r: &Result<Job>| matches!(r, Err(StoreError::LeaseLost { job_id }) if *job_id == job.id);
    assert!(lost(&s.release_job(job.id, tok_a).await));
    assert!(lost(&s.heartbeat(job.id, tok_a, lease, None).await));
    assert!(lost(&s.complete_job(job.id, tok_a, json!({})).await));

    // Draining again and again never uses up the attempts (max 2).
    let mut tok = b.lease_token.unwrap();
    for _ in 0..5 {
        s.release_job(job.id, tok).await.unwrap();
        let l = s.lease_job("w3", &stages, lease).await.unwrap().unwrap();
        assert_eq!(l.attempts, 1);
        tok = l.lease_token.unwrap();
    }
    // A failed attempt still counts; the release after it gives back only
    // its own.
    s.fail_job(job.id, tok, &failure("internal", "x"), Duration::ZERO)
        .await
        .unwrap();
    let l = s.lease_job("w4", &stages, lease).await.unwrap().unwrap();
    assert_eq!(l.attempts, 2);
    let r = s.release_job(job.id, l.lease_token.unwrap()).await.unwrap();
    assert_eq!((r.status, r.attempts), (JobStatus::Queued, 1));

    // Not leased: LeaseLost. Unknown: NotFound.
    assert!(lost(&s.release_job(job.id, l.lease_token.unwrap()).await));
    let l = s.lease_job("w5", &stages, lease).await.unwrap().unwrap();
    s.complete_job(job.id, l.lease_token.unwrap(), json!({}))
        .await
        .unwrap();
    assert!(lost(&s.release_job(job.id, l.lease_token.unwrap()).await));
    assert_eq!(
        s.get_job(job.id).await.unwrap().status,
        JobStatus::Succeeded
    );
    assert!(s
        .release_job(Uuid::new_v4(), Uuid::new_v4())
        .await
        .unwrap_err()
        .is_not_found());
}

// ---- run driver leases ----

fn is_drive_lost<T: std::fmt::Debug>(r: &Result<T>, run: Uuid) -> bool {
    matches!(r, Err(StoreError::DriveLost { run_id }) if *run_id == run)
}

async fn drive_claims_never_overlap(s: Store) {
    let mut open = HashSet::new();
    for i in 0..30 {
        open.insert(new_run(&s, &format!("drive-{i}")).await.id);
    }
    for i in 0..6 {
        let run = new_run(&s, &format!("done-{i}")).await;
        if i % 2 == 0 {
            let to = [RunStatus::Succeeded, RunStatus::Failed][i / 3];
            s.set_run_status(run.id, to, None).await.unwrap();
        } else {
            s.cancel_run(run.id).await.unwrap();
        }
    }
    let ids: Vec<Uuid> = open.iter().copied().collect();
    let lease = Duration::from_secs(60);
    // Half the claimers sweep with claim_runs, half claim run by run.
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let s = s.clone();
            let mut ids = ids.clone();
            ids.rotate_left(w * 4);
            tokio::spawn(async move {
                let driver = format!("gateway-{w}");
                let mut got = Vec::new();
                if w % 2 == 0 {
                    loop {
                        let batch = s.claim_runs(&driver, lease, 3).await.unwrap();
                        if batch.is_empty() {
                            break;
                        }
                        assert!(batch.len() <= 3);
                        for (run, token) in batch {
                            assert_eq!(run.driver_id.as_deref(), Some(driver.as_str()));
                            assert!(run.driver_expires_at.is_some());
                            assert!(!run.status.is_terminal());
                            got.push((run.id, token));
                        }
                    }
                } else {
                    for id in ids {
                        if let Some(token) = s.claim_run(id, &driver, lease).await.unwrap() {
                            got.push((id, token));
                        }
                    }
                }
                got
            })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.extend(t.await.unwrap());
    }
    let unique: HashSet<Uuid> = seen.iter().map(|(id, _)| *id).collect();
    assert_eq!(unique.len(), seen.len(), "a run was claimed twice");
    assert_eq!(unique, open);
    // Every claim's token is the current one; nothing is left to claim.
    for (id, token) in &seen {
        s.renew_run(*id, *token, lease).await.unwrap();
    }
    assert!(s.claim_runs("late", lease, 100).await.unwrap().is_empty());
    assert!(s.claim_runs("late", lease, 0).await.unwrap().is_empty());

    // Many claimers of one run: exactly one wins.
    let run = new_run(&s, "contended").await;
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move { s.claim_run(run.id, &format!("g{w}"), lease).await.unwrap() })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        winners += t.await.unwrap().is_some() as usize;
    }
    assert_eq!(winners, 1);
}

async fn claim_runs_oldest_first(s: Store) {
    let a = new_run(&s, "a").await;
    let b = new_run(&s, "b").await;
    let c = new_run(&s, "c").await;
    let lease = Duration::from_secs(60);
    let first = s.claim_runs("g1", lease, 2).await.unwrap();
    let ids: Vec<Uuid> = first.iter().map(|(r, _)| r.id).collect();
    assert_eq!(ids, vec![a.id, b.id]);
    assert_ne!(first[0].1, first[1].1, "each claim has its own token");
    let rest = s.claim_runs("g2", lease, 2).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].0.id, c.id);
    assert_eq!(rest[0].0.driver_id.as_deref(), Some("g2"));
}

async fn expired_drive_is_taken_over(s: Store) {
    let run = new_run(&s, "drive").await;
    assert_eq!(
        (run.driver_id.as_deref(), run.driver_expires_at),
        (None, None)
    );
    let short = Duration::from_millis(300);
    let lease = Duration::from_secs(30);
    let t1 = s
        .claim_run(run.id, "g1", short)
        .await
        .unwrap()
        .expect("an undriven run is claimable");
    let held = s.get_run(run.id).await.unwrap();
    assert_eq!(held.driver_id.as_deref(), Some("g1"));
    assert!(held.driver_expires_at.is_some());
    // Held: nobody claims it, not even under the same driver id.
    assert_eq!(s.claim_run(run.id, "g2", lease).await.unwrap(), None);
    assert_eq!(s.claim_run(run.id, "g1", lease).await.unwrap(), None);
    assert!(s.claim_runs("g2", lease, 10).await.unwrap().is_empty());
    // The driver renews and sets the status with its token.
    s.renew_run(run.id, t1, short).await.unwrap();
    let r = s
        .set_run_status_fenced(run.id, t1, RunStatus::Running, None)
        .await
        .unwrap();
    assert_eq!(r.status, RunStatus::Running);
    assert_eq!(r.driver_id.as_deref(), Some("g1"));

    // g1 stalls past its lease; g2 takes over.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let claimed = s.claim_runs("g2", lease, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let (r2, t2) = claimed[0].clone();
    assert_eq!((r2.id, r2.status), (run.id, RunStatus::Running));
    assert_eq!(r2.driver_id.as_deref(), Some("g2"));
    assert!(r2.driver_expires_at > r.driver_expires_at);
    assert_ne!(t1, t2);

    // g1's token is dead: renew and status changes are refused, change nothing.
    assert!(is_drive_lost(&s.renew_run(run.id, t1, lease).await, run.id));
    let late = s
        .set_run_status_fenced(run.id, t1, RunStatus::Failed, Some("late".into()))
        .await;
    assert!(is_drive_lost(&late, run.id), "{late:?}");
    assert_eq!(
        tonic::Status::from(late.unwrap_err()).code(),
        tonic::Code::Aborted
    );
    s.release_run(run.id, t1).await.unwrap(); // no-op
    let now = s.get_run(run.id).await.unwrap();
    assert_eq!((now.status, now.error), (RunStatus::Running, None));
    assert_eq!(now.driver_id.as_deref(), Some("g2"));

    // g2 finishes the run and releases it.
    s.renew_run(run.id, t2, lease).await.unwrap();
    let done = s
        .set_run_status_fenced(run.id, t2, RunStatus::Succeeded, None)
        .await
        .unwrap();
    assert_eq!(done.status, RunStatus::Succeeded);
    assert!(is_failed_precondition(
        &s.set_run_status_fenced(run.id, t2, RunStatus::Running, None)
            .await
    ));
    s.release_run(run.id, t2).await.unwrap();
    let released = s.get_run(run.id).await.unwrap();
    assert_eq!(
        (released.driver_id, released.driver_expires_at),
        (None, None)
    );
    assert!(is_drive_lost(&s.renew_run(run.id, t2, lease).await, run.id));

    // A released run is claimable at once.
    let other = new_run(&s, "handover").await;
    let t = s.claim_run(other.id, "g1", lease).await.unwrap().unwrap();
    s.release_run(other.id, t).await.unwrap();
    let t3 = s.claim_run(other.id, "g3", lease).await.unwrap();
    assert!(t3.is_some() && t3 != Some(t));

    // Unknown runs.
    let id = Uuid::new_v4();
    assert!(s
        .claim_run(id, "g", lease)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(s.renew_run(id, t1, lease).await.unwrap_err().is_not_found());
    assert!(s
        .set_run_status_fenced(id, t1, RunStatus::Running, None)
        .await
        .unwrap_err()
        .is_not_found());
    s.release_run(id, t1).await.unwrap();
}

async fn terminal_runs_are_never_claimed(s: Store) {
    let lease = Duration::from_secs(30);
    let succeeded = new_run(&s, "succeeded").await;
    s.set_run_status(succeeded.id, RunStatus::Succeeded, None)
        .await
        .unwrap();
    let failed = new_run(&s, "failed").await;
    s.set_run_status(failed.id, RunStatus::Failed, Some("x".into()))
        .await
        .unwrap();
    let cancelled = new_run(&s, "cancelled").await;
    s.cancel_run(cancelled.id).await.unwrap();
    for id in [succeeded.id, failed.id, cancelled.id] {
        assert_eq!(s.claim_run(id, "g", lease).await.unwrap(), None);
    }
    assert!(s.claim_runs("g", lease, 10).await.unwrap().is_empty());

    // A run finished by its driver is not claimed after the lease lapses.
    let run = new_run(&s, "finished-under-driver").await;
    let t = s
        .claim_run(run.id, "g1", Duration::from_millis(200))
        .await
        .unwrap()
        .unwrap();
    s.set_run_status_fenced(run.id, t, RunStatus::Succeeded, None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(s.claim_run(run.id, "g2", lease).await.unwrap(), None);
    assert!(s.claim_runs("g2", lease, 10).await.unwrap().is_empty());

    // A cancel while driven: the driver cannot flip it back.
    let run = new_run(&s, "cancelled-under-driver").await;
    let t = s.claim_run(run.id, "g1", lease).await.unwrap().unwrap();
    s.set_run_status_fenced(run.id, t, RunStatus::Running, None)
        .await
        .unwrap();
    s.cancel_run(run.id).await.unwrap();
    for to in [RunStatus::Running, RunStatus::Succeeded, RunStatus::Failed] {
        assert!(is_failed_precondition(
            &s.set_run_status_fenced(run.id, t, to, None).await
        ));
    }
    assert_eq!(
        s.get_run(run.id).await.unwrap().status,
        RunStatus::Cancelled
    );
    assert!(s.claim_runs("g2", lease, 10).await.unwrap().is_empty());
}

/// Expands every case into one `#[tokio::test]` per backend: a module per
/// backend, a test per case, each on a fresh [`Fixture`].
macro_rules! metadata_test_suite {
    (backends: [$($backend:ident),* $(,)?], cases: $cases:tt $(,)?) => {
        $( metadata_test_suite!(@backend $backend, $cases); )*
    };
    (@backend $backend:ident, [$($case:ident),* $(,)?]) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let fixture = super::Fixture::$backend().await;
                    super::$case(fixture.store.clone()).await;
                    fixture.finish().await;
                }
            )*
        }
    };
}

metadata_test_suite!(
    backends: [sqlite_file, sqlite_memory, postgres],
    cases: [
        runs_are_idempotent,
        not_found,
        enqueue_is_idempotent,
        concurrent_leasers_never_share,
        oldest_job_first,
        lease_expiry_and_release,
        retries_with_backoff_then_fail,
        abort_fails_at_once,
        upserts_do_not_duplicate,
        views_report_figures,
        events_are_ordered,
        api_keys,
        cancel_cancels_jobs,
        concurrent_writers,
        structured_failures_round_trip,
        finished_runs_stay_finished,
        cancelling_a_finished_run_fails,
        cancel_is_idempotent,
        cancel_races_success,
        stale_fence_is_refused,
        finished_job_fence_is_refused,
        fence_names_a_leased_job_of_the_run,
        fenced_writes_race_release,
        release_does_not_count_an_attempt,
        drive_claims_never_overlap,
        claim_runs_oldest_first,
        expired_drive_is_taken_over,
        terminal_runs_are_never_claimed,
    ],
);

/// A fresh store of one backend, and what has to live as long as it.
struct Fixture {
    store: Store,
    _dir: Option<tempfile::TempDir>,
    pg: Option<Pg>,
}

impl Fixture {
    async fn sqlite_file() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/nested/meta.db", dir.path().display());
        Self::new(connect(&url).await.unwrap(), "sqlite", Some(dir), None).await
    }

    async fn sqlite_memory() -> Self {
        let store = connect("sqlite::memory:").await.unwrap();
        Self::new(store, "sqlite", None, None).await
    }

    async fn postgres() -> Self {
        let pg = Pg::fresh().await;
        let store = connect(pg.url()).await.unwrap();
        Self::new(store, "postgres", None, Some(pg)).await
    }

    async fn new(
        store: Store,
        backend: &str,
        dir: Option<tempfile::TempDir>,
        pg: Option<Pg>,
    ) -> Self {
        assert_eq!(store.backend(), backend);
        store.ping().await.unwrap();
        Fixture {
            store,
            _dir: dir,
            pg,
        }
    }

    /// Drops the Postgres database (a panicking test drops it with the guard).
    async fn finish(self) {
        if let Some(pg) = &self.pg {
            pg.drop_db().await;
        }
    }
}

#[tokio::test]
async fn sqlite_file_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/meta.db", dir.path().display());
    let store = connect(&url).await.unwrap();
    let run = new_run(&store, "kept").await;
    drop(store);
    // Reopening runs the (already applied) migrations again without error.
    let again = connect(&url).await.unwrap();
    assert_eq!(again.get_run(run.id).await.unwrap(), run);
}

#[tokio::test]
async fn postgres_migrations_are_idempotent() {
    let pg = Pg::fresh().await;
    let store = connect(pg.url()).await.unwrap();
    let run = new_run(&store, "kept").await;
    let again = connect(pg.url()).await.unwrap();
    assert_eq!(again.get_run(run.id).await.unwrap(), run);
    pg.drop_db().await;
}

#[tokio::test]
async fn sqlite_times_are_fixed_width_text() {
    // Times compare as text on SQLite, so every one must have the same width.
    let sqlite = SqliteStore::in_memory().await.unwrap();
    let s: Store = Arc::new(sqlite.clone());
    let st = stage("train");
    let run = new_run(&s, "times").await;
    let job = enqueue(&s, run.id, &st, 2).await;
    let l = lease_one(&s, &st).await;
    s.heartbeat(
        job.id,
        l.lease_token.unwrap(),
        Duration::from_millis(1500),
        None,
    )
    .await
    .unwrap();
    let f = s
        .fail_job(
            job.id,
            l.lease_token.unwrap(),
            &failure("internal", "x"),
            Duration::from_secs_f64(0.25),
        )
        .await
        .unwrap();
    assert!(f.run_after > f.updated_at);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let l = lease_one(&s, &st).await;
    assert!(l.lease_expires_at.unwrap() > l.updated_at);
    s.record_metric(None, run.id, "train", "acc", 1, 0.5)
        .await
        .unwrap();
    s.append_event(None, run.id, "train", "started", "x", None)
        .await
        .unwrap();
    let times: Vec<String> = sqlx::query_scalar(
        "SELECT created_at FROM runs UNION ALL SELECT updated_at FROM runs \
         UNION ALL SELECT run_after FROM stage_jobs \
         UNION ALL SELECT lease_expires_at FROM stage_jobs \
         UNION ALL SELECT recorded_at FROM metrics UNION ALL SELECT created_at FROM run_events",
    )
    .fetch_all(sqlite.pool())
    .await
    .unwrap();
    assert_eq!(times.len(), 6);
    for t in times {
        assert_eq!(t.len(), "2026-01-01T00:00:00.000000Z".len(), "{t}");
        assert!(t.ends_with('Z'), "{t}");
    }
}

#[tokio::test]
async fn bad_urls_are_rejected() {
    for url in ["mysql://x/y", "sqlite://", "/no/scheme.db"] {
        assert!(
            matches!(connect(url).await, Err(StoreError::InvalidUrl { .. })),
            "{url}"
        );
    }
    // sqlite:path (no slashes) works too.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rel.db");
    let store = connect(&format!("sqlite:{}", path.display()))
        .await
        .unwrap();
    store.ping().await.unwrap();
    assert!(path.exists());
}
