//! The database roles of deploy/postgres/20-roles.sql, on a fresh Postgres
//! database (DEADBOLT_TEST_PG_URL, default
//! postgres://postgres@127.0.0.1:5432/postgres, trust authentication on
//! 127.0.0.1 for the roles the file creates).
//!
//! Each test applies the file as the operator would: before the first
//! migration, then the migrations as `deadbolt_migrate` (the migrate Job),
//! then the file again. The roles are cluster-wide and shared by every test
//! database: the file creates them only when missing (and tolerates a
//! concurrent creation), and every grant it makes is per database, so the
//! tests run in parallel and repeat.
//!
//! The stage pods' role reads no API key (and no team) and runs no DDL, yet
//! a stage's whole store surface works through it with `migrate = false`;
//! the gateway's role reads the keys. Without the file's grants the stage
//! and gateway parts fail (permission denied).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use deadbolt_store::*;
use deadbolt_test_support::pg::Pg;
use serde_json::json;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection};
use uuid::Uuid;

const ROLES_SQL: &str = include_str!("../../../deploy/postgres/20-roles.sql");

/// Tables the stage role must never touch (the file's deny list).
const STAGE_DENIED: [&str; 2] = ["api_keys", "teams"];

/// `pg`'s database, logged in as `role` (no password: trust on 127.0.0.1).
fn as_role(pg: &Pg, role: &str) -> String {
    let mut url = url::Url::parse(pg.url()).expect("a URL");
    url.set_username(role).expect("a user name");
    url.set_password(None).expect("no password");
    url.to_string()
}

async fn apply_roles(pg: &Pg) {
    let mut admin = PgConnection::connect(pg.url()).await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(ROLES_SQL))
        .execute(&mut admin)
        .await
        .expect("deploy/postgres/20-roles.sql applies");
    admin.close().await.unwrap();
}

/// A fresh database set up as in production: roles, migrations as
/// `deadbolt_migrate`, roles again (the grants on the new tables).
async fn deployed() -> Pg {
    let pg = Pg::fresh().await;
    apply_roles(&pg).await;
    let owner = PgStore::connect_with_options(
        &as_role(&pg, "deadbolt_migrate"),
        SessionLimits::default(),
        true,
    )
    .await
    .expect("deadbolt_migrate migrates with the file's schema rights");
    owner.pool().close().await;
    apply_roles(&pg).await;
    pg
}

/// Whether `r` failed with Postgres's insufficient_privilege (42501).
fn denied<T: std::fmt::Debug>(r: std::result::Result<T, sqlx::Error>) -> bool {
    match r {
        Err(sqlx::Error::Database(e)) => e.code().as_deref() == Some("42501"),
        other => {
            eprintln!("expected permission denied, got {other:?}");
            false
        }
    }
}

async fn raw(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap()
}

async fn exec(c: &mut PgConnection, sql: &str) -> std::result::Result<u64, sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
        .execute(c)
        .await
        .map(|r| r.rows_affected())
}

