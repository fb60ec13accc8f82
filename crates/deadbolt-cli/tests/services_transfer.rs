//! Downloads and uploads through the gateway over real gRPC (one `deadbolt
//! serve` process, SQLite, a local artifact store, team API keys):
//! - `deadbolt report` of a finished tiny run with no storage settings at
//!   all (the Download RPC), every file checked against its sha256; an
//!   artifact in chunks of at most 1 MiB; another team's run, or a missing
//!   one, is NOT_FOUND for the RPC and the CLI alike.
//! - upload quotas per team (bytes, files: RESOURCE_EXHAUSTED naming the
//!   quota), a re-upload replaces (no orphaned object), `deadbolt uploads
//!   list|delete` (delete needs the submit scope), a CLI re-upload of a
//!   folder drops the files it no longer has.
//! - an upload slower than the fixed request timeout but within its
//!   size-scaled deadline is stored; one past its deadline is
//!   DEADLINE_EXCEEDED; one whose client goes away midway leaves no object
//!   or staging file and charges nothing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::upload::{header, messages, paced, sha256_hex as sha};
use common::*;
use deadbolt_proto::v1 as pb;
use futures::StreamExt;
use tonic::Code;

const QUOTA_BYTES: u64 = 4_000_000;
const QUOTA_FILES: u64 = 3;
/// The gateway's fixed request timeout in this test.
const REQUEST_TIMEOUT_S: f64 = 2.0;

