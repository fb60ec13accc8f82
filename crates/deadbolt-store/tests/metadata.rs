//! The metadata-store behaviour suite, written once against
//! `Arc<dyn MetadataStore>` and run on SQLite (a temp file) and Postgres
//! (a fresh database on DEADBOLT_TEST_PG_URL, default
//! postgres://postgres@127.0.0.1:5432/postgres, dropped afterwards).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadbolt_store::*;
use futures::FutureExt;
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
        .record_metric(id, "train", "acc", 0, 1.0)
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

async fn lease_expiry_and_relase(s: Store) {
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
        s.fail_job(job.id, tok_a, "late", Duration::ZERO).await
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
            "oom",
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    assert_eq!((f.status, f.attempts), (JobStatus::Queued, 1));
    assert_eq!(f.error.as_deref(), Some("oom"));
    assert!(f.lease_token.is_none());
    // Backing off: not runnable yet.
    assert!(s.lease_job("w", &stages, lease).await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let b = s.lease_job("w", &stages, lease).await.unwrap().unwrap();
    assert_eq!(b.attempts, 2);
    let f = s
        .fail_job(job.id, b.lease_token.unwrap(), "oom again", Duration::ZERO)
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
    assert!(j.error.unwrap().contains("lease expired"));
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
        s.abort_job(job.id, Uuid::new_v4(), "x").await,
        Err(StoreError::LeaseLost { .. })
    ));
    let f = s.abort_job(job.id, tok, "checksum mismatch").await.unwrap();
    assert_eq!((f.status, f.attempts), (JobStatus::Failed, 1));
    assert_eq!(f.error.as_deref(), Some("checksum mismatch"));
    assert!(f.lease_token.is_none());
    // Attempts were left, but the job is not leased again.
    assert!(s.lease_job("w", &stages, lease).await.unwrap().is_none());
}

