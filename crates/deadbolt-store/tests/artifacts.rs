//! The artifact-store suite. [`artifact_test_suite!`] expands every case into
//! one test per backend (`filesystem::<case>`, `filesystem_url::<case>`,
//! `s3::<case>`), each on a fresh store: a new temp dir, or a new bucket on a
//! `moto_server` on loopback (shared by the tests running at the same time;
//! run scripts/setup-test-deps.sh to install it).

use std::sync::Arc;

use bytes::Bytes;
use deadbolt_store::*;
use deadbolt_test_support::s3::Moto;
use object_store::{ObjectStoreExt, PutPayload};
use uuid::Uuid;

const DATA: &[u8] = b"safetensors bytes, pretend";

async fn round_trip(s: ArtifactStore) {
    let run = Uuid::new_v4();
    let data = Bytes::from_static(DATA);
    let r = s.put(run, "model.safetensors", data.clone()).await.unwrap();
    assert_eq!(r.key, format!("runs/{run}/model.safetensors"));
    assert!(r.uri.ends_with(&r.key), "{}", r.uri);
    assert_eq!(r.size, data.len() as u64);
    assert_eq!(r.sha256, sha256_hex(&data));
    assert_eq!(s.get(&r).await.unwrap(), data);
    // The record round-trips back into a reference.
    let rec = r.to_record(run, "model.safetensors", None);
    assert_eq!(s.ref_from_record(&rec).unwrap(), r);
}

async fn overwrite_changes_the_checksum(s: ArtifactStore) {
    let run = Uuid::new_v4();
    let r = s
        .put(run, "model.safetensors", Bytes::from_static(DATA))
        .await
        .unwrap();
    let r2 = s
        .put(run, "model.safetensors", Bytes::from_static(b"v2"))
        .await
        .unwrap();
    assert_ne!(r2.sha256, r.sha256);
    assert_eq!(s.get(&r2).await.unwrap(), Bytes::from_static(b"v2"));
    // The old reference no longer matches the stored bytes.
    assert!(matches!(s.get(&r).await, Err(StoreError::Checksum { .. })));
    // Nested names and empty objects work.
    let e = s
        .put(run, "ckpt/epoch-1.safetensors", Bytes::new())
        .await
        .unwrap();
    assert_eq!(e.size, 0);
    assert_eq!(s.get(&e).await.unwrap(), Bytes::new());
}

async fn lists_one_run(s: ArtifactStore) {
    let (run, other) = (Uuid::new_v4(), Uuid::new_v4());
    s.put(run, "model.safetensors", Bytes::from_static(b"v2"))
        .await
        .unwrap();
    s.put(run, "ckpt/epoch-1.safetensors", Bytes::new())
        .await
        .unwrap();
    s.put(other, "model.safetensors", Bytes::from_static(DATA))
        .await
        .unwrap();
    let listed = s.list(run).await.unwrap();
    let names: Vec<_> = listed.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["ckpt/epoch-1.safetensors", "model.safetensors"]);
    assert_eq!(listed[1].size, 2);
    assert!(s.list(Uuid::new_v4()).await.unwrap().is_empty());
}

async fn names_cannot_escape(s: ArtifactStore) {
    // Names that could escape the prefix are refused before any write.
    let run = Uuid::new_v4();
    for bad in ["../escape", "/abs", "a//b", "a\\b", "", "a/../../b", "x y"] {
        assert!(
            matches!(
                s.put(run, bad, Bytes::from_static(DATA)).await,
                Err(StoreError::InvalidKey { .. })
            ),
            "{bad:?}"
        );
    }
    assert!(s.list(run).await.unwrap().is_empty());
    assert!(matches!(
        s.get_unverified("runs/../../etc/passwd").await,
        Err(StoreError::InvalidKey { .. })
    ));
}

async fn missing_object_is_not_found(s: ArtifactStore) {
    let run = Uuid::new_v4();
    let missing = ArtifactRef {
        uri: s.uri(&format!("runs/{run}/nope")),
        key: format!("runs/{run}/nope"),
        sha256: sha256_hex(DATA),
        size: 1,
    };
    assert!(s.get(&missing).await.unwrap_err().is_not_found());
}

