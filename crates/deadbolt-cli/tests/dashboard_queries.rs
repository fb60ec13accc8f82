//! The SQL that operators' tools run against deadbolt's database, on real
//! data: a tiny MNIST experiment runs end to end (every service in one
//! `deadbolt serve` process, a fresh Postgres database, local artifacts),
//! then
//!
//! - every SQL query of the Grafana dashboard
//!   (`deploy/grafana/dashboards/deadbolt.json`: each Postgres panel's
//!   `rawSql` and each query variable), with Grafana's macros and the
//!   dashboard's variables filled in as Grafana would, runs and returns
//!   rows with the columns its panel expects ([`EXPECTED`]); the panel's
//!   own configuration (field overrides by name, `xField`) names only
//!   columns the query returns; the per-criterion "before" figures are the
//!   backdoored model's as the training stage recorded them;
//! - every KEDA autoscaler query (`query:` of each ScaledObject under
//!   `deploy/k8s`) returns one integer: polled while the run goes, it asks
//!   for a worker of its stage at some point (so a deployment scaled to
//!   zero wakes up), and after the run it asks for none (so it scales back
//!   to zero).
//!
//! Adding a Postgres panel to the dashboard without listing its columns
//! here fails the test.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{Column, PgPool, Row, ValueRef};

/// The columns each Postgres query of the dashboard must return, in order,
/// keyed by panel title (the `run` variable's query under "var run").
/// A column marked `?` may be NULL in every row (a pruning criterion the
/// tiny spec does not use); every other column has a value in some row.
const EXPECTED: &[(&str, &[&str])] = &[
    ("var run", &["__value", "__text"]),
    ("Runs by status", &["status", "runs"]),
    (
        "Runs created per hour, by status",
        &["time", "metric", "runs"],
    ),
    (
        "Runs",
        &[
            "id",
            "name",
            "status",
            "created_at",
            "updated_at",
            "clean_acc",
            "backdoored_acc",
            "backdoored_asr",
            "linf_k",
            "linf_acc",
            "linf_asr",
            "linf_ra",
            "error?",
        ],
    ),
    (
        "Scanned models",
        &[
            "run_id",
            "name",
            "team",
            "status",
            "created_at",
            "model",
            "verdict",
            "suspect_label",
            "anomaly_index",
            "clean_acc",
            "repaired",
            "acc_before",
            "asr_before",
            "acc_after",
            "asr_after",
            "pruned_channels",
            "met",
        ],
    ),
    (
        "Backdoored model and l_inf pruning",
        &[
            "clean_acc",
            "backdoored_acc",
            "backdoored_asr",
            "linf_k",
            "linf_acc",
            "linf_asr",
        ],
    ),
    (
        "ACC / ASR before and after pruning, per criterion",
        &[
            "criterion",
            "acc_before",
            "asr_before",
            "channels_pruned",
            "acc_after",
            "asr_after",
            "ra_after",
            "acc_change",
            "asr_change",
        ],
    ),
    (
        "ASR vs channels pruned, per criterion",
        &[
            "k",
            "linf",
            "l1",
            "l2?",
            "linf-diff?",
            "fine-pruning",
            "random?",
        ],
    ),
    (
        "ACC vs channels pruned, per criterion",
        &[
            "k",
            "linf",
            "l1",
            "l2?",
            "linf-diff?",
            "fine-pruning",
            "random?",
        ],
    ),
    (
        "Channel activations ($norm) in the four settings",
        &[
            "channel",
            "clean/clean",
            "clean/triggered",
            "backdoored/clean",
            "backdoored/triggered",
        ],
    ),
];

/// The criteria of the tiny spec (crates/deadbolt-test-support/specs/tiny.toml).
const TINY_CRITERIA: [&str; 3] = ["fine-pruning", "l1", "linf"];

/// The Postgres data source's uid in the dashboard and its provisioning.
const PG_UID: &str = "deadbolt-pg";

/// One SQL query of the dashboard.
struct DashQuery {
    title: String,
    sql: String,
    format: String,
    /// Columns the panel's configuration names (overrides by name, xField).
    named_by_panel: BTreeSet<String>,
}

