//! Hostile input against real services (issue 18 §2, "Done when"): one
//! `deadbolt serve` process (every service, Postgres, filesystem artifacts,
//! team API keys) receives, from a hostile team, a gzip bomb, an IDX header
//! claiming 64 images of 1024x1024, a model card with 4,000,000 classes, a
//! spec with 10,000 criteria, 10,000 calls to random gRPC paths, and 64
//! parallel submits at a quota of 32; meanwhile an honest team's run goes
//! on. Each hostile case is refused with its typed status (or its run fails
//! with a typed stage error naming the file or field), the serving process
//! stays alive with its peak RSS (VmHWM, /proc) under [`PEAK_RSS_BOUND`],
//! `/metrics` does not grow with the random paths, and the honest run
//! succeeds.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use deadbolt_proto::v1 as pb;
use deadbolt_test_support::specs::mnist_dir;
use futures::StreamExt;
use tonic::Code;

/// The serving process's peak resident memory may not pass this (it runs
/// every service, libtorch included, and trains the honest run's two
/// tiny models; a gzip bomb read to its end alone would pass it).
const PEAK_RSS_BOUND: u64 = 1536 << 20;

/// What the gzip bomb inflates to (it is about 2 MB as sent).
const BOMB_INFLATED: u64 = 2 << 30;

/// The operator's inflate limit in this test's config.
const MAX_INFLATED: u64 = 64 << 20;

fn vm_hwm(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kib << 10
}

async fn upload(c: &mut Keyed, kind: pb::UploadKind, name: &str, file: &str, body: &[u8]) {
    let msgs = common::upload::messages(
        common::upload::header(kind, name, file, body),
        body,
        1 << 20,
    );
    c.upload(futures::stream::iter(msgs))
        .await
        .unwrap_or_else(|e| panic!("upload {name}/{file}: {e:?}"));
}

/// The real digits cut small: (file name, bytes) of the four IDX files.
fn small_digits() -> Vec<(&'static str, Vec<u8>)> {
    let m = mnist_dir();
    vec![
        (
            "train-images-idx3-ubyte",
            cut_idx(&m.join("train-images-idx3-ubyte"), 16, 784, 600),
        ),
        (
            "train-labels-idx1-ubyte",
            cut_idx(&m.join("train-labels-idx1-ubyte"), 8, 1, 600),
        ),
        (
            "t10k-images-idx3-ubyte",
            cut_idx(&m.join("t10k-images-idx3-ubyte"), 16, 784, 200),
        ),
        (
            "t10k-labels-idx1-ubyte",
            cut_idx(&m.join("t10k-labels-idx1-ubyte"), 8, 1, 200),
        ),
    ]
}