async fn corruption_is_caught_on_read(s: ArtifactStore) {
    // Bytes changed behind the store's back.
    let run = Uuid::new_v4();
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

async fn delete_removes_the_object(s: ArtifactStore) {
    let run = Uuid::new_v4();
    let r = s
        .put(run, "ckpt/epoch-1.safetensors", Bytes::from_static(DATA))
        .await
        .unwrap();
    let kept = s
        .put(run, "ckpt/epoch-2.safetensors", Bytes::from_static(b"v2"))
        .await
        .unwrap();
    s.delete(&r).await.unwrap();
    assert!(s.get(&r).await.unwrap_err().is_not_found());
    let names: Vec<_> = s
        .list(run)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["ckpt/epoch-2.safetensors"]);
    assert_eq!(s.get(&kept).await.unwrap(), Bytes::from_static(b"v2"));
    // A missing object is fine (a repeated or interrupted delete).
    s.delete(&r).await.unwrap();
    // A reference that escapes the store's keys deletes nothing.
    let mut bad = kept.clone();
    bad.key = format!("runs/{run}/../../etc/passwd");
    assert!(matches!(
        s.delete(&bad).await,
        Err(StoreError::InvalidKey { .. })
    ));
    bad.key = "elsewhere/x".into();
    assert!(matches!(
        s.delete(&bad).await,
        Err(StoreError::InvalidKey { .. })
    ));
    assert_eq!(s.get(&kept).await.unwrap(), Bytes::from_static(b"v2"));
}

/// Expands every case into one `#[tokio::test]` per backend: a module per
/// backend, a test per case, each on a fresh [`Fixture`].
macro_rules! artifact_test_suite {
    (backends: [$($backend:ident),* $(,)?], cases: $cases:tt $(,)?) => {
        $( artifact_test_suite!(@backend $backend, $cases); )*
    };
    (@backend $backend:ident, [$($case:ident),* $(,)?]) => {
        mod $backend {
            $(
                #[tokio::test]
                async fn $case() {
                    let fixture = super::Fixture::$backend();
                    super::$case(fixture.store.clone()).await;
                }
            )*
        }
    };
}

artifact_test_suite!(
    backends: [filesystem, filesystem_url, s3],
    cases: [
        round_trip,
        overwrite_changes_the_checksum,
        lists_one_run,
        names_cannot_escape,
        missing_object_is_not_found,
        corruption_is_caught_on_read,
        delete_removes_the_object,
    ],
);

/// A fresh artifact store of one backend, and what has to live as long as it.
struct Fixture {
    store: ArtifactStore,
    _dir: Option<tempfile::TempDir>,
    _moto: Option<Arc<Moto>>,
}

impl Fixture {
    /// A plain path.
    fn filesystem() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("artifacts");
        let store = ArtifactStore::from_url(root.to_str().unwrap()).unwrap();
        Fixture {
            store,
            _dir: Some(dir),
            _moto: None,
        }
    }

    /// A file:// URL.
    fn filesystem_url() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = url::Url::from_directory_path(dir.path().join("via-url")).unwrap();
        let store = ArtifactStore::from_url(url.as_str()).unwrap();
        assert!(store.uri("k").starts_with("file:///"));
        Fixture {
            store,
            _dir: Some(dir),
            _moto: None,
        }
    }

    /// A new bucket, under a prefix.
    fn s3() -> Self {
        let moto = Moto::shared();
        let bucket = format!("test-{}", Uuid::new_v4().simple());
        moto.create_bucket(&bucket);
        let store =
            ArtifactStore::from_url_with(&format!("s3://{bucket}/prefix/a"), &moto.options())
                .unwrap();
        assert!(store
            .uri("k")
            .starts_with(&format!("s3://{bucket}/prefix/a/")));
        Fixture {
            store,
            _dir: None,
            _moto: Some(moto),
        }
    }
}

#[tokio::test]
async fn filesystem_objects_are_plain_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("artifacts");
    let s = ArtifactStore::from_url(root.to_str().unwrap()).unwrap();
    let (run, other) = (Uuid::new_v4(), Uuid::new_v4());
    s.put(run, "ckpt/epoch-1.safetensors", Bytes::from_static(DATA))
        .await
        .unwrap();
    s.put(other, "model.safetensors", Bytes::new())
        .await
        .unwrap();
    // Objects are plain files under the root; no temp files left behind.
    assert_eq!(std::fs::read_dir(root.join("runs")).unwrap().count(), 2);
    let ckpt = root.join(format!("runs/{run}/ckpt"));
    let files: Vec<_> = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, ["epoch-1.safetensors"]);
    assert_eq!(
        std::fs::read(ckpt.join("epoch-1.safetensors")).unwrap(),
        DATA
    );
}

#[test]
fn unsupported_urls_are_rejected() {
    assert!(ArtifactStore::from_url("gs://bucket").is_err());
}

#[tokio::test]
async fn s3_stores_the_checksum_as_metadata() {
    let fixture = Fixture::s3();
    let s = &fixture.store;
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
    assert!(r.uri.contains("/prefix/a/runs/"), "{}", r.uri);
}
