//! Authentication and tenancy over real gRPC (separate processes,
//! Postgres): teams and keys made with `deadbolt admin`; no key, a wrong,
//! revoked or expired key answer UNAUTHENTICATED, a key without the scope
//! PERMISSION_DENIED; team B sees none of team A's run (get, list, watch,
//! cancel, `deadbolt report`: NOT_FOUND); a stage service refuses a call
//! with a user key; no key appears in clear in any log or table.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::trainer_service_client::TrainerServiceClient;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_scopes_and_teams_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = tiny_spec(d, 1, 600);
    let pg = Pg::fresh().await;
    let art = d.join("artifacts").display().to_string();
    let work = d.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let cfg_text = config_with(pg.url(), &art, &work, 3.0, "keys", "");
    let (all, cfg) = serve_all(d, &cfg_text);
    let url = all.url("gateway");

    admin(&cfg, &["team-create", "team-a"]);
    admin(&cfg, &["team-create", "team-b"]);
    let key = |team: &str, name: &str, scopes: &str, extra: &[&str]| {
        let mut args = vec![
            "key-create",
            "--team",
            team,
            "--name",
            name,
            "--scopes",
            scopes,
        ];
        args.extend_from_slice(extra);
        let v = admin(&cfg, &args);
        (
            v["key"].as_str().unwrap().to_string(),
            v["id"].as_str().unwrap().to_string(),
        )
    };
    let (a, _) = key("team-a", "a-ci", "submit,read", &[]);
    let (a_read, _) = key("team-a", "a-dash", "read", &[]);
    let (a_revoked, revoked_id) = key("team-a", "a-old", "submit,read", &[]);
    let (a_expired, _) = key("team-a", "a-exp", "submit,read", &["--expires-in-days=-1"]);
    let (b, _) = key("team-b", "b-ci", "submit,read", &[]);
    admin(&cfg, &["key-revoke", &revoked_id]);
    let listed = Command::new(bin())
        .args(["--quiet", "admin", "--config"])
        .arg(&cfg)
        .args(["keys", "--team", "team-a"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&listed.stdout).lines().count(), 4);

    // who may call
    let list = pb::ListExperimentsRequest::default();
    for (k, code) in [
        (None, Code::Unauthenticated),
        (
            Some("dbk_0000000000000000000000000000000000000000000000000000000000000000"),
            Code::Unauthenticated,
        ),
        (Some(a_revoked.as_str()), Code::Unauthenticated),
        (Some(a_expired.as_str()), Code::Unauthenticated),
    ] {
        let e = as_key(&url, k)
            .await
            .list_experiments(list.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{k:?}: {e:?}");
    }
    let submit = |id: &str| pb::SubmitExperimentRequest {
        client_request_id: id.into(),
        spec: Some(pb::submit_experiment_request::Spec::SpecToml(
            std::fs::read_to_string(&spec).unwrap(),
        )),
    };
    let e = as_key(&url, Some(&a_read))
        .await
        .submit_experiment(submit("ro"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // team A's run
    let mut ca = as_key(&url, Some(&a)).await;
    let run_id = ca
        .submit_experiment(submit("shared-id"))
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let (_, run) = watch(&mut ca, &run_id, Duration::from_secs(240)).await;
    assert_eq!(run.status, pb::JobStatus::Succeeded as i32, "{}", run.error);
    assert_eq!(
        as_key(&url, Some(&a_read))
            .await
            .list_experiments(list.clone())
            .await
            .unwrap()
            .into_inner()
            .runs
            .len(),
        1
    );

    // ... is invisible to team B
    let mut cb = as_key(&url, Some(&b)).await;
    let nf = |e: tonic::Status| assert_eq!(e.code(), Code::NotFound, "{e:?}");
    nf(cb
        .get_experiment(pb::GetExperimentRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap_err());
    nf(cb
        .watch_experiment(pb::WatchExperimentRequest {
            run_id: run_id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap_err());
    nf(cb
        .cancel_experiment(pb::CancelExperimentRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap_err());
    assert!(cb
        .list_experiments(list.clone())
        .await
        .unwrap()
        .into_inner()
        .runs
        .is_empty());
    let report = Command::new(bin())
        .args(["--quiet", "report", &run_id, "--gateway", &url, "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(d.join("stolen"))
        .env("DEADBOLT_API_KEY", &b)
        .output()
        .unwrap();
    assert!(!report.status.success());
    assert!(
        String::from_utf8_lossy(&report.stderr).contains("NotFound"),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    assert!(!d.join("stolen/report.json").exists());
    // the same client_request_id in team B makes B's own run
    let b_run = cb
        .submit_experiment(submit("shared-id"))
        .await
        .unwrap()
        .into_inner();
    assert!(b_run.created && b_run.run_id != run_id);
    // and team A's own report works with A's key
    cli_as(
        Some(&a),
        &[
            "report",
            &run_id,
            "--gateway",
            &url,
            "--config",
            &cfg.to_string_lossy(),
            "--out",
            &d.join("mine").to_string_lossy(),
        ],
    );

    // a stage service refuses a user's key
    let mut t = TrainerServiceClient::with_interceptor(channel(&all.url("trainer")).await, {
        let h: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {a}").parse().unwrap();
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", h.clone());
            Ok(r)
        }
    });
    let e = t
        .train(pb::TrainRequest {
            run_id: run_id.clone(),
            tag: pb::ModelTag::Clean as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // no key in clear: not in the logs, not in any table
    let keys = [&a, &a_read, &a_revoked, &a_expired, &b];
    let log = all.log_text();
    for k in keys {
        assert!(!log.contains(k.as_str()), "a key is in the service log");
    }
    let pool = sqlx::PgPool::connect(pg.url()).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for t in tables {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT t::text FROM \"{t}\" t"
        )))
        .fetch_all(&pool)
        .await
        .unwrap();
        for r in rows {
            for k in keys {
                assert!(!r.contains(k.as_str()), "a key is in table {t}");
            }
        }
    }
    pool.close().await;
    drop(all);
    pg.drop_db().await;
}
