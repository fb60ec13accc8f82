//! Uploads over real gRPC (separate processes, Postgres, S3 on loopback,
//! team API keys): team A uploads a dataset folder (MNIST IDX files cut
//! from the real digits) and a trigger image with `deadbolt upload`, and a
//! run that names them as `upload:<name>` succeeds. Team B cannot use
//! them; a wrong sha256, a wrong size, a file over the limit, a hostile
//! name or a read-only key store nothing.

mod common;

use std::time::Duration;

use common::upload::sha256_hex;
use common::*;
use deadbolt_proto::v1 as pb;
use deadbolt_test_support::specs::mnist_dir;
use tonic::Code;

const LIMIT: u64 = 2_000_000;

/// A dataset upload's header claiming `sha256` and `size`.
fn header(name: &str, file: &str, sha256: String, size: u64) -> pb::UploadHeader {
    pb::UploadHeader {
        sha256,
        size,
        ..upload::header(pb::UploadKind::Dataset, name, file, &[])
    }
}

fn chunks(h: pb::UploadHeader, body: &[u8]) -> impl futures::Stream<Item = pb::UploadChunk> {
    futures::stream::iter(upload::messages(h, body, 100_000))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_data_and_triggers_feed_a_run_of_their_team_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pg = Pg::fresh().await;
    let moto = Moto::shared();
    let bucket = format!("up-{}", uuid::Uuid::new_v4().simple());
    moto.create_bucket(&bucket);
    let work = d.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let cfg_text = config_with(
        pg.url(),
        &format!("s3://{bucket}/a"),
        &work,
        3.0,
        "keys",
        &format!("[limits]\nmax_upload_bytes = {LIMIT}\n{}", moto.config()),
    );
    let (all, cfg) = serve_all(d, &cfg_text);
    let url = all.url("gateway");
    admin(&cfg, &["team-create", "team-a"]);
    admin(&cfg, &["team-create", "team-b"]);
    let a = team_key(&cfg, "team-a", "a", "submit,read");
    let a_read = team_key(&cfg, "team-a", "a-read", "read");
    let b = team_key(&cfg, "team-b", "b", "submit,read");

    // a dataset folder and a trigger image, uploaded with the CLI
    let digits = d.join("digits");
    std::fs::create_dir_all(&digits).unwrap();
    let m = mnist_dir();
    std::fs::write(
        digits.join("train-images-idx3-ubyte"),
        cut_idx(&m.join("train-images-idx3-ubyte"), 16, 784, 1200),
    )
    .unwrap();
    std::fs::write(
        digits.join("train-labels-idx1-ubyte"),
        cut_idx(&m.join("train-labels-idx1-ubyte"), 8, 1, 1200),
    )
    .unwrap();
    std::fs::write(
        digits.join("t10k-images-idx3-ubyte"),
        cut_idx(&m.join("t10k-images-idx3-ubyte"), 16, 784, 300),
    )
    .unwrap();
    std::fs::write(
        digits.join("t10k-labels-idx1-ubyte"),
        cut_idx(&m.join("t10k-labels-idx1-ubyte"), 8, 1, 300),
    )
    .unwrap();
    let mark = d.join("mark.png");
    image::GrayImage::from_fn(3, 3, |x, y| {
        image::Luma([if (x + y) % 2 == 0 { 255 } else { 0 }])
    })
    .save(&mark)
    .unwrap();
    let upload_cli = |kind: &str, name: &str, files: Vec<std::path::PathBuf>| {
        let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        let mut args = vec!["upload", kind, name];
        args.extend(files.iter().map(String::as_str));
        args.extend(["--gateway", &url]);
        cli_as(Some(&a), &args)
    };
    let files: Vec<_> = std::fs::read_dir(&digits)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let printed = upload_cli("dataset", "digits", files);
    assert_eq!(printed.matches("upload:digits").count(), 4, "{printed}");
    let printed = upload_cli("trigger", "mark", vec![mark.clone()]);
    let sha = sha256_hex(&std::fs::read(&mark).unwrap());
    assert!(
        printed.contains("upload:mark") && printed.contains(&sha),
        "{printed}"
    );

    // a run of team A on its uploads
    let spec = std::fs::read_to_string(tiny_spec(d, 1, 1200))
        .unwrap()
        .replace("path = \"mnist\"", "path = \"upload:digits\"")
        .replace(
            "size = 3",
            "size = 3\npattern = { image = \"upload:mark\" }",
        );
    let submit = |id: &str, spec: &str| pb::SubmitExperimentRequest {
        client_request_id: id.into(),
        spec: Some(pb::submit_experiment_request::Spec::SpecToml(
            spec.to_string(),
        )),
    };
    let mut ca = as_key(&url, Some(&a)).await;
    let run_id = ca
        .submit_experiment(submit("up-1", &spec))
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let (events, run) = watch(&mut ca, &run_id, Duration::from_secs(300)).await;
    assert_succeeded(&run, &format!("{events:#?}\n{}", all.log_tail()));
    let log = all.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("upload fetched") && l.contains("teams/team-a/datasets/")),
        "no dataset upload fetched in the log"
    );

    // team B: the same names are not its uploads (the answer of a name
    // nobody uploaded)
    let e = as_key(&url, Some(&b))
        .await
        .submit_experiment(submit("up-b", &spec))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let fields = field_of(&e);
    assert!(
        fields.contains(&"spec.dataset.path".to_string())
            && fields.contains(&"spec.attack.trigger.pattern".to_string()),
        "{fields:?} {e:?}"
    );
    assert!(!e.message().contains("team-a"), "{e:?}");

    // refused uploads store nothing
    let body = std::fs::read(digits.join("t10k-labels-idx1-ubyte")).unwrap();
    let good_sha = sha256_hex(&body);
    let n = body.len() as u64;
    let big = vec![7u8; LIMIT as usize + 1];
    let big_sha = sha256_hex(&big);
    let cases: Vec<(&str, pb::UploadHeader, &[u8], &str)> = vec![
        (
            "bad-sha",
            header("bad", "f", "0".repeat(64), n),
            &body,
            "header.sha256",
        ),
        (
            "short",
            header("bad", "f", good_sha.clone(), n + 1),
            &body,
            "header.size",
        ),
        (
            "long",
            header("bad", "f", good_sha.clone(), n - 1),
            &body,
            "header.size",
        ),
        (
            "over limit",
            header("bad", "f", big_sha, LIMIT + 1),
            &big,
            "header.size",
        ),
        (
            "name",
            header("../bad", "f", good_sha.clone(), n),
            &body,
            "header.name",
        ),
        (
            "file",
            header("bad", "a/../b", good_sha.clone(), n),
            &body,
            "header.file",
        ),
        (
            // an image folder has one level of class folders
            "deep file",
            header("bad", "a/b/c.png", good_sha.clone(), n),
            &body,
            "header.file",
        ),
        (
            "sha format",
            header("bad", "f", "xyz".into(), n),
            &body,
            "header.sha256",
        ),
    ];
    for (what, h, bytes, field) in cases {
        let e = ca.upload(chunks(h, bytes)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(field_of(&e).contains(&field.to_string()), "{what}: {e:?}");
    }
    let e = as_key(&url, Some(&a_read))
        .await
        .upload(chunks(header("bad", "f", good_sha.clone(), n), &body))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // nothing named `bad` exists for a spec to use
    let e = ca
        .submit_experiment(submit(
            "up-bad",
            &spec.replace("upload:digits", "upload:bad"),
        ))
        .await
        .unwrap_err();
    assert!(
        field_of(&e).contains(&"spec.dataset.path".to_string()),
        "{e:?}"
    );
    // ... and no staging object was left behind
    let store =
        deadbolt_store::ArtifactStore::from_url_with(&format!("s3://{bucket}/a"), &moto.options())
            .unwrap();
    let staged: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(
        store
            .object_store()
            .list(Some(&object_store_path("a/staging"))),
    )
    .await
    .unwrap();
    assert!(staged.is_empty(), "{staged:?}");
}

fn object_store_path(p: &str) -> object_store::path::Path {
    object_store::path::Path::from(p)
}