fn dashboard() -> Value {
    let path = repo().join("deploy/grafana/dashboards/deadbolt.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn is_postgres(ds: Option<&Value>) -> bool {
    ds.and_then(|d| d["uid"].as_str()) == Some(PG_UID)
}

/// Every SQL query of the dashboard: each query variable's and each
/// Postgres target's (rows' nested panels included).
fn dashboard_queries(dash: &Value) -> Vec<DashQuery> {
    let mut out = Vec::new();
    for v in dash["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" && is_postgres(v.get("datasource")) {
            out.push(DashQuery {
                title: format!("var {}", v["name"].as_str().unwrap()),
                sql: v["query"].as_str().unwrap().to_string(),
                format: "table".into(),
                named_by_panel: BTreeSet::new(),
            });
        }
    }
    fn walk(panels: &[Value], out: &mut Vec<DashQuery>) {
        for p in panels {
            if let Some(inner) = p["panels"].as_array() {
                walk(inner, out);
            }
            let mut named = BTreeSet::new();
            for o in p["fieldConfig"]["overrides"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if o["matcher"]["id"] == "byName" {
                    named.insert(o["matcher"]["options"].as_str().unwrap().to_string());
                }
            }
            if let Some(x) = p["options"]["xField"].as_str() {
                named.insert(x.to_string());
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                let ds = t.get("datasource").or(p.get("datasource"));
                if !is_postgres(ds) {
                    continue;
                }
                out.push(DashQuery {
                    title: p["title"].as_str().unwrap().to_string(),
                    sql: t["rawSql"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{}: no rawSql", p["title"]))
                        .to_string(),
                    format: t["format"].as_str().unwrap_or("table").to_string(),
                    named_by_panel: named.clone(),
                });
            }
        }
    }
    walk(dash["panels"].as_array().unwrap(), &mut out);
    out
}

/// Grafana's macros and variables filled in: `$__timeFilter(col)` becomes
/// `true` (every run is in range), `$var` / `${var}` the variable's value.
fn interpolate(sql: &str, vars: &BTreeMap<String, String>) -> String {
    let mut s = sql.to_string();
    while let Some(i) = s.find("$__timeFilter(") {
        let close = s[i..].find(')').expect("closing parenthesis") + i;
        s.replace_range(i..=close, "true");
    }
    // longest names first, so `$run_name` would not be cut at `$run`
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for n in names {
        s = s
            .replace(&format!("${{{n}}}"), &vars[n])
            .replace(&format!("${n}"), &vars[n]);
    }
    assert!(
        !s.contains('$'),
        "a macro or variable left in the query:\n{s}"
    );
    s
}

async fn fetch(pool: &PgPool, sql: &str) -> Result<Vec<PgRow>, sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_all(pool)
        .await
}

fn column_names(row: &PgRow) -> Vec<String> {
    row.columns().iter().map(|c| c.name().to_string()).collect()
}

fn is_null(row: &PgRow, col: &str) -> bool {
    row.try_get_raw(col).unwrap().is_null()
}

/// The ScaledObjects' queries under deploy/k8s: (ScaledObject name, query).
/// A small reader of our own manifests' layout (one `metadata: name:` and
/// one `query: |` block per ScaledObject document), not a YAML parser.
fn keda_queries() -> Vec<(String, String)> {
    let mut files = Vec::new();
    fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, files);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                files.push(p);
            }
        }
    }
    walk(&repo().join("deploy/k8s"), &mut files);
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in text.split("\n---") {
            if !doc.lines().any(|l| l.trim() == "kind: ScaledObject") {
                continue;
            }
            let lines: Vec<&str> = doc.lines().collect();
            let meta = lines.iter().position(|l| *l == "metadata:").unwrap();
            let name = lines[meta + 1..]
                .iter()
                .find_map(|l| l.trim().strip_prefix("name: "))
                .unwrap()
                .to_string();
            let q = lines
                .iter()
                .position(|l| l.trim() == "query: |")
                .unwrap_or_else(|| {
                    panic!("{}: ScaledObject {name} without `query: |`", f.display())
                });
            let indent = lines[q].len() - lines[q].trim_start().len();
            let body: Vec<&str> = lines[q + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            out.push((name, body.join("\n")));
        }
    }
    out
}