/// A gzipped IDX image file whose header claims 100,000 28x28 images (78
/// MB, within every image and byte limit but over the inflate limit) and
/// whose stream inflates to [`BOMB_INFLATED`] zero bytes after it. Built
/// without compressing 2 GiB: each MiB of zeros is one full-flushed
/// deflate block (the dictionary reset, so every such block is the same
/// bytes), repeated.
fn gzip_bomb() -> Vec<u8> {
    use flate2::{Compress, Compression, Crc, FlushCompress};
    let mut header = vec![0u8, 0, 8, 3];
    for v in [100_000u32, 28, 28] {
        header.extend_from_slice(&v.to_be_bytes());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut c = Compress::new(Compression::best(), false);
    let mut deflate = |input: &[u8], flush: FlushCompress| -> Vec<u8> {
        let mut out = Vec::with_capacity(1 << 16);
        let before = c.total_in();
        c.compress_vec(input, &mut out, flush).unwrap();
        assert_eq!(c.total_in() - before, input.len() as u64);
        out
    };
    let head = deflate(&header, FlushCompress::Full);
    let block = deflate(&zeros, FlushCompress::Full);
    assert_eq!(deflate(&zeros, FlushCompress::Full), block);
    let mut crc = Crc::new();
    crc.update(&header);
    let mut gz = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    gz.extend_from_slice(&head);
    gz.extend_from_slice(&block);
    crc.update(&zeros);
    gz.extend_from_slice(&block);
    crc.update(&zeros);
    for _ in 2..(BOMB_INFLATED >> 20) {
        gz.extend_from_slice(&block);
        crc.update(&zeros);
    }
    gz.extend_from_slice(&deflate(&[], FlushCompress::Finish));
    gz.extend_from_slice(&crc.sum().to_le_bytes());
    gz.extend_from_slice(&crc.amount().to_le_bytes());
    // it is the gzip it claims to be: its first 3 MiB inflate to the header
    // and zeros
    let mut first = vec![0u8; 3 << 20];
    flate2::read::GzDecoder::new(&gz[..])
        .read_exact(&mut first)
        .unwrap();
    assert_eq!(&first[..16], &header[..]);
    assert!(first[16..].iter().all(|&b| b == 0));
    gz
}

/// An IDX image file whose header claims 64 images of 1024x1024 (64 MiB
/// of pixels) while it holds 1,000 bytes.
fn huge_idx_header() -> Vec<u8> {
    let mut b = vec![0u8, 0, 8, 3];
    for v in [64u32, 1024, 1024] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(&[0u8; 1000]);
    b
}

fn submit(id: &str, spec: &str) -> pb::SubmitExperimentRequest {
    pb::SubmitExperimentRequest {
        client_request_id: id.into(),
        spec: Some(pb::submit_experiment_request::Spec::SpecToml(
            spec.to_string(),
        )),
    }
}

/// Waits for the run to end (the server's log tail when it does not); the
/// run.
async fn finished(c: &mut Keyed, run_id: &str, timeout: Duration, server: &Proc) -> pb::Run {
    watch_logged(c, run_id, timeout, Some(server)).await.1
}

/// The run failed in a stage with a typed error whose message names `what`.
fn assert_typed_failure(run: &pb::Run, what: &str) {
    assert_failure_code(run, what, &["resource_exhausted", "invalid_argument"]);
}

fn assert_failure_code(run: &pb::Run, what: &str, codes: &[&str]) {
    assert_eq!(run.status, pb::JobStatus::Failed as i32, "{run:#?}");
    let stage = run
        .stages
        .iter()
        .find(|s| s.status == pb::JobStatus::Failed as i32)
        .unwrap_or_else(|| panic!("no failed stage: {run:#?}"));
    assert!(codes.contains(&stage.error_code.as_str()), "{stage:#?}");
    assert!(stage.error.contains(what), "{what}: {stage:#?}");
    // it names the file as the client knows it, never a server path
    assert!(!stage.error.contains("/tmp/"), "{stage:#?}");
    // refused for good: not retried
    assert_eq!(stage.attempts, 1, "{stage:#?}");
}

fn metrics_text(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_inputs_are_refused_typed_and_bounded() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pg = Pg::fresh().await;
    let work = d.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let art = d.join("artifacts").display().to_string();
    let cfg_text = config_with(
        pg.url(),
        &art,
        &work,
        30.0,
        "keys",
        &format!(
            "metrics_listen = \"127.0.0.1:0\"\n[limits]\nmax_runs_in_flight = 32\n\
             max_inflated_bytes = {MAX_INFLATED}\n"
        ),
    );
    let (all, cfg) = serve_all(d, &cfg_text);
    let url = all.url("gateway");
    let metrics = all.addrs["metrics"].clone();
    let key = |team: &str| {
        admin(&cfg, &["team-create", team]);
        team_key(&cfg, team, team, "submit,read")
    };
    let (honest, hostile, crowd) = (key("honest"), key("hostile"), key("crowd"));
    let mut h = as_key(&url, Some(&honest)).await;
    let mut x = as_key(&url, Some(&hostile)).await;

    // the honest team's run goes on through everything below
    let tiny = std::fs::read_to_string(tiny_spec(d, 1, 1200)).unwrap();
    let honest_run = h
        .submit_experiment(submit("honest-1", &tiny))
        .await
        .unwrap()
        .into_inner()
        .run_id;

    // a spec with 10,000 criteria: INVALID_ARGUMENT naming the field
    let criteria = vec!["\"linf\""; 10_000].join(", ");
    let many = tiny.replace(
        "criteria = [\"linf\", \"l1\", \"fine-pruning\"]",
        &format!("criteria = [{criteria}]"),
    );
    assert_ne!(many, tiny);
    let e = x
        .submit_experiment(submit("criteria", &many))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        field_of(&e).contains(&"spec.defense.criteria".to_string()),
        "{e:?}"
    );
    eprintln!("10,000 criteria: {:?} {:?}", e.code(), field_of(&e));

    // 10,000 calls to random paths: refused, and /metrics does not grow
    let before = metrics_text(&metrics);
    let channel = channel(&url).await;
    let codes: Vec<Code> = futures::stream::iter(0..10_000)
        .map(|i| {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            async move {
                grpc.ready().await.unwrap();
                let path = format!(
                    "/x{i}.{}/M{}",
                    uuid::Uuid::new_v4().simple(),
                    uuid::Uuid::new_v4().simple()
                );
                grpc.unary::<(), (), _>(
                    tonic::Request::new(()),
                    path.parse().unwrap(),
                    tonic_prost::ProstCodec::default(),
                )
                .await
                .unwrap_err()
                .code()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, Code::Unauthenticated | Code::Unimplemented)),
        "{:?}",
        codes
            .iter()
            .find(|c| !matches!(c, Code::Unauthenticated | Code::Unimplemented))
    );
    let after = metrics_text(&metrics);
    assert!(!after.contains("/x1."), "a random path became a label");
    // the request counter's method labels: known methods and one
    // "unknown" that counted the 10,000 (the honest run adds known ones)
    let methods: std::collections::BTreeSet<&str> = after
        .lines()
        .filter(|l| l.starts_with("deadbolt_grpc_requests_total{"))
        .filter_map(|l| l.split("method=\"").nth(1)?.split('"').next())
        .collect();
    assert!(methods.contains("unknown"), "{methods:?}");
    assert!(
        methods
            .iter()
            .all(|m| *m == "unknown" || m.starts_with("/deadbolt.v1.") || m.starts_with("/grpc.")),
        "{methods:?}"
    );
    let (lb, la) = (before.lines().count(), after.lines().count());
    eprintln!(
        "10,000 random paths: {:?}; /metrics {lb} -> {la} lines",
        codes[0]
    );

    // 64 parallel submits at a quota of 32: exactly 32 runs
    let mut crowd_client = as_key(&url, Some(&crowd)).await;
    let results: Vec<Result<String, tonic::Status>> = futures::future::join_all((0..64).map(|i| {
        let (url, crowd) = (url.clone(), crowd.clone());
        let spec = tiny.replace("name = \"tiny-badnets\"", &format!("name = \"crowd-{i}\""));
        async move {
            let mut c = as_key(&url, Some(&crowd)).await;
            c.submit_experiment(submit(&format!("crowd-{i}"), &spec))
                .await
                .map(|r| r.into_inner().run_id)
        }
    }))
    .await;
    let created: Vec<(usize, String)> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().ok().map(|id| (i, id.clone())))
        .collect();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(e) if e.code() == Code::ResourceExhausted))
        .count();
    assert_eq!((created.len(), refused), (32, 32), "{results:?}");
    // an idempotent retry at quota answers its run
    let (i, id) = &created[0];
    let spec = tiny.replace("name = \"tiny-badnets\"", &format!("name = \"crowd-{i}\""));
    let again = crowd_client
        .submit_experiment(submit(&format!("crowd-{i}"), &spec))
        .await
        .unwrap()
        .into_inner()
        .run_id;
    assert_eq!(&again, id);
    for (_, id) in &created {
        crowd_client
            .cancel_experiment(pb::CancelExperimentRequest { run_id: id.clone() })
            .await
            .unwrap();
    }
    eprintln!("64 parallel submits at quota 32: 32 created, 32 RESOURCE_EXHAUSTED");

    // a gzip bomb: the data stage stops inflating at the operator's limit
    let bomb = tokio::task::spawn_blocking(gzip_bomb).await.unwrap();
    eprintln!(
        "gzip bomb: {} bytes inflating to {} bytes",
        bomb.len(),
        BOMB_INFLATED + 16
    );
    for (file, body) in small_digits() {
        if file == "train-images-idx3-ubyte" {
            let gz = format!("{file}.gz");
            upload(&mut x, pb::UploadKind::Dataset, "bomb", &gz, &bomb).await;
        } else {
            upload(&mut x, pb::UploadKind::Dataset, "bomb", file, &body).await;
        }
    }
    let spec = tiny.replace("path = \"mnist\"", "path = \"upload:bomb\"");
    let run = x
        .submit_experiment(submit("bomb", &spec))
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let run = finished(&mut x, &run, Duration::from_secs(120), &all).await;
    assert_failure_code(&run, "train-images-idx3-ubyte.gz", &["resource_exhausted"]);
    eprintln!(
        "gzip bomb: {}",
        run.stages
            .iter()
            .find(|s| !s.error.is_empty())
            .unwrap()
            .error
    );

    // an IDX header claiming 64 images of 1024x1024
    for (file, body) in small_digits() {
        let body = if file == "train-images-idx3-ubyte" {
            huge_idx_header()
        } else {
            body
        };
        upload(&mut x, pb::UploadKind::Dataset, "huge", file, &body).await;
    }
    let spec = tiny.replace("path = \"mnist\"", "path = \"upload:huge\"");
    let run = x
        .submit_experiment(submit("huge", &spec))
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let run = finished(&mut x, &run, Duration::from_secs(120), &all).await;
    assert_typed_failure(&run, "train-images-idx3-ubyte");
    eprintln!(
        "huge IDX header: {}",
        run.stages
            .iter()
            .find(|s| !s.error.is_empty())
            .unwrap()
            .error
    );

    // a model card with 4,000,000 classes
    for (file, body) in small_digits() {
        upload(&mut x, pb::UploadKind::Dataset, "clean", file, &body).await;
    }
    let card = "arch = \"badnet-cnn\"\nclasses = 4000000\ninput_shape = [1, 28, 28]\nmean = [0.1307]\nstd = [0.3081]\n";
    upload(
        &mut x,
        pb::UploadKind::Model,
        "wide",
        "card.toml",
        card.as_bytes(),
    )
    .await;
    upload(
        &mut x,
        pb::UploadKind::Model,
        "wide",
        "model.safetensors",
        &safetensors_stub(),
    )
    .await;
    let scan = x
        .submit_scan(pb::SubmitScanRequest {
            client_request_id: "wide".into(),
            model: "upload:wide".into(),
            data: "upload:clean".into(),
            ..Default::default()
        })
        .await;
    match scan {
        Err(e) => {
            assert!(
                matches!(e.code(), Code::InvalidArgument | Code::ResourceExhausted),
                "{e:?}"
            );
            eprintln!("card with 4,000,000 classes: refused at submit: {e:?}");
        }
        Ok(r) => {
            let run = finished(
                &mut x,
                &r.into_inner().run_id,
                Duration::from_secs(120),
                &all,
            )
            .await;
            assert_typed_failure(&run, "classes");
            eprintln!(
                "card with 4,000,000 classes: {}",
                run.stages
                    .iter()
                    .find(|s| !s.error.is_empty())
                    .unwrap()
                    .error
            );
        }
    }

    // the honest run succeeded beside it all
    let run = finished(&mut h, &honest_run, Duration::from_secs(300), &all).await;
    assert_eq!(
        run.status,
        pb::JobStatus::Succeeded as i32,
        "{run:#?}\n{}",
        all.log_tail()
    );
    // watching the finished run replays its events and ends; a client
    // that lost its stream resumes after the last sequence number it saw
    let replay = |after_seq: i64| {
        let (url, honest, run_id) = (url.clone(), honest.clone(), honest_run.clone());
        async move {
            let mut c = as_key(&url, Some(&honest)).await;
            let s = c
                .watch_experiment(pb::WatchExperimentRequest { run_id, after_seq })
                .await
                .unwrap()
                .into_inner();
            tokio::time::timeout(
                Duration::from_secs(10),
                s.map(|e| e.unwrap().seq).collect::<Vec<_>>(),
            )
            .await
            .expect("a finished run's watch ends")
        }
    };
    let all_seqs = replay(0).await;
    assert!(all_seqs.len() > 4, "{all_seqs:?}");
    assert!(all_seqs.windows(2).all(|w| w[0] < w[1]), "{all_seqs:?}");
    let mid = all_seqs[all_seqs.len() / 2];
    let rest = replay(mid).await;
    assert_eq!(rest, all_seqs[all_seqs.len() / 2 + 1..].to_vec());

    // the process is alive, its peak memory bounded
    assert_ne!(all.state(), Some('Z'));
    assert!(all.state().is_some(), "the serving process is gone");
    let peak = vm_hwm(all.pid());
    eprintln!(
        "serving process peak RSS {:.0} MiB (bound {} MiB); {:.1} s",
        peak as f64 / (1 << 20) as f64,
        PEAK_RSS_BOUND >> 20,
        t0.elapsed().as_secs_f64()
    );
    assert!(peak < PEAK_RSS_BOUND, "peak RSS {peak} bytes");
    drop(all);
    pg.drop_db().await;
}

/// A valid safetensors file with one small tensor (the card is refused
/// before the weights matter).
fn safetensors_stub() -> Vec<u8> {
    let header = br#"{"conv1.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(&0f32.to_le_bytes());
    b
}
