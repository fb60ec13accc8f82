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
    new_run_in(s, LOCAL_TEAM, name).await
}

async fn new_run_in(s: &Store, team: &str, name: &str) -> Run {
    s.create_run(NewRun {
        team: team.into(),
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

/// Leases the runnable job of `stage`. A row that a concurrent fenced
/// write holds `FOR SHARE` is skipped by the leaser (SKIP LOCKED) until that
/// write commits, so this retries for a moment before giving up.
async fn lease_one(s: &Store, stage: &str) -> Job {
    for _ in 0..100 {
        if let Some(j) = s
            .lease_job("w", &[stage.to_string()], Duration::from_secs(30))
            .await
            .unwrap()
        {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("a runnable job")
}

fn is_failed_precondition<T: std::fmt::Debug>(r: &Result<T>) -> bool {
    matches!(r, Err(StoreError::FailedPrecondition(_)))
}

async fn runs_are_idempotent(s: Store) {
    let key = format!("req-{}", Uuid::new_v4());
    let new = NewRun {
        team: LOCAL_TEAM.into(),
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
                team: LOCAL_TEAM.into(),
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
    let listed = s.list_runs(None, 1000, 0).await.unwrap();
    assert!(listed.iter().any(|r| r.id == a.id));
    assert_eq!(s.list_runs(None, 1, 0).await.unwrap().len(), 1);
    assert_eq!(a.team, LOCAL_TEAM);

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

/// Waits (at most 5 s) for a change of `run` of `kind`, skipping others
/// (on Postgres a change also comes back through the store's own LISTEN
/// connection, after later local ones).
async fn expect_change(
    rx: &mut tokio::sync::broadcast::Receiver<Change>,
    run: Uuid,
    kind: ChangeKind,
) {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let c = rx.recv().await.expect("the change channel is open");
            if c == (Change { run_id: run, kind }) {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind:?} change of run {run} within 5 s"))
}

async fn changes_name_their_kind(s: Store) {
    let mut rx = s.changes();
    let run = new_run(&s, "changes").await;
    let st = stage("kinds");
    enqueue(&s, run.id, &st, 2).await;
    expect_change(&mut rx, run.id, ChangeKind::Job).await;
    let a = lease_one(&s, &st).await;
    let fence = Fence {
        job_id: a.id,
        lease_token: a.lease_token.unwrap(),
    };
    s.append_event(Some(&fence), run.id, &st, "progress", "half", Some(0.5))
        .await
        .unwrap();
    expect_change(&mut rx, run.id, ChangeKind::Event).await;
    s.set_run_status(run.id, RunStatus::Running, None)
        .await
        .unwrap();
    expect_change(&mut rx, run.id, ChangeKind::Run).await;
    s.fail_job(
        a.id,
        fence.lease_token,
        &failure("unavailable", "x"),
        Duration::ZERO,
    )
    .await
    .unwrap();
    expect_change(&mut rx, run.id, ChangeKind::Job).await;
    let b = lease_one(&s, &st).await;
    s.complete_job(b.id, b.lease_token.unwrap(), json!({}))
        .await
        .unwrap();
    expect_change(&mut rx, run.id, ChangeKind::Job).await;
    s.cancel_run(new_run(&s, "other").await.id).await.unwrap();
    s.cancel_run(run.id).await.unwrap();
    expect_change(&mut rx, run.id, ChangeKind::Run).await;
}

/// `next_lease_at` is within `tol` of `now + ahead` (by this process's
/// clock; the local Postgres's is the same).
async fn assert_next_lease(s: &Store, stages: &[String], ahead: Option<f64>) {
    let next = s.next_lease_at(stages).await.unwrap();
    match (next, ahead) {
        (None, None) => {}
        (Some(at), Some(ahead)) => {
            let got = (at - chrono::Utc::now()).num_milliseconds() as f64 / 1000.0;
            assert!(
                (got - ahead).abs() < 3.0,
                "next lease in {got} s, expected {ahead} s"
            );
        }
        (next, ahead) => panic!("next lease at {next:?}, expected in {ahead:?} s"),
    }
}

async fn next_lease_time_follows_backoff_and_leases(s: Store) {
    let st = stage("next");
    let stages = vec![st.clone()];
    assert_next_lease(&s, &stages, None).await;
    let run = new_run(&s, "next").await;
    let job = enqueue(&s, run.id, &st, 3).await;
    // a job of another stage does not count
    enqueue(&s, run.id, &stage("other"), 3).await;
    assert_next_lease(&s, &stages, Some(0.0)).await;
    let a = s
        .lease_job("w", &stages, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_next_lease(&s, &stages, Some(30.0)).await;
    s.fail_job(
        job.id,
        a.lease_token.unwrap(),
        &failure("unavailable", "x"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_next_lease(&s, &stages, Some(10.0)).await;
    // the earliest of several
    let st2 = stage("next");
    enqueue(&s, run.id, &st2, 3).await;
    assert_next_lease(&s, &[st.clone(), st2.clone()], Some(0.0)).await;
    let b = lease_one(&s, &st2).await;
    s.abort_job(b.id, b.lease_token.unwrap(), &failure("internal", "x"))
        .await
        .unwrap();
    assert_next_lease(&s, &[st.clone(), st2], Some(10.0)).await;
    s.cancel_run(run.id).await.unwrap();
    assert_next_lease(&s, &stages, None).await;
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
    // more rows than one multi-row statement holds, and a key given twice
    // in one call: every row stored, the later value of the repeated key
    let many: Vec<NeuronStat> = (0..2600)
        .map(|c| NeuronStat {
            layer: "conv1".into(),
            model: "clean".into(),
            input: "clean".into(),
            norm: "l2".into(),
            channel: c % 2500,
            value: c as f64,
        })
        .collect();
    s.put_neuron_stats(None, run.id, &many).await.unwrap();
    let got = s.list_neuron_stats(run.id).await.unwrap();
    assert_eq!(got.len(), 16 + 2500);
    let conv1: Vec<f64> = got
        .iter()
        .filter(|n| n.layer == "conv1")
        .map(|n| n.value)
        .collect();
    let want: Vec<f64> = (0..2500)
        .map(|c| if c < 100 { (c + 2500) as f64 } else { c as f64 })
        .collect();
    assert_eq!(conv1, want);
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
    // a k given twice in one call: the later point
    let mut twice = curve[..3].to_vec();
    twice.push(CurvePoint {
        acc: 0.5,
        ..curve[1]
    });
    let other = new_run(&s, "curve-twice").await;
    s.put_pruning_curve(None, other.id, "l2", &twice)
        .await
        .unwrap();
    let l2 = s.list_pruning_curves(other.id).await.unwrap();
    let l2 = &l2[0].points;
    assert_eq!(l2.len(), 3);
    assert_eq!(l2[1].acc, 0.5);
    assert_eq!((l2[0], l2[2]), (curve[0], curve[2]));
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

async fn scan_results_upsert_and_fill_their_view(s: Store) {
    let run = new_run(&s, "vendor-scan").await;
    assert!(matches!(
        s.get_scan_result(run.id).await,
        Err(StoreError::NotFound { .. })
    ));
    // the scan stage writes the verdict ...
    let scan = ScanResult {
        model: "vendor-net".into(),
        verdict: "backdoored".into(),
        suspect_label: Some(7),
        anomaly_index: Some(4.25),
        clean_acc: 0.981,
        repaired: false,
        acc_before: None,
        asr_before: None,
        acc_after: None,
        asr_after: None,
        pruned_channels: None,
        met: None,
    };
    s.put_scan_result(None, run.id, &scan).await.unwrap();
    assert_eq!(s.get_scan_result(run.id).await.unwrap(), scan);
    // ... the repair stage rewrites the row with its figures
    let repaired = ScanResult {
        repaired: true,
        acc_before: Some(0.98),
        asr_before: Some(1.0),
        acc_after: Some(0.975),
        asr_after: Some(0.01),
        pruned_channels: Some(0),
        met: Some(true),
        ..scan.clone()
    };
    s.put_scan_result(None, run.id, &repaired).await.unwrap();
    assert_eq!(s.get_scan_result(run.id).await.unwrap(), repaired);
    // a verdict outside the three is refused and changes nothing
    let bad = ScanResult {
        verdict: "maybe".into(),
        ..scan.clone()
    };
    let e = s.put_scan_result(None, run.id, &bad).await.unwrap_err();
    assert!(e.to_string().contains("verdict"), "{e}");
    assert_eq!(s.get_scan_result(run.id).await.unwrap(), repaired);
    // a run that does not exist
    let e = s
        .put_scan_result(None, Uuid::new_v4(), &scan)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound { .. }), "{e:?}");
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

// ---- teams and API keys ----

/// A new team name.
fn team(tag: &str) -> String {
    format!("{tag}-{}", &Uuid::new_v4().simple().to_string()[..12])
}

async fn new_team(s: &Store, tag: &str) -> String {
    let name = team(tag);
    let t = s.create_team(&name).await.unwrap();
    assert_eq!(t.name, name);
    name
}

async fn quota_is_exact_under_concurrent_submits(s: Store) {
    let t = new_team(&s, "quota").await;
    let submits = (0..24).map(|i| {
        let (s, t) = (s.clone(), t.clone());
        tokio::spawn(async move {
            s.create_run_within(
                NewRun {
                    team: t,
                    client_request_id: Some(format!("req-{i}")),
                    name: format!("r{i}"),
                    spec_json: json!({"i": i}),
                },
                8,
            )
            .await
        })
    });
    let mut created = Vec::new();
    let mut refused = 0;
    for h in futures::future::join_all(submits).await {
        match h.unwrap() {
            Ok((run, true)) => created.push(run),
            Ok((_, false)) => panic!("no request id was reused"),
            Err(StoreError::QuotaExceeded(m)) => {
                assert!(m.contains("quota is 8"), "{m}");
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((created.len(), refused), (8, 16));
    assert_eq!(
        s.count_runs(&t, &[RunStatus::Queued, RunStatus::Running])
            .await
            .unwrap(),
        8
    );
    // a retry of a created request answers its run, at quota too
    let first = &created[0];
    let (again, fresh) = s
        .create_run_within(
            NewRun {
                team: t.clone(),
                client_request_id: first.client_request_id.clone(),
                name: first.name.clone(),
                spec_json: first.spec_json.clone(),
            },
            8,
        )
        .await
        .unwrap();
    assert!(!fresh);
    assert_eq!(again.id, first.id);
    // another team's quota is its own
    let other = new_team(&s, "quota-b").await;
    let (_, fresh) = s
        .create_run_within(
            NewRun {
                team: other,
                client_request_id: None,
                name: "b".into(),
                spec_json: json!({}),
            },
            8,
        )
        .await
        .unwrap();
    assert!(fresh);
    // an unknown team is NotFound
    assert!(s
        .create_run_within(
            NewRun {
                team: "no-such-team".into(),
                client_request_id: None,
                name: "x".into(),
                spec_json: json!({}),
            },
            8,
        )
        .await
        .unwrap_err()
        .is_not_found());
}

async fn leasing_is_fair_across_teams(s: Store) {
    let st = stage("fair");
    let busy = new_team(&s, "busy").await;
    let quiet = new_team(&s, "quiet").await;
    let mut busy_jobs = Vec::new();
    for i in 0..5 {
        let run = new_run_in(&s, &busy, &format!("b{i}")).await;
        busy_jobs.push(enqueue(&s, run.id, &st, 2).await.id);
    }
    let run = new_run_in(&s, &quiet, "q").await;
    let quiet_job = enqueue(&s, run.id, &st, 2).await.id;
    let lease = |w: &'static str| {
        let (s, st) = (s.clone(), st.clone());
        async move {
            s.lease_job(w, std::slice::from_ref(&st), Duration::from_secs(30))
                .await
                .unwrap()
                .unwrap()
        }
    };
    // the oldest job first; then the quiet team's one, although the busy
    // team's four others are older
    assert_eq!(lease("w1").await.id, busy_jobs[0]);
    assert_eq!(lease("w2").await.id, quiet_job);
    // both teams run one now: the busy team's oldest queued job
    assert_eq!(lease("w3").await.id, busy_jobs[1]);
}

async fn teams_are_validated_and_unique(s: Store) {
    let a = new_team(&s, "alpha").await;
    let b = new_team(&s, "0-beta").await;
    assert!(matches!(
        s.create_team(&a).await,
        Err(StoreError::Conflict(_))
    ));
    // `local` always exists.
    assert!(matches!(
        s.create_team(LOCAL_TEAM).await,
        Err(StoreError::Conflict(_))
    ));
    let long = "a".repeat(65);
    for bad in ["", "Upper", "a_b", "a b", "a/b", "é", "../x", long.as_str()] {
        match s.create_team(bad).await {
            Err(StoreError::Invalid { field: "team", .. }) => {}
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    s.create_team(&"z".repeat(64)).await.unwrap();
    let names: Vec<String> = s
        .list_teams()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    for t in [&a, &b, &LOCAL_TEAM.to_string(), &"z".repeat(64)] {
        assert!(names.contains(t), "{t} in {names:?}");
    }
    assert_eq!(names.len(), 4);
}

/// Every value of every table of the database, as text.
async fn dump(db: &Db) -> Vec<String> {
    use sqlx::Row;
    let mut out = Vec::new();
    match db {
        Db::Pg(pool) => {
            let tables: Vec<String> = sqlx::query_scalar(
                "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema()",
            )
            .fetch_all(pool)
            .await
            .unwrap();
            assert!(tables.contains(&"api_keys".to_string()), "{tables:?}");
            for t in tables {
                let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT row_to_json(t)::text FROM \"{t}\" t"
                )))
                .fetch_all(pool)
                .await
                .unwrap();
                out.extend(rows.into_iter().map(|r| format!("{t}: {r}")));
            }
        }
        Db::Sqlite(pool) => {
            let tables: Vec<String> =
                sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
                    .fetch_all(pool)
                    .await
                    .unwrap();
            assert!(tables.contains(&"api_keys".to_string()), "{tables:?}");
            for t in tables {
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT * FROM \"{t}\"")))
                    .fetch_all(pool)
                    .await
                    .unwrap();
                for row in rows {
                    for i in 0..row.len() {
                        // Any column as bytes (SQLite converts numbers to text).
                        let v: Option<Vec<u8>> = row.try_get_unchecked(i).unwrap();
                        if let Some(v) = v {
                            out.push(format!("{t}: {}", String::from_utf8_lossy(&v)));
                        }
                    }
                }
            }
        }
    }
    out
}

/// The dashboards' `scan_summary` view: one row per scan run, with its
/// team and name, the verdict and the repair figures, the same on both
/// backends.
async fn scan_summary_view_reads_like_the_store(s: Store, db: Db) {
    let t = new_team(&s, "scanners").await;
    let run = new_run_in(&s, &t, "vendor-net").await;
    let _no_scan = new_run(&s, "experiment").await;
    let r = ScanResult {
        model: "vendor-net".into(),
        verdict: "backdoored".into(),
        suspect_label: Some(7),
        anomaly_index: Some(4.25),
        clean_acc: 0.981,
        repaired: true,
        acc_before: Some(0.98),
        asr_before: Some(1.0),
        acc_after: Some(0.975),
        asr_after: Some(0.0125),
        pruned_channels: Some(2),
        met: Some(true),
    };
    s.put_scan_result(None, run.id, &r).await.unwrap();
    let q = "SELECT team, name, status, model, verdict, suspect_label, anomaly_index, \
             clean_acc, repaired, acc_before, asr_before, acc_after, asr_after, \
             pruned_channels, met FROM scan_summary";
    type Row = (String, String, String, ScanResult);
    // the same decoding on either driver's rows
    macro_rules! read {
        ($pool:expr) => {
            sqlx::query(q)
                .fetch_all($pool)
                .await
                .unwrap()
                .iter()
                .map(|row| {
                    use sqlx::{FromRow, Row as _};
                    (
                        row.get("team"),
                        row.get("name"),
                        row.get("status"),
                        ScanResult::from_row(row).unwrap(),
                    )
                })
                .collect()
        };
    }
    let rows: Vec<Row> = match &db {
        Db::Pg(pool) => read!(pool),
        Db::Sqlite(pool) => read!(pool),
    };
    assert_eq!(
        rows,
        vec![(t.clone(), "vendor-net".to_string(), "queued".to_string(), r)]
    );
}

async fn api_keys_are_shown_once_and_stored_hashed(s: Store, db: Db) {
    let t = new_team(&s, "hashed").await;
    let (k, key) = s
        .create_api_key(&t, "ci", &[Scope::Submit, Scope::Read], None)
        .await
        .unwrap();
    // dbk_ and 64 hex digits: 32 random bytes.
    let body = key.strip_prefix("dbk_").expect("keys start with dbk_");
    assert_eq!(body.len(), 64);
    assert!(body
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!((k.team.as_str(), k.name.as_str()), (t.as_str(), "ci"));
    assert_eq!(k.scopes, [Scope::Submit, Scope::Read]);
    assert!(
        k.prefix.len() <= 12 && key.starts_with(&k.prefix),
        "{}",
        k.prefix
    );
    assert!(k.prefix.len() > 4);
    assert_eq!(
        (k.expires_at, k.revoked_at, k.last_used_at),
        (None, None, None)
    );
    let (k2, key2) = s
        .create_api_key(&t, "ci", &[Scope::Read], None)
        .await
        .unwrap();
    assert_ne!(key, key2);
    assert_ne!(k.id, k2.id);
    // The key works (and its use is recorded in the table).
    assert_eq!(s.authenticate(&key).await.unwrap().unwrap().key_id, k.id);

    // Listing never shows a key again.
    let listed = s.list_api_keys(Some(&t)).await.unwrap();
    assert_eq!(listed.len(), 2);
    let json = serde_json::to_string(&listed).unwrap();
    let secret = &key[k.prefix.len()..];
    assert!(!json.contains(secret) && !json.contains(&key2[k2.prefix.len()..]));

    // The database holds the key's sha256 and its prefix, nothing more of it.
    let hash = sha256_hex(key.as_bytes());
    let values = dump(&db).await;
    assert!(
        values.iter().any(|v| v.contains(&hash)),
        "the hash is stored"
    );
    for v in &values {
        assert!(!v.contains(secret), "the key is stored in clear: {v}");
        assert!(!v.contains(&key2[k2.prefix.len()..]), "{v}");
        assert!(!v.contains(body), "{v}");
    }
}

async fn keys_authenticate_until_revoked_or_expired(s: Store) {
    let t = new_team(&s, "keys").await;
    let other = new_team(&s, "others").await;
    let (k, key) = s
        .create_api_key(&t, "deploy", &[Scope::Submit, Scope::Read], None)
        .await
        .unwrap();
    let p = s.authenticate(&key).await.unwrap().expect("a valid key");
    assert_eq!(
        p,
        Principal {
            team: t.clone(),
            key_id: k.id,
            key_name: "deploy".into(),
            scopes: vec![Scope::Submit, Scope::Read],
        }
    );
    let used = s.list_api_keys(Some(&t)).await.unwrap();
    assert!(used[0].last_used_at.is_some());

    // Unknown keys.
    let zeros = format!("dbk_{}", "0".repeat(64));
    let upper = key.to_ascii_uppercase();
    let huge = format!("{key}{}", "0".repeat(10_000));
    for bad in [
        "",
        "dbk_nope",
        zeros.as_str(),
        &key[..key.len() - 1],
        &key[4..],
        upper.as_str(),
        huge.as_str(),
        k.prefix.as_str(),
    ] {
        assert_eq!(s.authenticate(bad).await.unwrap(), None, "{bad:?}");
    }

    // Expiry.
    let past = chrono::Utc::now() - chrono::Duration::minutes(5);
    let future = chrono::Utc::now() + chrono::Duration::hours(1);
    let (e, expired) = s
        .create_api_key(&t, "old", &[Scope::Read], Some(past))
        .await
        .unwrap();
    assert!(e.expires_at.is_some());
    assert_eq!(s.authenticate(&expired).await.unwrap(), None);
    let (f, fresh) = s
        .create_api_key(&t, "new", &[Scope::Read], Some(future))
        .await
        .unwrap();
    let at = f.expires_at.unwrap();
    assert!(
        (at - future).num_milliseconds().abs() < 1000,
        "{at} vs {future}"
    );
    assert!(s.authenticate(&fresh).await.unwrap().is_some());
    let f2 = s.set_api_key_expiry(f.id, Some(past)).await.unwrap();
    assert!(f2.expires_at.unwrap() < chrono::Utc::now());
    assert_eq!(s.authenticate(&fresh).await.unwrap(), None);
    assert_eq!(
        s.set_api_key_expiry(f.id, None).await.unwrap().expires_at,
        None
    );
    assert!(s.authenticate(&fresh).await.unwrap().is_some());
    assert!(s.authenticate(&expired).await.unwrap().is_none());
    s.set_api_key_expiry(e.id, Some(future)).await.unwrap();
    assert!(s.authenticate(&expired).await.unwrap().is_some());

    // Revocation is for good, and idempotent.
    let r1 = s.revoke_api_key(k.id).await.unwrap();
    let revoked_at = r1.revoked_at.expect("revoked");
    assert_eq!(s.authenticate(&key).await.unwrap(), None);
    let r2 = s.revoke_api_key(k.id).await.unwrap();
    assert_eq!(r2.revoked_at, Some(revoked_at));
    s.set_api_key_expiry(k.id, None).await.unwrap();
    assert_eq!(s.authenticate(&key).await.unwrap(), None);
    // Other keys are untouched.
    assert!(s.authenticate(&fresh).await.unwrap().is_some());

    // Unknowns and invalid requests.
    let nobody = Uuid::new_v4();
    assert!(s.revoke_api_key(nobody).await.unwrap_err().is_not_found());
    assert!(s
        .set_api_key_expiry(nobody, None)
        .await
        .unwrap_err()
        .is_not_found());
    match s
        .create_api_key("no-such-team", "x", &[Scope::Read], None)
        .await
    {
        Err(StoreError::NotFound { what: "team", .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        s.create_api_key(&t, "x", &[], None).await,
        Err(StoreError::Invalid {
            field: "api_key.scopes",
            ..
        })
    ));
    assert!(matches!(
        s.create_api_key(&t, "", &[Scope::Read], None).await,
        Err(StoreError::Invalid {
            field: "api_key.name",
            ..
        })
    ));

    // Listing: per team, or all.
    let (o, _) = s
        .create_api_key(&other, "theirs", &[Scope::Admin], None)
        .await
        .unwrap();
    let mine: Vec<Uuid> = s
        .list_api_keys(Some(&t))
        .await
        .unwrap()
        .iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(mine, [k.id, e.id, f.id]);
    let theirs = s.list_api_keys(Some(&other)).await.unwrap();
    assert_eq!(theirs.len(), 1);
    assert_eq!(
        (theirs[0].id, theirs[0].team.as_str()),
        (o.id, other.as_str())
    );
    let all = s.list_api_keys(None).await.unwrap();
    assert_eq!(all.len(), 4);
    assert!(s
        .list_api_keys(Some("no-such-team"))
        .await
        .unwrap()
        .is_empty());
}

async fn scopes_round_trip(s: Store) {
    let t = new_team(&s, "scopes").await;
    let sets: &[&[Scope]] = &[
        &[Scope::Read],
        &[Scope::Submit],
        &[Scope::Admin],
        &[Scope::Read, Scope::Submit],
        &[Scope::Admin, Scope::Read, Scope::Submit, Scope::Read],
    ];
    for &set in sets {
        let (k, key) = s.create_api_key(&t, "k", set, None).await.unwrap();
        // Each scope once, in the order of Scope::ALL.
        let want: Vec<Scope> = Scope::ALL
            .iter()
            .copied()
            .filter(|x| set.contains(x))
            .collect();
        assert_eq!(k.scopes, want);
        let p = s.authenticate(&key).await.unwrap().unwrap();
        assert_eq!(p.scopes, want);
        let listed = s.list_api_keys(Some(&t)).await.unwrap();
        assert_eq!(listed.iter().find(|x| x.id == k.id).unwrap().scopes, want);
        // admin implies every scope; otherwise exactly the key's scopes.
        for &scope in Scope::ALL {
            let expected = set.contains(&scope) || set.contains(&Scope::Admin);
            assert_eq!(p.has(scope), expected, "{set:?} has {scope}");
        }
    }
    // The text forms.
    for &scope in Scope::ALL {
        assert_eq!(scope.as_str().parse::<Scope>().unwrap(), scope);
        assert_eq!(serde_json::to_value(scope).unwrap(), json!(scope.as_str()));
    }
    assert_eq!(
        Scope::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        ["submit", "read", "admin"]
    );
    assert!(matches!(
        "Admin".parse::<Scope>(),
        Err(StoreError::Invalid { .. })
    ));
}

// ---- runs of teams ----

async fn runs_belong_to_a_team(s: Store) {
    let a = new_team(&s, "team-a").await;
    let b = new_team(&s, "team-b").await;
    let ra = new_run_in(&s, &a, "mine").await;
    assert_eq!(ra.team, a);
    assert_eq!(s.get_run(ra.id).await.unwrap().team, a);
    let rl = new_run(&s, "local").await;
    assert_eq!(rl.team, LOCAL_TEAM);

    let ids = |runs: Vec<Run>| runs.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(s.list_runs(Some(&a), 100, 0).await.unwrap()), [ra.id]);
    assert!(s.list_runs(Some(&b), 100, 0).await.unwrap().is_empty());
    assert!(s.list_run_pages(Some(&b), 100, 0).await.unwrap().is_empty());
    assert_eq!(
        ids(s.list_runs(Some(LOCAL_TEAM), 100, 0).await.unwrap()),
        [rl.id]
    );
    let all = ids(s.list_runs(None, 100, 0).await.unwrap());
    assert_eq!(all, [rl.id, ra.id]);
    assert!(s
        .list_runs(Some("no-such-team"), 100, 0)
        .await
        .unwrap()
        .is_empty());

    // A run of a team that does not exist is refused.
    match s
        .create_run(NewRun {
            team: "no-such-team".into(),
            client_request_id: Some("x".into()),
            name: "x".into(),
            spec_json: json!({}),
        })
        .await
    {
        Err(StoreError::NotFound { what: "team", .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(s.list_runs(None, 100, 0).await.unwrap().len(), 2);
}

async fn client_request_ids_are_per_team(s: Store) {
    let a = new_team(&s, "req-a").await;
    let b = new_team(&s, "req-b").await;
    let new = |team: &str, seed: i64| NewRun {
        team: team.into(),
        client_request_id: Some("deploy-42".into()),
        name: "nightly".into(),
        spec_json: json!({"seed": seed}),
    };
    let (ra, ca) = s.create_run(new(&a, 1)).await.unwrap();
    let (rb, cb) = s.create_run(new(&b, 1)).await.unwrap();
    assert!(ca && cb, "the same id in two teams makes two runs");
    assert_ne!(ra.id, rb.id);
    assert_eq!(
        (ra.team.as_str(), rb.team.as_str()),
        (a.as_str(), b.as_str())
    );
    // Within a team, the id still makes creation idempotent.
    let (again, c) = s.create_run(new(&a, 1)).await.unwrap();
    assert!(!c);
    assert_eq!(again, ra);
    // A different spec under a used id: a conflict that reveals no run.
    let e = s.create_run(new(&b, 2)).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, StoreError::Conflict(_)), "{msg}");
    assert!(msg.contains("deploy-42"), "{msg}");
    for id in [ra.id, rb.id] {
        assert!(!msg.contains(&id.to_string()), "{msg}");
        assert!(!msg.contains(&id.simple().to_string()), "{msg}");
    }
    let status = tonic::Status::from(e);
    assert!(!status.message().contains(&rb.id.to_string()));
    // A different name is a conflict too.
    let mut renamed = new(&a, 1);
    renamed.name = "other".into();
    assert!(matches!(
        s.create_run(renamed).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.list_runs(None, 100, 0).await.unwrap().len(), 2);
}

async fn count_runs_by_team_and_status(s: Store) {
    let a = new_team(&s, "count-a").await;
    let b = new_team(&s, "count-b").await;
    let r1 = new_run_in(&s, &a, "1").await;
    let r2 = new_run_in(&s, &a, "2").await;
    new_run_in(&s, &a, "3").await;
    new_run_in(&s, &b, "4").await;
    s.set_run_status(r1.id, RunStatus::Running, None)
        .await
        .unwrap();
    s.cancel_run(r2.id).await.unwrap();
    use RunStatus::*;
    let count = |team: String, st: &'static [RunStatus]| {
        let s = s.clone();
        async move { s.count_runs(&team, st).await.unwrap() }
    };
    assert_eq!(count(a.clone(), &[Queued]).await, 1);
    assert_eq!(count(a.clone(), &[Queued, Running]).await, 2);
    assert_eq!(count(a.clone(), &[Cancelled, Succeeded]).await, 1);
    assert_eq!(count(a.clone(), RunStatus::ALL).await, 3);
    assert_eq!(count(a.clone(), &[]).await, 0);
    assert_eq!(count(b.clone(), &[Queued, Running]).await, 1);
    assert_eq!(count(b.clone(), &[Running]).await, 0);
    assert_eq!(count("no-such-team".into(), RunStatus::ALL).await, 0);
    assert_eq!(count(LOCAL_TEAM.into(), RunStatus::ALL).await, 0);
}

/// What the per-run reads return for `run`, as a page.
async fn per_run_page(s: &Store, run: Run) -> RunPage {
    RunPage {
        summary: Some(s.run_summary(run.id).await.unwrap()),
        choices: s.list_pruning_choices(run.id).await.unwrap(),
        artifacts: s.list_artifacts(run.id).await.unwrap(),
        jobs: s.list_jobs(run.id).await.unwrap(),
        run,
    }
}

async fn run_pages_equal_per_run_reads(s: Store) {
    let t = new_team(&s, "pages").await;
    let other = new_team(&s, "not-mine").await;
    let st = stage("train");
    let point = |k: i64| CurvePoint {
        k,
        acc: 0.97,
        asr: 0.01 * k as f64,
        ra: 0.9,
    };
    let mut runs = Vec::new();
    for i in 0..5 {
        let run = new_run_in(&s, &t, &format!("run-{i}")).await;
        // Run i has i of everything (run 0 has nothing).
        for j in 0..i {
            enqueue(&s, run.id, &format!("{st}-{j}"), 2).await;
            let rec = ArtifactRecord {
                run_id: run.id,
                name: format!("ckpt/epoch-{j}.safetensors"),
                uri: format!("file:///a/{}/{j}", run.id),
                sha256: sha256_hex(format!("{i}{j}").as_bytes()),
                size: j as u64,
                content_type: (j % 2 == 0).then(|| "application/octet-stream".into()),
            };
            s.record_artifact(None, rec).await.unwrap();
            let criterion = ["linf", "l1", "l2", "fine-pruning"][j];
            s.set_pruning_choice(None, run.id, criterion, point(j as i64 + 1))
                .await
                .unwrap();
            s.record_metric(
                None,
                run.id,
                "train",
                metric_names::CLEAN_ACC,
                j as i64,
                0.9,
            )
            .await
            .unwrap();
        }
        runs.push(run);
    }
    // One job leased, one failed, so that the jobs differ in more than
    // their stage.
    let leased = lease_one(&s, &format!("{st}-0")).await;
    s.fail_job(
        leased.id,
        leased.lease_token.unwrap(),
        &failure("internal", "x"),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    lease_one(&s, &format!("{st}-1")).await;
    s.set_run_status(runs[3].id, RunStatus::Running, None)
        .await
        .unwrap();
    let theirs = new_run_in(&s, &other, "theirs").await;
    enqueue(&s, theirs.id, &st, 1).await;

    // The whole team, one page.
    let pages = s.list_run_pages(Some(&t), 100, 0).await.unwrap();
    let listed = s.list_runs(Some(&t), 100, 0).await.unwrap();
    assert_eq!(pages.len(), 5);
    let mut want = Vec::new();
    for run in listed {
        want.push(per_run_page(&s, run).await);
    }
    assert_eq!(pages, want);
    assert_eq!(pages[0].run.id, runs[4].id, "newest first");
    assert_eq!(pages[0].jobs.len(), 4);
    assert_eq!(pages[0].artifacts.len(), 4);
    assert_eq!(pages[0].choices.len(), 4);
    assert!(pages[0].summary.as_ref().unwrap().linf.is_some());
    assert!(pages[4].jobs.is_empty() && pages[4].summary.is_some());

    // A window of it.
    let window = s.list_run_pages(Some(&t), 2, 1).await.unwrap();
    let ids: Vec<Uuid> = window.iter().map(|p| p.run.id).collect();
    assert_eq!(ids, [runs[3].id, runs[2].id]);
    assert_eq!(window, pages[1..3]);
    assert!(s.list_run_pages(Some(&t), 10, 5).await.unwrap().is_empty());
    assert!(s.list_run_pages(Some(&t), 0, 0).await.unwrap().is_empty());

    // Every team.
    let all = s.list_run_pages(None, 100, 0).await.unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(all[0], per_run_page(&s, theirs).await);
    assert_eq!(all[1..], pages[..]);
}

async fn delete_artifact_is_fenced(s: Store) {
    let st = stage("train");
    let run = new_run(&s, "bounded").await;
    let other = new_run(&s, "other").await;
    let job = enqueue(&s, run.id, &st, 3).await;
    let a = s
        .lease_job("w1", std::slice::from_ref(&st), Duration::from_millis(300))
        .await
        .unwrap()
        .unwrap();
    let fence_a = a.fence().unwrap();
    let rec = |name: &str| ArtifactRecord {
        run_id: run.id,
        name: name.into(),
        uri: format!("file:///x/{name}"),
        sha256: sha256_hex(name.as_bytes()),
        size: 3,
        content_type: None,
    };
    for n in ["epoch-1", "epoch-2", "epoch-3"] {
        s.record_artifact(Some(&fence_a), rec(n)).await.unwrap();
    }
    // The holder deletes; the record comes back for the object's deletion.
    assert_eq!(
        s.delete_artifact(Some(&fence_a), run.id, "epoch-1")
            .await
            .unwrap(),
        Some(rec("epoch-1"))
    );
    assert!(s
        .get_artifact(run.id, "epoch-1")
        .await
        .unwrap_err()
        .is_not_found());
    // Nothing there: Ok(None), also for an unknown run.
    assert_eq!(
        s.delete_artifact(Some(&fence_a), run.id, "epoch-1")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        s.delete_artifact(None, Uuid::new_v4(), "x").await.unwrap(),
        None
    );
    // A fence of another run's job is refused.
    assert!(matches!(
        s.delete_artifact(Some(&fence_a), other.id, "epoch-2").await,
        Err(StoreError::Invalid { .. })
    ));

    // After the lease moves on, the old holder deletes nothing.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let b = lease_one(&s, &st).await;
    let fence_b = b.fence().unwrap();
    match s.delete_artifact(Some(&fence_a), run.id, "epoch-2").await {
        Err(StoreError::LeaseLost { job_id }) if job_id == job.id => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        s.list_artifacts(run.id).await.unwrap(),
        [rec("epoch-2"), rec("epoch-3")]
    );
    assert_eq!(
        s.delete_artifact(Some(&fence_b), run.id, "epoch-2")
            .await
            .unwrap(),
        Some(rec("epoch-2"))
    );
    // Unfenced (the gateway's clean-up).
    assert_eq!(
        s.delete_artifact(None, run.id, "epoch-3").await.unwrap(),
        Some(rec("epoch-3"))
    );
    assert!(s.list_artifacts(run.id).await.unwrap().is_empty());
    // A finished job's fence is refused too.
    s.complete_job(job.id, b.lease_token.unwrap(), json!({}))
        .await
        .unwrap();
    s.record_artifact(None, rec("epoch-4")).await.unwrap();
    assert!(matches!(
        s.delete_artifact(Some(&fence_b), run.id, "epoch-4").await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert_eq!(s.list_artifacts(run.id).await.unwrap(), [rec("epoch-4")]);
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
    scan: Option<ScanResult>,
}

async fn snapshot(s: &Store, run: Uuid) -> Snapshot {
    Snapshot {
        metrics: s.list_metrics(run).await.unwrap(),
        stats: s.list_neuron_stats(run).await.unwrap(),
        curves: s.list_pruning_curves(run).await.unwrap(),
        choices: s.list_pruning_choices(run).await.unwrap(),
        artifacts: s.list_artifacts(run).await.unwrap(),
        events: s.list_events(run, 0).await.unwrap(),
        scan: match s.get_scan_result(run).await {
            Ok(r) => Some(r),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => panic!("{e}"),
        },
    }
}

fn scan_result(v: f64) -> ScanResult {
    ScanResult {
        model: "vendor-net".into(),
        verdict: "backdoored".into(),
        suspect_label: Some(3),
        anomaly_index: Some(v),
        clean_acc: v,
        repaired: true,
        acc_before: Some(v),
        asr_before: Some(v),
        acc_after: Some(v),
        asr_after: Some(v),
        pruned_channels: Some(2),
        met: Some(false),
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
        s.put_scan_result(fence, run, &scan_result(v)).await,
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
    assert_eq!(snap.scan, Some(scan_result(v)));
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
/// backend, a test per case, each on a fresh [`Fixture`]. A case takes the
/// store; a raw case also the database under it ([`Db`]).
macro_rules! metadata_test_suite {
    (
        backends: [$($backend:ident),* $(,)?],
        cases: $cases:tt,
        raw_cases: $raw:tt $(,)?
    ) => {
        $( metadata_test_suite!(@backend $backend, $cases, $raw); )*
    };
    (@backend $backend:ident, [$($case:ident),* $(,)?], [$($raw:ident),* $(,)?]) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let fixture = super::Fixture::$backend().await;
                    super::$case(fixture.store.clone()).await;
                    fixture.finish().await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $raw() {
                    let fixture = super::Fixture::$backend().await;
                    super::$raw(fixture.store.clone(), fixture.db().await).await;
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
        changes_name_their_kind,
        next_lease_time_follows_backoff_and_leases,
        upserts_do_not_duplicate,
        views_report_figures,
        scan_results_upsert_and_fill_their_view,
        events_are_ordered,
        teams_are_validated_and_unique,
        keys_authenticate_until_revoked_or_expired,
        scopes_round_trip,
        runs_belong_to_a_team,
        client_request_ids_are_per_team,
        count_runs_by_team_and_status,
        quota_is_exact_under_concurrent_submits,
        leasing_is_fair_across_teams,
        run_pages_equal_per_run_reads,
        delete_artifact_is_fenced,
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
    raw_cases: [
        api_keys_are_shown_once_and_stored_hashed,
        scan_summary_view_reads_like_the_store,
    ],
);

/// The database under a store, for raw cases to read its tables.
enum Db {
    Sqlite(sqlx::SqlitePool),
    Pg(sqlx::PgPool),
}

/// How a fixture reaches its database directly.
enum Raw {
    /// A second pool on the file (or the Postgres database) of this URL.
    Url(String),
    /// The in-memory store itself (its one connection is the database).
    Memory(SqliteStore),
}

/// A fresh store of one backend, and what has to live as long as it.
struct Fixture {
    store: Store,
    raw: Raw,
    _dir: Option<tempfile::TempDir>,
    pg: Option<Pg>,
}

impl Fixture {
    async fn sqlite_file() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/nested/meta.db", dir.path().display());
        let store = connect(&url).await.unwrap();
        Self::new(store, "sqlite", Raw::Url(url), Some(dir), None).await
    }

    async fn sqlite_memory() -> Self {
        let sqlite = SqliteStore::in_memory().await.unwrap();
        let store: Store = Arc::new(sqlite.clone());
        Self::new(store, "sqlite", Raw::Memory(sqlite), None, None).await
    }

    async fn postgres() -> Self {
        let pg = Pg::fresh().await;
        let store = connect(pg.url()).await.unwrap();
        let raw = Raw::Url(pg.url().to_string());
        Self::new(store, "postgres", raw, None, Some(pg)).await
    }

    async fn new(
        store: Store,
        backend: &str,
        raw: Raw,
        dir: Option<tempfile::TempDir>,
        pg: Option<Pg>,
    ) -> Self {
        assert_eq!(store.backend(), backend);
        store.ping().await.unwrap();
        Fixture {
            store,
            raw,
            _dir: dir,
            pg,
        }
    }

    async fn db(&self) -> Db {
        match &self.raw {
            Raw::Memory(sqlite) => Db::Sqlite(sqlite.pool().clone()),
            Raw::Url(url) if url.starts_with("sqlite:") => {
                Db::Sqlite(sqlx::SqlitePool::connect(url).await.unwrap())
            }
            Raw::Url(url) => Db::Pg(sqlx::PgPool::connect(url).await.unwrap()),
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
    // Teams and keys: the migration's `local`, a new team, a key's times
    // (an expiry the caller gives, too).
    let team = s.create_team("times").await.unwrap().name;
    let expiry = chrono::Utc::now() + chrono::Duration::days(1);
    let (k, key) = s
        .create_api_key(&team, "k", &[Scope::Read], Some(expiry))
        .await
        .unwrap();
    assert!(s.authenticate(&key).await.unwrap().is_some());
    s.revoke_api_key(k.id).await.unwrap();
    let times: Vec<String> = sqlx::query_scalar(
        "SELECT created_at FROM runs UNION ALL SELECT updated_at FROM runs \
         UNION ALL SELECT run_after FROM stage_jobs \
         UNION ALL SELECT lease_expires_at FROM stage_jobs \
         UNION ALL SELECT recorded_at FROM metrics UNION ALL SELECT created_at FROM run_events \
         UNION ALL SELECT created_at FROM teams \
         UNION ALL SELECT created_at FROM api_keys UNION ALL SELECT expires_at FROM api_keys \
         UNION ALL SELECT revoked_at FROM api_keys UNION ALL SELECT last_used_at FROM api_keys",
    )
    .fetch_all(sqlite.pool())
    .await
    .unwrap();
    assert_eq!(times.len(), 12);
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

/// Rows as the schema before teams held them (literal values that both
/// backends accept): a finished run with a job, metrics, a choice, an
/// artifact and an event, and an API key.
const OLD_ROWS: &str = "
INSERT INTO runs (id, client_request_id, name, status, spec_json, created_at, updated_at)
VALUES ('11111111-1111-4111-8111-111111111111', 'req-1', 'old', 'succeeded', '{\"seed\": 1}',
        '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:01.000000Z');
INSERT INTO stage_jobs (id, run_id, stage, status, payload, attempts, max_attempts, run_after,
                        created_at, updated_at)
VALUES ('22222222-2222-4222-8222-222222222222', '11111111-1111-4111-8111-111111111111',
        'train', 'succeeded', '{}', 1, 3, '2026-01-01T00:00:00.000000Z',
        '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:01.000000Z');
INSERT INTO metrics (run_id, stage, name, step, value, recorded_at)
VALUES ('11111111-1111-4111-8111-111111111111', 'train', 'clean_acc', 1, 0.97,
        '2026-01-01T00:00:00.000000Z');
INSERT INTO pruning_choices (run_id, criterion, k, acc, asr, ra)
VALUES ('11111111-1111-4111-8111-111111111111', 'linf', 4, 0.971, 0.016, 0.9);
INSERT INTO artifacts (run_id, name, uri, sha256, size, content_type, created_at)
VALUES ('11111111-1111-4111-8111-111111111111', 'model.safetensors', 'file:///m',
        'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 10, NULL,
        '2026-01-01T00:00:00.000000Z');
INSERT INTO run_events (run_id, stage, kind, message, progress, created_at)
VALUES ('11111111-1111-4111-8111-111111111111', 'train', 'done', 'ok', 1.0,
        '2026-01-01T00:00:00.000000Z');
";

/// The key whose hash [`old_key_row`] stores.
const OLD_KEY: &str = "dbk_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn old_key_row() -> String {
    format!(
        "INSERT INTO api_keys (id, name, key_hash, created_at) \
         VALUES ('33333333-3333-4333-8333-333333333333', 'legacy', '{}', \
         '2026-01-01T00:00:00.000000Z')",
        sha256_hex(OLD_KEY.as_bytes())
    )
}

/// The migrations of `backend` older than the teams migration, as a
/// migrator of their own.
async fn old_migrator(backend: &str) -> (sqlx::migrate::Migrator, tempfile::TempDir) {
    let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../migrations")
        .join(backend);
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(all).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.as_str() < "20261130000000" {
            std::fs::copy(&path, dir.path().join(name)).unwrap();
        }
    }
    let migrator = sqlx::migrate::Migrator::new(dir.path()).await.unwrap();
    (migrator, dir)
}

/// After the teams migration: the old rows belong to `local`, nothing of
/// the run is lost, and the old key still authenticates.
async fn check_migrated(s: &Store) {
    let id = Uuid::parse_str("11111111-1111-4111-8111-111111111111").unwrap();
    let run = s.get_run(id).await.unwrap();
    assert_eq!(
        (
            run.team.as_str(),
            run.client_request_id.as_deref(),
            run.status
        ),
        (LOCAL_TEAM, Some("req-1"), RunStatus::Succeeded)
    );
    assert_eq!(run.spec_json, json!({"seed": 1}));
    assert_eq!(s.list_jobs(id).await.unwrap().len(), 1);
    assert_eq!(s.list_metrics(id).await.unwrap().len(), 1);
    assert_eq!(s.list_artifacts(id).await.unwrap().len(), 1);
    assert_eq!(s.list_events(id, 0).await.unwrap().len(), 1);
    let summary = s.run_summary(id).await.unwrap();
    assert_eq!(summary.clean_acc, Some(0.97));
    assert_eq!(summary.linf.unwrap().k, 4);
    let pages = s.list_run_pages(Some(LOCAL_TEAM), 10, 0).await.unwrap();
    assert_eq!(pages.len(), 1);
    assert_eq!(pages[0].jobs.len(), 1);
    assert_eq!(
        s.count_runs(LOCAL_TEAM, &[RunStatus::Succeeded])
            .await
            .unwrap(),
        1
    );

    let p = s
        .authenticate(OLD_KEY)
        .await
        .unwrap()
        .expect("the old key works");
    assert_eq!(p.team, LOCAL_TEAM);
    assert_eq!(p.key_name, "legacy");
    assert_eq!(p.scopes, [Scope::Submit, Scope::Read]);
    assert!(!p.has(Scope::Admin));
    let keys = s.list_api_keys(Some(LOCAL_TEAM)).await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].prefix, "");
    s.revoke_api_key(keys[0].id).await.unwrap();
    assert_eq!(s.authenticate(OLD_KEY).await.unwrap(), None);

    // The old client_request_id is now the local team's.
    let again = NewRun {
        team: LOCAL_TEAM.into(),
        client_request_id: Some("req-1".into()),
        name: "old".into(),
        spec_json: json!({"seed": 1}),
    };
    let (same, created) = s.create_run(again.clone()).await.unwrap();
    assert!(!created);
    assert_eq!(same.id, id);
    let t = s.create_team("after").await.unwrap().name;
    let (mine, created) = s.create_run(NewRun { team: t, ..again }).await.unwrap();
    assert!(created);
    assert_ne!(mine.id, id);
}

#[tokio::test]
async fn sqlite_migration_moves_old_rows_to_local_team() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let url = format!("sqlite://{}", path.display());
    {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .foreign_keys(true);
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        let (old, _dir) = old_migrator("sqlite").await;
        old.run(&pool).await.unwrap();
        sqlx::raw_sql(OLD_ROWS).execute(&pool).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(old_key_row()))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    let s = connect(&url).await.unwrap();
    check_migrated(&s).await;
    // Foreign keys are on again, and hold.
    let sqlite = SqliteStore::open(&path).await.unwrap();
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(sqlite.pool())
        .await
        .unwrap();
    assert_eq!(fk, 1);
    let broken: Vec<(String,)> = sqlx::query_as("PRAGMA foreign_key_check")
        .fetch_all(sqlite.pool())
        .await
        .unwrap_or_default();
    assert!(broken.is_empty());
    let ok: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(sqlite.pool())
        .await
        .unwrap();
    assert_eq!(ok, "ok");
}

#[tokio::test]
async fn postgres_migration_moves_old_rows_to_local_team() {
    let pg = Pg::fresh().await;
    {
        let pool = sqlx::PgPool::connect(pg.url()).await.unwrap();
        let (old, _dir) = old_migrator("postgres").await;
        old.run(&pool).await.unwrap();
        sqlx::raw_sql(OLD_ROWS).execute(&pool).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(old_key_row()))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    let s = connect(pg.url()).await.unwrap();
    check_migrated(&s).await;
    pg.drop_db().await;
}

/// Issue 18 §1: a worker paused inside a fenced write (after its row lock,
/// before COMMIT) must not hold its job. The failpoint stops the write at
/// exactly that point; Postgres ends the idle transaction
/// (`idle_in_transaction_session_timeout`, a third of the lease), so another
/// worker leases the job within about one lease of the pause, and the
/// paused write, resumed afterwards, lands nothing. Without the session
/// limits the job is never leased again (SKIP LOCKED skips the locked row).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_paused_fenced_write_does_not_hold_its_job() {
    use std::time::Instant;
    use tokio::sync::Notify;
    let pg = Pg::fresh().await;
    let lease = Duration::from_secs(2);
    let limits = SessionLimits::for_lease(lease);
    let paused = PgStore::connect_with(pg.url(), limits).await.unwrap();
    let other = connect_with(pg.url(), limits).await.unwrap();
    let s: Store = Arc::new(paused.clone());
    let st = stage("train");
    let run = new_run(&s, "paused").await;
    enqueue(&s, run.id, &st, 3).await;
    let first = s
        .lease_job("worker-a", std::slice::from_ref(&st), lease)
        .await
        .unwrap()
        .unwrap();
    let fence = Fence {
        job_id: first.id,
        lease_token: first.lease_token.unwrap(),
    };

    // the sessions carry the limits
    let (idle,): (String,) = sqlx::query_as("SHOW idle_in_transaction_session_timeout")
        .fetch_one(paused.pool())
        .await
        .unwrap();
    assert_eq!(idle, "666ms");

    let inside = Arc::new(Notify::new());
    let resume = Arc::new(Notify::new());
    let (i, r) = (inside.clone(), resume.clone());
    paused
        .failpoints()
        .on_fenced_commit(Arc::new(move |write, _| {
            assert_eq!(write, "record_artifact");
            let (i, r) = (i.clone(), r.clone());
            Box::pin(async move {
                i.notify_one();
                r.notified().await;
            })
        }));
    let writer = {
        let (s, fence) = (s.clone(), fence);
        tokio::spawn(async move { s.record_artifact(Some(&fence), artifact(run.id, 1.0)).await })
    };
    // the write holds the job's row FOR SHARE and has inserted its record
    inside.notified().await;
    let paused_at = Instant::now();
    let (locked,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND state = 'idle in transaction'",
    )
    .fetch_one(paused.pool())
    .await
    .unwrap();
    assert_eq!(locked, 1, "the paused write is idle in its transaction");

    let taken = loop {
        if let Some(j) = other
            .lease_job("worker-b", std::slice::from_ref(&st), lease)
            .await
            .unwrap()
        {
            break j;
        }
        assert!(
            paused_at.elapsed() < 2 * lease,
            "the job was not leased again within two leases of the pause"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "re-leased {:.2} s after the pause (lease {:.1} s)",
        paused_at.elapsed().as_secs_f64(),
        lease.as_secs_f64()
    );
    assert_eq!(taken.id, first.id);
    assert_eq!(taken.attempts, 2);
    assert_eq!(taken.leased_by.as_deref(), Some("worker-b"));

    // the paused write resumes: its transaction is gone, nothing landed
    resume.notify_one();
    let late = writer.await.unwrap();
    assert!(
        late.is_err(),
        "a paused write committed after losing its job"
    );
    assert!(matches!(
        other
            .get_artifact(run.id, "epoch-1/model.safetensors")
            .await,
        Err(StoreError::NotFound { .. })
    ));
    // and every later write under the old lease is refused
    paused.failpoints().clear();
    assert!(matches!(
        s.record_artifact(Some(&fence), artifact(run.id, 2.0)).await,
        Err(StoreError::LeaseLost { .. })
    ));
    // the winner writes
    let winner = Fence {
        job_id: taken.id,
        lease_token: taken.lease_token.unwrap(),
    };
    other
        .record_artifact(Some(&winner), artifact(run.id, 3.0))
        .await
        .unwrap();
    drop((s, paused, other));
    pg.drop_db().await;
}