#[tokio::test]
async fn stage_role_cannot_read_api_keys_but_runs_its_jobs() {
    let pg = deployed().await;
    let limits = SessionLimits::default();

    // the migrate role owns the schema
    let mut admin = raw(pg.url()).await;
    let owner: String =
        sqlx::query_scalar("SELECT tableowner::text FROM pg_tables WHERE tablename = 'api_keys'")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!(owner, "deadbolt_migrate");

    // ---- the gateway: teams, keys, runs, without DDL ----
    let gw: Arc<dyn MetadataStore> =
        connect_with_options(&as_role(&pg, "deadbolt_gateway"), limits, false)
            .await
            .expect("the gateway connects without migrating");
    let team = format!("t{}", &Uuid::new_v4().simple().to_string()[..12]);
    gw.create_team(&team).await.unwrap();
    let (_, key) = gw
        .create_api_key(&team, "ci", &[Scope::Submit, Scope::Read], None)
        .await
        .unwrap();
    let who = gw
        .authenticate(&key)
        .await
        .unwrap()
        .expect("the key is known");
    assert_eq!(who.team, team);
    let (run, _) = gw
        .create_run_within(
            NewRun {
                team: team.clone(),
                client_request_id: Some("req-1".into()),
                name: "roles".into(),
                spec_json: json!({"name": "roles"}),
            },
            10,
        )
        .await
        .unwrap();
    let token = gw
        .claim_run(run.id, "gw-1", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the run is claimable");
    gw.renew_run(run.id, token, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        gw.list_run_pages(Some(&team), 10, 0).await.unwrap().len(),
        1
    );
    gw.run_summary(run.id).await.unwrap();
    let mut gwc = raw(&as_role(&pg, "deadbolt_gateway")).await;
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&mut gwc)
        .await
        .expect("the gateway reads api_keys");
    assert_eq!(keys, 1);
    assert!(denied(exec(&mut gwc, "CREATE TABLE gw_ddl (a int)").await));
    assert!(denied(exec(&mut gwc, "DELETE FROM _sqlx_migrations").await));
    assert!(denied(exec(&mut gwc, "TRUNCATE runs").await));

    // ---- a stage: no keys, no teams, no DDL ----
    let stage_url = as_role(&pg, "deadbolt_stage");
    let mut sc = raw(&stage_url).await;
    assert!(
        denied(exec(&mut sc, "SELECT * FROM api_keys").await),
        "the stage role reads api_keys"
    );
    assert!(denied(exec(&mut sc, "SELECT key_hash FROM api_keys").await));
    assert!(denied(
        exec(&mut sc, "UPDATE api_keys SET revoked_at = NULL").await
    ));
    assert!(denied(exec(&mut sc, "SELECT * FROM teams").await));
    assert!(denied(exec(&mut sc, "SELECT * FROM run_summary").await));
    assert!(denied(exec(&mut sc, "UPDATE runs SET name = 'x'").await));
    assert!(denied(exec(&mut sc, "DELETE FROM runs").await));
    assert!(denied(
        exec(&mut sc, "CREATE TABLE stage_ddl (a int)").await
    ));
    assert!(denied(exec(&mut sc, "DROP TABLE api_keys").await));
    assert!(denied(exec(&mut sc, "DELETE FROM _sqlx_migrations").await));

    // ... while its whole store surface works, connected without migrating
    let st: Arc<dyn MetadataStore> = connect_with_options(&stage_url, limits, false)
        .await
        .expect("a stage connects without DDL rights");
    st.ping().await.unwrap();
    let stage = "trainer".to_string();
    let stages = [stage.clone()];
    let (job, _) = st
        .enqueue_job(NewJob {
            run_id: run.id,
            stage: stage.clone(),
            payload: json!({"epochs": 1}),
            max_attempts: 3,
        })
        .await
        .expect("a stage RPC enqueues its run's job");
    assert_eq!(st.get_run(run.id).await.unwrap().team, team);
    assert!(st.next_lease_at(&stages).await.unwrap().is_some());
    assert!(!st.queue_stats().await.unwrap().is_empty());

    // lease, release, lease again, fail with a retry, lease, complete
    let lease = Duration::from_secs(30);
    let j = st
        .lease_job("w1", &stages, lease)
        .await
        .unwrap()
        .expect("leased");
    assert_eq!(j.id, job.id);
    st.release_job(j.id, j.lease_token.unwrap()).await.unwrap();
    let j = st
        .lease_job("w1", &stages, lease)
        .await
        .unwrap()
        .expect("leased");
    st.fail_job(
        j.id,
        j.lease_token.unwrap(),
        &JobFailure::new("unavailable", "try again"),
        Duration::ZERO,
    )
    .await
    .unwrap();
    let j = st
        .lease_job("w1", &stages, lease)
        .await
        .unwrap()
        .expect("leased");
    let t = j.lease_token.unwrap();
    let fence = Fence {
        job_id: j.id,
        lease_token: t,
    };
    st.heartbeat(j.id, t, lease, Some((0.5, "half".into())))
        .await
        .unwrap();
    st.append_event(Some(&fence), run.id, &stage, "progress", "half", Some(0.5))
        .await
        .unwrap();
    st.record_metric(Some(&fence), run.id, &stage, "clean_acc", 1, 0.9)
        .await
        .unwrap();
    st.record_metric(Some(&fence), run.id, &stage, "clean_acc", 1, 0.95)
        .await
        .unwrap();
    st.put_neuron_stats(
        Some(&fence),
        run.id,
        &[NeuronStat {
            layer: "conv1".into(),
            model: "backdoored".into(),
            input: "triggered".into(),
            norm: "linf".into(),
            channel: 0,
            value: 1.5,
        }],
    )
    .await
    .unwrap();
    let point = CurvePoint {
        k: 1,
        acc: 0.9,
        asr: 0.1,
        ra: 0.8,
    };
    st.put_pruning_curve(Some(&fence), run.id, "linf", &[point])
        .await
        .unwrap();
    st.set_pruning_choice(Some(&fence), run.id, "linf", point)
        .await
        .unwrap();
    st.put_scan_result(
        Some(&fence),
        run.id,
        &ScanResult {
            model: "m".into(),
            verdict: "clean".into(),
            suspect_label: None,
            anomaly_index: None,
            clean_acc: 0.9,
            repaired: false,
            acc_before: None,
            asr_before: None,
            acc_after: None,
            asr_after: None,
            pruned_channels: None,
            met: None,
        },
    )
    .await
    .unwrap();
    for name in ["epoch-1.ckpt", "model.ckpt"] {
        st.record_artifact(
            Some(&fence),
            ArtifactRecord {
                run_id: run.id,
                name: name.into(),
                uri: format!("s3://b/{name}"),
                sha256: "0".repeat(64),
                size: 3,
                content_type: None,
            },
        )
        .await
        .expect("a stage records an artifact");
    }
    st.get_artifact(run.id, "model.ckpt").await.unwrap();
    assert!(st
        .delete_artifact(Some(&fence), run.id, "epoch-1.ckpt")
        .await
        .unwrap()
        .is_some());
    assert_eq!(st.list_artifacts(run.id).await.unwrap().len(), 1);
    st.complete_job(j.id, t, json!({"ok": true})).await.unwrap();
    assert_eq!(st.list_jobs(run.id).await.unwrap().len(), 1);
    assert_eq!(st.get_job(j.id).await.unwrap().status, JobStatus::Succeeded);

    // the gateway sees what the stage wrote
    assert_eq!(gw.list_events(run.id, 0).await.unwrap().len(), 1);
    assert_eq!(gw.list_metrics(run.id).await.unwrap()[0].value, 0.95);
    assert_eq!(gw.list_neuron_stats(run.id).await.unwrap().len(), 1);
    assert_eq!(gw.list_pruning_curves(run.id).await.unwrap().len(), 1);
    gw.get_scan_result(run.id).await.unwrap();

    for c in [admin, gwc, sc] {
        c.close().await.unwrap();
    }
    pg.drop_db().await;
}

