//! Observability over real processes (Postgres + S3): a real Prometheus
//! (Debian's `prometheus`, installed by scripts/setup-test-deps.sh) scrapes
//! a `deadbolt serve` process every second while two runs go through it;
//! its HTTP API shows the job counters and the queue depth moving. A run
//! watched by 200 concurrent `WatchExperiment` streams (push based: one
//! feed per run, woken by LISTEN/NOTIFY): every stream gets every event, no
//! lease is lost, and its time is printed next to the same run unwatched.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use deadbolt_proto::v1 as pb;
use futures::StreamExt;

const WATCHERS: usize = 200;

fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The value of a Prometheus instant query returning one number.
fn prom_value(prom: &str, query: &str) -> Option<f64> {
    let q: String = query
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let body = http_get(prom, &format!("/api/v1/query?query={q}")).ok()?;
    let json = body.split("\r\n\r\n").nth(1)?;
    // chunked or not: the JSON object is what lies between the outer braces
    let json = &json[json.find('{')?..=json.rfind('}')?];
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_sees_the_jobs_and_200_watchers_get_every_event() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = tiny_spec(d, 1, 1200);
    let pg = Pg::fresh().await;
    let (moto, art_url) = s3_bucket("obs");
    let work = d.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let all = serve_all(
        d,
        &config(
            pg.url(),
            &art_url,
            &work,
            &format!("metrics_listen = \"127.0.0.1:0\"\n{}", moto.config()),
        ),
    )
    .0;
    let metrics = all.addrs["metrics"].clone();
    let text = http_get(&metrics, "/metrics").unwrap();
    assert!(text.contains("deadbolt_worker_up"), "{text}");

    // a real Prometheus scraping the process every second
    let prom_addr = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        d.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: deadbolt\n    static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            d.join("prometheus.yml").display()
        ))
        .arg(format!("--storage.tsdb.path={}", d.join("tsdb").display()))
        .arg(format!("--web.listen-address={prom_addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(d.join("prometheus.log")).unwrap(),
        ))
        .spawn()
        .expect("prometheus (scripts/setup-deploy-deps.sh installs it)");
    wait_for("prometheus to scrape", Duration::from_secs(60), || {
        let p = prom_addr.clone();
        async move { (prom_value(&p, "up{job=\"deadbolt\"}") == Some(1.0)).then_some(()) }
    })
    .await;

    // the same run twice, alone: watched by 200 streams, then unwatched
    let mut c = gateway(&all.url("gateway")).await;
    let t_watched = Instant::now();
    let watched = submit_toml(&mut c, &spec, "obs-watched").await.run_id;
    let mut streams = Vec::new();
    for _ in 0..WATCHERS {
        let mut c = c.clone();
        let id = watched.clone();
        streams.push(tokio::spawn(async move {
            let mut s = c
                .watch_experiment(pb::WatchExperimentRequest {
                    run_id: id,
                    after_seq: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let mut seqs = Vec::new();
            while let Some(e) = s.next().await {
                seqs.push(e.unwrap().seq);
            }
            seqs
        }));
    }
    let (_, run) = watch(&mut c, &watched, Duration::from_secs(300)).await;
    let watched_secs = t_watched.elapsed().as_secs_f64();
    assert_succeeded(&run, &all.log_tail());
    let store = deadbolt_store::connect(pg.url()).await.unwrap();
    let id: uuid::Uuid = watched.parse().unwrap();
    let want: Vec<i64> = store
        .list_events(id, 0)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    for (i, s) in streams.into_iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .unwrap_or_else(|_| panic!("watcher {i} did not end"))
            .unwrap();
        assert_eq!(got, want, "watcher {i} missed events");
    }
    let t_plain = Instant::now();
    let plain = submit_toml(&mut c, &spec, "obs-plain").await.run_id;
    let (_, run) = watch(&mut c, &plain, Duration::from_secs(300)).await;
    let plain_secs = t_plain.elapsed().as_secs_f64();
    assert_eq!(run.status, pb::JobStatus::Succeeded as i32);

    // two runs at once: the second one's jobs queue behind the first's
    // (one trainer: they wait for both of the first run's trainings, each
    // seconds long, so the queue stays non-empty for longer than the 2 s
    // gauge period plus the 1 s scrape; with 3 epochs of 1,800 images an
    // unloaded machine emptied it between two samples, 1 run in 6)
    let spec3 = tiny_spec(d, 6, 3000);
    let both = [
        submit_toml(&mut c, &spec3, "obs-queue-1").await.run_id,
        submit_toml(&mut c, &spec3, "obs-queue-2").await.run_id,
    ];
    for r in &both {
        let (_, run) = watch(&mut c, r, Duration::from_secs(300)).await;
        assert_eq!(run.status, pb::JobStatus::Succeeded as i32);
    }
    for r in [&watched, &plain, &both[0], &both[1]] {
        for j in store.list_jobs(r.parse().unwrap()).await.unwrap() {
            assert_eq!(j.attempts, 1, "{}: a lease expired", j.stage);
        }
    }

    // Prometheus saw the jobs and the queue move
    wait_for("the final scrape", Duration::from_secs(30), || {
        let p = prom_addr.clone();
        async move {
            (prom_value(&p, "sum(deadbolt_jobs_succeeded_total)") == Some(20.0)).then_some(())
        }
    })
    .await;
    let leased = prom_value(&prom_addr, "sum(deadbolt_jobs_leased_total)").unwrap();
    assert_eq!(leased, 20.0, "5 stages x 4 runs");
    let peak = prom_value(&prom_addr, "max(max_over_time(deadbolt_queue_depth[10m]))").unwrap();
    assert!(peak >= 1.0, "the queue depth never rose: {peak}");
    let lost = prom_value(&prom_addr, "sum(deadbolt_jobs_lease_lost_total)").unwrap_or(0.0);
    assert_eq!(lost, 0.0);
    let served = prom_value(
        &prom_addr,
        "sum(deadbolt_grpc_requests_total{method=\"/deadbolt.v1.ExperimentService/WatchExperiment\"})",
    )
    .unwrap();
    assert!(served >= WATCHERS as f64, "{served}");
    let images = prom_value(&prom_addr, "max(deadbolt_train_images_per_second)").unwrap();
    assert!(images > 0.0);

    let _ = prom.kill();
    let _ = prom.wait();
    drop(all);
    pg.drop_db().await;
    eprintln!(
        "observability: run with {WATCHERS} watchers {watched_secs:.1} s; \
         the same run unwatched {plain_secs:.1} s; peak queue depth {peak}; \
         took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