/// Runs a KEDA query: one row, one integer column (the replicas wanted).
async fn keda_value(pool: &PgPool, name: &str, sql: &str) -> i64 {
    let rows = fetch(pool, sql)
        .await
        .unwrap_or_else(|e| panic!("KEDA query of {name}: {e}\n{sql}"));
    assert_eq!(rows.len(), 1, "KEDA query of {name}: one row");
    assert_eq!(rows[0].len(), 1, "KEDA query of {name}: one column");
    rows[0]
        .try_get::<i64, _>(0)
        .unwrap_or_else(|e| panic!("KEDA query of {name}: not an integer: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_autoscaler_queries_run_on_a_finished_run() {
    let t0 = Instant::now();
    let dash = dashboard();
    let queries = dashboard_queries(&dash);
    let keda = keda_queries();
    assert!(
        keda.iter().any(|(n, _)| n == "trainer"),
        "no trainer ScaledObject"
    );

    // the dashboard's Postgres queries are exactly the ones listed here
    let listed: BTreeSet<&str> = EXPECTED.iter().map(|(t, _)| *t).collect();
    let found: BTreeSet<&str> = queries.iter().map(|q| q.title.as_str()).collect();
    assert_eq!(
        found, listed,
        "the dashboard's SQL panels and EXPECTED differ: list the columns of a new panel here"
    );

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = tiny_spec(d, 1, 1200);
    let pg = Pg::fresh().await;
    let work = d.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let art = d.join("artifacts");
    let all = serve_all(d, &config(pg.url(), &art.display().to_string(), &work, "")).0;
    let pool = PgPool::connect(pg.url()).await.unwrap();

    // the autoscaler's view while the run goes: the most workers each
    // ScaledObject asked for
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (pool, keda, stop) = (pool.clone(), keda.clone(), stop.clone());
        tokio::spawn(async move {
            let mut most: BTreeMap<String, i64> = BTreeMap::new();
            while !stop.load(Ordering::SeqCst) {
                for (name, sql) in &keda {
                    let v = keda_value(&pool, name, sql).await;
                    let m = most.entry(name.clone()).or_insert(0);
                    *m = (*m).max(v);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            most
        })
    };

    let mut c = gateway(&all.url("gateway")).await;
    let sub = submit_toml(&mut c, &spec, "dashboard-queries").await;
    let (_, run) = watch(&mut c, &sub.run_id, Duration::from_secs(240)).await;
    assert_succeeded(&run, &all.log_tail());
    let run_secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let most = poller.await.unwrap();

    for (name, sql) in &keda {
        assert!(
            most.get(name).copied().unwrap_or(0) >= 1,
            "ScaledObject {name} never asked for a worker during the run ({most:?})"
        );
        assert_eq!(
            keda_value(&pool, name, sql).await,
            0,
            "ScaledObject {name} still asks for workers after the run"
        );
    }

    // a scan verdict, so that the "Scanned models" panel has a row (the
    // scan flow itself runs in services_byom; here only the view's query
    // is under test)
    let store = deadbolt_store::connect(pg.url()).await.unwrap();
    let run_uuid: uuid::Uuid = sub.run_id.parse().unwrap();
    store
        .put_scan_result(
            None,
            run_uuid,
            &deadbolt_store::ScanResult {
                model: "vendor-net".into(),
                verdict: "backdoored".into(),
                suspect_label: Some(0),
                anomaly_index: Some(3.5),
                clean_acc: 0.97,
                repaired: true,
                acc_before: Some(0.97),
                asr_before: Some(0.99),
                acc_after: Some(0.96),
                asr_after: Some(0.01),
                pruned_channels: Some(1),
                met: Some(true),
            },
        )
        .await
        .unwrap();

    // the variables as Grafana fills them in: a query variable takes its
    // query's first value (the newest run: ours), a custom one its current value
    let mut vars = BTreeMap::new();
    for v in dash["templating"]["list"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap().to_string();
        let value = if v["type"] == "query" {
            let rows = fetch(&pool, v["query"].as_str().unwrap()).await.unwrap();
            assert!(!rows.is_empty(), "variable {name}: no values");
            rows[0].try_get::<String, _>("__value").unwrap()
        } else {
            v["current"]["value"]
                .as_str()
                .unwrap_or_else(|| panic!("variable {name}: no current value"))
                .to_string()
        };
        vars.insert(name, value);
    }
    assert_eq!(
        vars["run"], sub.run_id,
        "the run variable picks the newest run"
    );

    let expected: BTreeMap<&str, &[&str]> = EXPECTED.iter().copied().collect();
    let mut results: BTreeMap<String, Vec<PgRow>> = BTreeMap::new();
    for q in &queries {
        let sql = interpolate(&q.sql, &vars);
        let rows = fetch(&pool, &sql)
            .await
            .unwrap_or_else(|e| panic!("panel {:?}: {e}\n{sql}", q.title));
        assert!(
            !rows.is_empty(),
            "panel {:?} returned no rows\n{sql}",
            q.title
        );
        let want: Vec<&str> = expected[q.title.as_str()]
            .iter()
            .map(|c| c.trim_end_matches('?'))
            .collect();
        assert_eq!(column_names(&rows[0]), want, "panel {:?}: columns", q.title);
        for col in expected[q.title.as_str()] {
            if !col.ends_with('?') {
                assert!(
                    rows.iter().any(|r| !is_null(r, col)),
                    "panel {:?}: column {col} is NULL in every row",
                    q.title
                );
            }
        }
        for n in &q.named_by_panel {
            assert!(
                want.contains(&n.as_str()),
                "panel {:?} configures field {n:?}, which its query does not return",
                q.title
            );
        }
        if q.format == "time_series" {
            assert_eq!(
                want[0], "time",
                "panel {:?}: a time series needs `time` first",
                q.title
            );
        }
        results.insert(q.title.clone(), rows);
    }

    // what the panels say about this run
    let runs = &results["Runs"];
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0].try_get::<uuid::Uuid, _>("id").unwrap().to_string(),
        sub.run_id
    );
    let status = &results["Runs by status"];
    assert_eq!(
        status[0].try_get::<String, _>("status").unwrap(),
        "succeeded"
    );
    assert_eq!(status[0].try_get::<i64, _>("runs").unwrap(), 1);
    let head = &results["Backdoored model and l_inf pruning"][0];
    let bd_acc: f64 = head.try_get("backdoored_acc").unwrap();
    let bd_asr: f64 = head.try_get("backdoored_asr").unwrap();
    let per_criterion = &results["ACC / ASR before and after pruning, per criterion"];
    let criteria: BTreeSet<String> = per_criterion
        .iter()
        .map(|r| r.try_get::<String, _>("criterion").unwrap())
        .collect();
    assert_eq!(
        criteria,
        TINY_CRITERIA.iter().map(|c| c.to_string()).collect(),
        "one row per criterion of the spec"
    );
    for r in per_criterion {
        // "before" is the unpruned backdoored model, as trained
        let before: f64 = r.try_get("acc_before").unwrap();
        assert!(
            (before - bd_acc).abs() < 1e-6,
            "acc_before {before} vs {bd_acc}"
        );
        let before: f64 = r.try_get("asr_before").unwrap();
        assert!(
            (before - bd_asr).abs() < 1e-6,
            "asr_before {before} vs {bd_asr}"
        );
    }
    for t in [
        "ASR vs channels pruned, per criterion",
        "ACC vs channels pruned, per criterion",
    ] {
        let ks: Vec<i64> = results[t].iter().map(|r| r.try_get("k").unwrap()).collect();
        assert_eq!(ks.first(), Some(&0), "{t}: the curve starts unpruned");
        assert!(
            ks.windows(2).all(|w| w[1] == w[0] + 1),
            "{t}: k = 0, 1, 2, ..."
        );
    }
    assert!(
        results["Channel activations ($norm) in the four settings"].len() >= 2,
        "one row per channel"
    );

    println!(
        "{} dashboard queries and {} KEDA queries checked; run {:.1} s, test {:.1} s",
        queries.len(),
        keda.len(),
        run_secs,
        t0.elapsed().as_secs_f64()
    );
    drop(all);
    pool.close().await;
    pg.drop_db().await;
}