/// Every relation of the migrated schema is decided for: the stage role
/// reads exactly the tables 20-roles.sql lists (all but the deny list, no
/// view); the gateway reads every table and view and writes every table
/// but sqlx's record. A migration that adds a table fails this test until
/// the table is granted to deadbolt_stage in 20-roles.sql or denied here.
#[tokio::test]
async fn every_table_is_granted_or_denied_to_the_stage_role() {
    let pg = deployed().await;
    let mut admin = raw(pg.url()).await;
    let rows: Vec<(String, String, bool, bool, bool, bool)> = sqlx::query_as(
        "SELECT c.relname::text, c.relkind::text, \
           has_table_privilege('deadbolt_stage', c.oid, 'SELECT'), \
           has_table_privilege('deadbolt_gateway', c.oid, 'SELECT'), \
           has_table_privilege('deadbolt_gateway', c.oid, 'INSERT'), \
           has_table_privilege('deadbolt_stage', c.oid, 'TRUNCATE') \
              OR has_table_privilege('deadbolt_gateway', c.oid, 'TRUNCATE') \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm') \
         ORDER BY 1",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    let names: BTreeSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    for t in [
        "api_keys",
        "teams",
        "runs",
        "stage_jobs",
        "artifacts",
        "run_summary",
    ] {
        assert!(names.contains(t), "no relation {t} in {names:?}");
    }
    let mut undecided = vec![];
    for (name, kind, stage_reads, gw_reads, gw_writes, truncate) in &rows {
        let table = kind == "r" || kind == "p";
        let stage_should = table && !STAGE_DENIED.contains(&name.as_str());
        if *stage_reads != stage_should {
            if stage_should {
                undecided.push(name.clone());
            } else {
                panic!("deadbolt_stage may read {name}: only the listed tables, never {STAGE_DENIED:?} or a view");
            }
        }
        assert!(gw_reads, "deadbolt_gateway cannot read {name}");
        if table {
            assert_eq!(
                *gw_writes,
                name != "_sqlx_migrations",
                "deadbolt_gateway's write right on {name}"
            );
        }
        assert!(!truncate, "TRUNCATE on {name} is granted");
    }
    assert!(
        undecided.is_empty(),
        "tables neither granted to deadbolt_stage in deploy/postgres/20-roles.sql nor on its \
         deny list (STAGE_DENIED here): {undecided:?}"
    );
    admin.close().await.unwrap();
    pg.drop_db().await;
}

/// `migrate = false` runs no DDL and refuses a schema that lacks one of this
/// build's migrations, has one that failed, or one whose file changed; a
/// migration it does not know (a newer build's) is fine.
#[tokio::test]
async fn without_migrating_an_unmigrated_schema_is_refused() {
    let pg = Pg::fresh().await;
    let limits = SessionLimits::default();
    let err = PgStore::connect_with_options(pg.url(), limits, false)
        .await
        .expect_err("an empty database is not migrated");
    let msg = err.to_string();
    assert!(
        msg.contains("not migrated") && msg.contains("DEADBOLT_MIGRATE=false"),
        "{msg}"
    );
    let mut admin = raw(pg.url()).await;
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!(tables, 0, "migrate = false created a table");

    PgStore::connect_with_options(pg.url(), limits, true)
        .await
        .unwrap()
        .pool()
        .close()
        .await;
    PgStore::connect_with_options(pg.url(), limits, false)
        .await
        .expect("a migrated schema is accepted")
        .pool()
        .close()
        .await;

    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY 1")
        .fetch_all(&mut admin)
        .await
        .unwrap();
    let (first, last) = (versions[0], *versions.last().unwrap());

    // a newer build's migration: accepted (logged)
    exec(
        &mut admin,
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99991231000000, 'from the future', true, '\\x00', 1)",
    )
    .await
    .unwrap();
    PgStore::connect_with_options(pg.url(), limits, false)
        .await
        .expect("an unknown newer migration is tolerated")
        .pool()
        .close()
        .await;

    // a changed file
    exec(
        &mut admin,
        &format!(
            "UPDATE _sqlx_migrations SET checksum = checksum || '\\x00'::bytea WHERE version = {first}"
        ),
    )
    .await
    .unwrap();
    let err = PgStore::connect_with_options(pg.url(), limits, false)
        .await
        .expect_err("a modified migration is refused");
    assert!(err.to_string().contains(&first.to_string()), "{err}");
    exec(
        &mut admin,
        &format!(
            "UPDATE _sqlx_migrations SET checksum = substring(checksum FROM 1 FOR length(checksum) - 1) \
             WHERE version = {first}"
        ),
    )
    .await
    .unwrap();

    // a failed one
    exec(
        &mut admin,
        &format!("UPDATE _sqlx_migrations SET success = false WHERE version = {last}"),
    )
    .await
    .unwrap();
    let err = PgStore::connect_with_options(pg.url(), limits, false)
        .await
        .expect_err("a dirty migration is refused");
    assert!(err.to_string().contains(&last.to_string()), "{err}");

    // a missing one
    exec(
        &mut admin,
        &format!("DELETE FROM _sqlx_migrations WHERE version = {last}"),
    )
    .await
    .unwrap();
    let err = PgStore::connect_with_options(pg.url(), limits, false)
        .await
        .expect_err("a missing migration is refused");
    let msg = err.to_string();
    assert!(
        msg.contains(&last.to_string()) && msg.contains("not applied"),
        "{msg}"
    );
    admin.close().await.unwrap();
    pg.drop_db().await;
}