async fn upserts_do_not_duplicate(s: Store) {
    let run = new_run(&s, "upserts").await;
    for v in [0.5, 0.9] {
        s.record_metric(run.id, "train-clean", "loss", 3, v)
            .await
            .unwrap();
    }
    s.record_metric(run.id, "train-clean", "loss", 4, 0.1)
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
    s.put_neuron_stats(run.id, &stats).await.unwrap();
    let mut again = stats.clone();
    again[0].value = 42.0;
    s.put_neuron_stats(run.id, &again).await.unwrap();
    let got = s.list_neuron_stats(run.id).await.unwrap();
    assert_eq!(got.len(), 16);
    assert!(got.iter().any(|n| n.value == 42.0 && n.channel == 0));
    let mut bad = stats[0].clone();
    bad.norm = "l3".into();
    assert!(matches!(
        s.put_neuron_stats(run.id, &[bad]).await,
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
    s.put_pruning_curve(run.id, "linf", &curve).await.unwrap();
    s.put_pruning_curve(run.id, "linf", &curve).await.unwrap();
    s.put_pruning_curve(run.id, "l1", &curve[..3])
        .await
        .unwrap();
    s.set_pruning_choice(run.id, "linf", curve[2])
        .await
        .unwrap();
    s.set_pruning_choice(run.id, "linf", curve[4])
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
    s.record_artifact(rec.clone()).await.unwrap();
    let mut rec2 = rec.clone();
    rec2.size = 11;
    rec2.sha256 = "cd".repeat(32);
    s.record_artifact(rec2.clone()).await.unwrap();
    assert_eq!(s.list_artifacts(run.id).await.unwrap(), vec![rec2.clone()]);
    assert_eq!(
        s.get_artifact(run.id, "model.safetensors").await.unwrap(),
        rec2
    );
    let mut bad = rec.clone();
    bad.sha256 = "nothex".into();
    assert!(matches!(
        s.record_artifact(bad).await,
        Err(StoreError::Invalid { .. })
    ));
}

async fn views_report_figures(s: Store) {
    let run = new_run(&s, "summary").await;
    let sum = s.run_summary(run.id).await.unwrap();
    assert_eq!(sum.name, "summary");
    assert_eq!((sum.clean_acc, sum.linf), (None, None));
    s.record_metric(run.id, "train-clean", metric_names::CLEAN_ACC, 1, 0.90)
        .await
        .unwrap();
    s.record_metric(run.id, "train-clean", metric_names::CLEAN_ACC, 2, 0.976)
        .await
        .unwrap();
    s.record_metric(
        run.id,
        "train-backdoored",
        metric_names::BACKDOORED_ACC,
        6,
        0.975,
    )
    .await
    .unwrap();
    s.record_metric(
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
    s.put_pruning_curve(run.id, HEADLINE_CRITERION, &[p])
        .await
        .unwrap();
    s.set_pruning_choice(run.id, HEADLINE_CRITERION, p)
        .await
        .unwrap();
    s.set_pruning_choice(
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
        .append_event(run.id, "train", "started", "training", Some(0.0))
        .await
        .unwrap();
    s.append_event(other.id, "train", "started", "other", None)
        .await
        .unwrap();
    let b = s
        .append_event(run.id, "train", "progress", "epoch 1", Some(0.5))
        .await
        .unwrap();
    let c = s
        .append_event(run.id, "train", "finished", "done", Some(1.0))
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
        .append_event(Uuid::new_v4(), "x", "y", "z", None)
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

async fn cancel(s: Store) {
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
    // Idempotent; a finished run stays finished.
    assert_eq!(
        s.cancel_run(run.id).await.unwrap().status,
        RunStatus::Cancelled
    );
    let fin = new_run(&s, "finished").await;
    s.set_run_status(fin.id, RunStatus::Succeeded, None)
        .await
        .unwrap();
    assert_eq!(
        s.cancel_run(fin.id).await.unwrap().status,
        RunStatus::Succeeded
    );
}

async fn concurrent_writers(s: Store) {
    // Many writers at once must neither fail (e.g. SQLITE_BUSY) nor lose rows.
    let run = new_run(&s, "writers").await;
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                for step in 0..10 {
                    s.record_metric(run.id, "train", &format!("loss-{w}"), step, 0.5)
                        .await
                        .unwrap();
                    s.append_event(run.id, "train", "progress", "step", None)
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
                s.put_neuron_stats(run.id, &stats).await.unwrap();
                let pts: Vec<CurvePoint> = (0..8)
                    .map(|k| CurvePoint {
                        k,
                        acc: 0.9,
                        asr: 0.1,
                        ra: 0.5,
                    })
                    .collect();
                s.put_pruning_curve(run.id, &format!("c{w}"), &pts)
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

/// Runs every case against one store.
async fn run_suite(s: Store) {
    macro_rules! case {
        ($f:ident) => {{
            let t = Instant::now();
            $f(s.clone()).await;
            eprintln!(
                "[{}] {} ok ({:?})",
                s.backend(),
                stringify!($f),
                t.elapsed()
            );
        }};
    }
    s.ping().await.unwrap();
    case!(runs_are_idempotent);
    case!(not_found);
    case!(enqueue_is_idempotent);
    case!(concurrent_leasers_never_share);
    case!(oldest_job_first);
    case!(lease_expiry_and_relase);
    case!(retries_with_backoff_then_fail);
    case!(abort_fails_at_once);
    case!(upserts_do_not_duplicate);
    case!(views_report_figures);
    case!(events_are_ordered);
    case!(api_keys);
    case!(cancel);
    case!(concurrent_writers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_suite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/nested/meta.db", dir.path().display());
    let store = connect(&url).await.unwrap();
    assert_eq!(store.backend(), "sqlite");
    run_suite(store.clone()).await;
    // Reopening runs the (already applied) migrations again without error.
    drop(store);
    let again = connect(&url).await.unwrap();
    assert!(!again.list_runs(10, 0).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_in_memory_suite() {
    let store = connect("sqlite::memory:").await.unwrap();
    assert_eq!(store.backend(), "sqlite");
    run_suite(store).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_suite() {
    let admin_url = std::env::var("DEADBOLT_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let admin = sqlx::PgPool::connect(&admin_url).await.unwrap_or_else(|e| {
        panic!("cannot reach Postgres at {admin_url} ({e}); start it or set DEADBOLT_TEST_PG_URL")
    });
    let db = format!("deadbolt_test_{}", Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&admin)
        .await
        .unwrap();
    let mut url = url::Url::parse(&admin_url).unwrap();
    url.set_path(&format!("/{db}"));
    let outcome = std::panic::AssertUnwindSafe(async {
        let store = connect(url.as_str()).await.unwrap();
        assert_eq!(store.backend(), "postgres");
        run_suite(store).await;
        // Migrations are idempotent.
        connect(url.as_str()).await.unwrap();
    })
    .catch_unwind()
    .await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .unwrap();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