fn body(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

async fn upload(
    c: &mut Keyed,
    h: pb::UploadHeader,
    b: &[u8],
) -> Result<pb::UploadResponse, tonic::Status> {
    c.upload(futures::stream::iter(messages(h, b, 256 << 10)))
        .await
        .map(|r| r.into_inner())
}

async fn usage(c: &mut Keyed) -> pb::ListUploadsResponse {
    c.list_uploads(pb::ListUploadsRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Every file under `dir` (relative paths), sorted; none when it is missing.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_and_uploads_go_through_the_gateway_team_scoped() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = format!("sqlite://{}", d.join("meta.db").display());
    let art = d.join("artifacts");
    let work = d.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let cfg_text = config_with(
        &db,
        &art.display().to_string(),
        &work,
        3.0,
        "keys",
        &format!(
            "request_timeout_secs = {REQUEST_TIMEOUT_S:?}\n[limits]\nmax_upload_bytes_per_team = {QUOTA_BYTES}\nmax_uploads_per_team = {QUOTA_FILES}\n"
        ),
    );
    let (all, cfg) = serve_all(d, &cfg_text);
    let url = all.url("gateway");
    admin(&cfg, &["team-create", "team-a"]);
    admin(&cfg, &["team-create", "team-b"]);
    let a = team_key(&cfg, "team-a", "a", "submit,read");
    let a_read = team_key(&cfg, "team-a", "a-read", "read");
    let b = team_key(&cfg, "team-b", "b", "submit,read");
    let mut ca = as_key(&url, Some(&a)).await;
    let mut ca_read = as_key(&url, Some(&a_read)).await;
    let mut cb = as_key(&url, Some(&b)).await;

    // ---- a finished tiny run of team A ----
    let spec = std::fs::read_to_string(tiny_spec(d, 1, 600)).unwrap();
    let run_id = ca
        .submit_experiment(pb::SubmitExperimentRequest {
            client_request_id: "dl-1".into(),
            spec: Some(pb::submit_experiment_request::Spec::SpecToml(spec)),
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;

    // ---- meanwhile, uploads: quotas, replacement, list, delete ----
    use pb::UploadKind::{Dataset, TriggerImage};
    let f1 = body(1_000_000, 1);
    upload(&mut ca, header(Dataset, "d", "f1", &f1), &f1)
        .await
        .unwrap();
    // the same name again: replaced, not added
    let f1b = body(1_200_000, 2);
    upload(&mut ca, header(Dataset, "d", "f1", &f1b), &f1b)
        .await
        .unwrap();
    let u = usage(&mut ca).await;
    assert_eq!((u.used_bytes, u.used_files), (1_200_000, 1), "{u:?}");
    assert_eq!((u.max_bytes, u.max_files), (QUOTA_BYTES, QUOTA_FILES));
    let d_dir = art.join("teams/team-a/datasets/d");
    assert_eq!(files_under(&d_dir), vec!["f1", "f1.sha256"]);
    assert_eq!(std::fs::read(d_dir.join("f1")).unwrap(), f1b);
    assert_eq!(
        std::fs::read_to_string(d_dir.join("f1.sha256")).unwrap(),
        sha(&f1b)
    );
    let f2 = body(1_500_000, 3);
    upload(&mut ca, header(Dataset, "d", "f2", &f2), &f2)
        .await
        .unwrap();
    // over the bytes quota (4.2 MB)
    let f3 = body(1_500_000, 4);
    let e = upload(&mut ca, header(Dataset, "d", "f3", &f3), &f3)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_upload_bytes_per_team"), "{e:?}");
    let f3 = body(1_000_000, 5);
    upload(&mut ca, header(Dataset, "d", "f3", &f3), &f3)
        .await
        .unwrap();
    // over the files quota (4 files)
    let img = body(10, 6);
    let e = upload(&mut ca, header(TriggerImage, "mark", "", &img), &img)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_uploads_per_team"), "{e:?}");
    // the CLI lists them with the quota
    let listed = cli_as(Some(&a), &["uploads", "list", "--gateway", &url]);
    assert!(listed.contains("dataset d 3 3700000"), "{listed}");
    assert!(
        listed.contains("quota: 3700000 of 4000000 bytes, 3 of 3 files"),
        "{listed}"
    );
    // team B has a quota of its own and sees none of A's uploads
    assert_eq!(usage(&mut cb).await.used_files, 0);
    let e = cb
        .delete_upload(pb::DeleteUploadRequest {
            kind: Dataset as i32,
            name: "d".into(),
            file: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // deleting needs the submit scope
    let e = ca_read
        .delete_upload(pb::DeleteUploadRequest {
            kind: Dataset as i32,
            name: "d".into(),
            file: "f3".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let out = cli_as(
        Some(&a),
        &[
            "uploads",
            "delete",
            "dataset",
            "d",
            "--file",
            "f3",
            "--gateway",
            &url,
        ],
    );
    assert!(out.contains("deleted 1 files, 1000000 bytes"), "{out}");
    // the trigger fits now
    upload(&mut ca, header(TriggerImage, "mark", "", &img), &img)
        .await
        .unwrap();
    // a CLI re-upload of the folder without f2 drops f2
    let folder = d.join("folder");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("f1"), &f1).unwrap();
    cli_as(
        Some(&a),
        &[
            "upload",
            "dataset",
            "d",
            &folder.display().to_string(),
            "--gateway",
            &url,
        ],
    );
    assert_eq!(files_under(&d_dir), vec!["f1", "f1.sha256"]);
    assert_eq!(std::fs::read(d_dir.join("f1")).unwrap(), f1);
    let u = usage(&mut ca).await;
    assert_eq!((u.used_bytes, u.used_files), (1_000_010, 2), "{u:?}");

    // ---- deadlines (team B): slower than the fixed timeout, within the
    // size-scaled one (2 s + 3 s for 3 MiB) ----
    let slow = body(3 << 20, 7);
    let t = Instant::now();
    cb.upload(paced(
        header(Dataset, "slow", "s", &slow),
        &slow,
        256 << 10,
        Duration::from_millis(250),
    ))
    .await
    .unwrap();
    assert!(
        t.elapsed().as_secs_f64() > REQUEST_TIMEOUT_S,
        "the slow upload took only {:?}",
        t.elapsed()
    );
    // past its deadline (2 s + 0.1 s for 100 kB): DEADLINE_EXCEEDED, nothing stored
    let late = body(100_000, 8);
    let e = cb
        .upload(paced(
            header(Dataset, "late", "l", &late),
            &late,
            50_000,
            Duration::from_millis(1600),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    // a client that goes away midway: its multipart upload is aborted
    let cut = body(800_000, 9);
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadChunk>(4);
    let msgs =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut cb2 = as_key(&url, Some(&b)).await;
    let call = tokio::spawn(async move { cb2.upload(msgs).await });
    tx.send(pb::UploadChunk {
        header: Some(header(Dataset, "cut", "c", &cut)),
        data: cut[..400_000].to_vec(),
    })
    .await
    .unwrap();
    let staging = art.join("staging");
    wait_for(
        "the cut upload to be staged",
        Duration::from_secs(10),
        || {
            let f = files_under(&staging);
            async move { (!f.is_empty()).then_some(()) }
        },
    )
    .await;
    call.abort();
    drop(tx);
    wait_for(
        "the cut upload's staging file to go",
        Duration::from_secs(10),
        || {
            let f = files_under(&staging);
            async move { f.is_empty().then_some(()) }
        },
    )
    .await;
    let b_dir = art.join("teams/team-b/datasets");
    assert_eq!(
        files_under(&b_dir),
        vec!["slow/s", "slow/s.sha256"],
        "only the upload that finished is stored"
    );
    // nothing charged for the cut or late uploads: 3 MiB + 850 kB fits 4 MB
    let u = usage(&mut cb).await;
    assert_eq!((u.used_bytes, u.used_files), (3 << 20, 1), "{u:?}");
    let fill = body(850_000, 10);
    upload(&mut cb, header(Dataset, "fill", "f", &fill), &fill)
        .await
        .unwrap();

    // ---- the run's report, downloaded with no storage settings ----
    let (events, run) = watch(&mut ca, &run_id, Duration::from_secs(300)).await;
    assert_succeeded(&run, &format!("{events:#?}\n{}", all.log_tail()));
    let mine = d.join("mine");
    let mut report = std::process::Command::new(bin());
    report
        .args(["--quiet", "report", &run_id, "--gateway", &url, "--out"])
        .arg(&mine)
        .env("DEADBOLT_API_KEY", &a)
        // no storage settings reach the CLI
        .env_remove("DEADBOLT_ARTIFACT_URL")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY");
    let out = report.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for a in run
        .artifacts
        .iter()
        .filter(|x| x.name.starts_with("report/"))
    {
        let local = mine.join(a.name.trim_start_matches("report/"));
        if a.name == "report/report.json" || a.name == "report/report.md" {
            // rewritten with paths rebased onto --out: present
            assert!(local.exists(), "{}", local.display());
            continue;
        }
        let r = a.r#ref.as_ref().unwrap();
        assert_eq!(sha(&std::fs::read(&local).unwrap()), r.sha256, "{}", a.name);
    }
    assert!(mine.join("report.md").exists());
    assert!(
        files_under(&mine).iter().all(|f| !f.ends_with(".part")),
        "part files left"
    );

    // the largest artifact over the RPC: chunks of at most 1 MiB, in order
    let big = run
        .artifacts
        .iter()
        .max_by_key(|a| a.r#ref.as_ref().unwrap().size)
        .unwrap();
    let want = big.r#ref.clone().unwrap();
    let mut s = ca_read
        .download(pb::DownloadRequest {
            run_id: run_id.clone(),
            target: Some(pb::download_request::Target::Artifact(big.name.clone())),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let mut chunks = 0;
    while let Some(c) = s.next().await {
        let c = c.unwrap();
        assert_eq!((c.name.as_str(), c.size), (big.name.as_str(), want.size));
        assert_eq!(c.sha256, want.sha256);
        assert_eq!(c.offset, got.len() as u64);
        assert!(c.data.len() <= 1 << 20, "{} bytes", c.data.len());
        got.extend_from_slice(&c.data);
        chunks += 1;
    }
    assert_eq!(got.len() as u64, want.size);
    assert_eq!(sha(&got), want.sha256);
    assert_eq!(
        chunks as u64,
        want.size.div_ceil(1 << 20).max(1),
        "{}",
        big.name
    );

    // ---- another team's run is NOT_FOUND, as a missing one ----
    let ask = |id: &str| pb::DownloadRequest {
        run_id: id.to_string(),
        target: Some(pb::download_request::Target::Report(pb::ReportFiles {
            models: true,
        })),
    };
    let theirs = cb.download(ask(&run_id)).await.err().unwrap();
    let missing_id = uuid::Uuid::new_v4().to_string();
    let missing = cb.download(ask(&missing_id)).await.err().unwrap();
    assert_eq!(theirs.code(), Code::NotFound, "{theirs:?}");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert_eq!(
        theirs.message().replace(&run_id, "ID"),
        missing.message().replace(&missing_id, "ID")
    );
    let e = cb
        .download(pb::DownloadRequest {
            run_id: run_id.clone(),
            target: Some(pb::download_request::Target::Artifact(
                "report/report.json".into(),
            )),
        })
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let stolen = std::process::Command::new(bin())
        .args(["--quiet", "report", &run_id, "--gateway", &url, "--out"])
        .arg(d.join("stolen"))
        .env("DEADBOLT_API_KEY", &b)
        .output()
        .unwrap();
    assert!(!stolen.status.success());
    assert!(
        String::from_utf8_lossy(&stolen.stderr).contains("NotFound"),
        "{}",
        String::from_utf8_lossy(&stolen.stderr)
    );
    assert!(!d.join("stolen/report.json").exists());
    eprintln!("services_transfer: {:.1} s", t0.elapsed().as_secs_f64());
}
