//! The artifact-store suite, run on the local filesystem (a temp dir) and on
//! a real S3-compatible server (`moto_server`, started here on loopback; run
//! scripts/setup-test-deps.sh to install it).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deadbolt_store::*;
use object_store::{ObjectStoreExt, PutPayload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

async fn suite(s: &ArtifactStore) {
    let run = Uuid::new_v4();
    let other = Uuid::new_v4();
    let data = Bytes::from_static(b"safetensors bytes, pretend");

    // Round trip.
    let r = s.put(run, "model.safetensors", data.clone()).await.unwrap();
    assert_eq!(r.key, format!("runs/{run}/model.safetensors"));
    assert!(r.uri.ends_with(&r.key), "{}", r.uri);
    assert_eq!(r.size, data.len() as u64);
    assert_eq!(r.sha256, sha256_hex(&data));
    assert_eq!(s.get(&r).await.unwrap(), data);

    // The record round-trips back into a reference.
    let rec = r.to_record(run, "model.safetensors", None);
    assert_eq!(s.ref_from_record(&rec).unwrap(), r);

    // Overwrite gives a new checksum; nested names and empty objects work.
    let r2 = s
        .put(run, "model.safetensors", Bytes::from_static(b"v2"))
        .await
        .unwrap();
    assert_ne!(r2.sha256, r.sha256);
    assert_eq!(s.get(&r2).await.unwrap(), Bytes::from_static(b"v2"));
    // The old reference no longer matches the stored bytes.
    assert!(matches!(s.get(&r).await, Err(StoreError::Checksum { .. })));
    let e = s
        .put(run, "ckpt/epoch-1.safetensors", Bytes::new())
        .await
        .unwrap();
    assert_eq!(e.size, 0);
    assert_eq!(s.get(&e).await.unwrap(), Bytes::new());
    s.put(other, "model.safetensors", data.clone())
        .await
        .unwrap();

    let listed = s.list(run).await.unwrap();
    let names: Vec<_> = listed.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["ckpt/epoch-1.safetensors", "model.safetensors"]);
    assert_eq!(listed[1].size, 2);
    assert!(s.list(Uuid::new_v4()).await.unwrap().is_empty());

    // Names that could escape the prefix are refused before any write.
    for bad in ["../escape", "/abs", "a//b", "a\\b", "", "a/../../b", "x y"] {
        assert!(
            matches!(
                s.put(run, bad, data.clone()).await,
                Err(StoreError::InvalidKey { .. })
            ),
            "{bad:?}"
        );
    }
    assert_eq!(s.list(run).await.unwrap().len(), 2);
    assert!(matches!(
        s.get_unverified("runs/../../etc/passwd").await,
        Err(StoreError::InvalidKey { .. })
    ));

    // Missing object.
    let missing = ArtifactRef {
        uri: s.uri(&format!("runs/{run}/nope")),
        key: format!("runs/{run}/nope"),
        sha256: r.sha256.clone(),
        size: 1,
    };
    assert!(s.get(&missing).await.unwrap_err().is_not_found());

    // Corruption behind the store's back is caught on read.
    let victim = s
        .put(run, "dataset.bin", Bytes::from_static(b"clean data"))
        .await
        .unwrap();
    s.object_store()
        .put(
            &s.object_path(&victim.key),
            PutPayload::from_static(b"tampered!!"),
        )
        .await
        .unwrap();
    match s.get(&victim).await {
        Err(StoreError::Checksum {
            key,
            expected,
            actual,
        }) => {
            assert_eq!(key, victim.uri);
            assert_eq!(expected, victim.sha256);
            assert_eq!(actual, sha256_hex(b"tampered!!"));
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    assert_eq!(
        s.get_unverified(&victim.key).await.unwrap(),
        Bytes::from_static(b"tampered!!")
    );
}

#[tokio::test]
async fn filesystem_suite() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("artifacts");
    let s = ArtifactStore::from_url(root.to_str().unwrap()).unwrap();
    suite(&s).await;
    // Objects are plain files under the root; no temp files left behind.
    let run_dirs = std::fs::read_dir(root.join("runs")).unwrap().count();
    assert_eq!(run_dirs, 2);
    let url = url::Url::from_directory_path(dir.path().join("via-url")).unwrap();
    let s = ArtifactStore::from_url(url.as_str()).unwrap();
    assert!(s.uri("k").starts_with("file:///"));
    suite(&s).await;
    assert!(ArtifactStore::from_url("gs://bucket").is_err());
}

/// A moto_server child process, killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_moto() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("moto_server"))
            .find(|c| c.is_file())
    });
    on_path.or_else(|| {
        let venv = std::env::var_os("DEADBOLT_VENV")
            .map(PathBuf::from)
            .or_else(|| {
                let cache = std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| {
                        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"))
                    })?;
                Some(cache.join("deadbolt/venv-torch-2.13.0"))
            })?;
        Some(venv.join("bin/moto_server")).filter(|p| p.is_file())
    })
}

async fn http(port: u16, request: &str) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(request.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

async fn start_moto() -> Moto {
    let bin = find_moto().unwrap_or_else(|| {
        panic!(
            "moto_server not found on PATH or in $DEADBOLT_VENV/bin: \
             run scripts/setup-test-deps.sh to install it"
        )
    });
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let moto = Moto { child, port };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let probe =
            format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        if let Ok(resp) = http(port, &probe).await {
            if resp.starts_with("HTTP/1.") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "moto_server did not answer on port {port} within 30s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    moto
}

#[tokio::test]
async fn s3_suite() {
    let moto = start_moto().await;
    let port = moto.port;
    let resp = http(
        port,
        &format!(
            "PUT /deadbolt-test HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
    .await
    .unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
    let opts = S3Options {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        allow_http: Some(true),
        region: Some("us-east-1".into()),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
    };
    let s = ArtifactStore::from_url_with("s3://deadbolt-test/prefix/a", &opts).unwrap();
    assert!(s.uri("k").starts_with("s3://deadbolt-test/prefix/a/"));
    suite(&s).await;

    // The checksum is also stored as object metadata.
    let run = Uuid::new_v4();
    let r = s
        .put(run, "m.bin", Bytes::from_static(b"abc"))
        .await
        .unwrap();
    let got = s.object_store().get(&s.object_path(&r.key)).await.unwrap();
    let sha = got
        .attributes
        .get(&object_store::Attribute::Metadata("sha256".into()))
        .map(|v| v.as_ref().to_string());
    assert_eq!(sha.as_deref(), Some(r.sha256.as_str()));
    // Everything lives under the prefix.
    assert!(r.uri.starts_with("s3://deadbolt-test/prefix/a/runs/"));
    drop(moto);
}
