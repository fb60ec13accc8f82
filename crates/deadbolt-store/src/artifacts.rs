//! Artifacts (datasets, checkpoints, heatmaps, reports) in object storage,
//! with content checksums.
//!
//! Keys are `runs/<run_id>/<name>` under the store's prefix. Names are
//! validated so they can never escape that prefix. Every `put` is a single
//! `ObjectStore::put`, which is atomic on both backends used here:
//! `LocalFileSystem` writes a temporary file and renames it into place, and
//! S3 `PutObject` makes an object visible only once it is complete. No
//! multipart uploads are used, so no partial object is ever visible.
//!
//! The sha256 returned in [`ArtifactRef`] is the source of truth (callers
//! record it in the metadata store); on S3 it is also stored as the object
//! metadata `sha256` for humans and other tools. [`ArtifactStore::get`]
//! verifies it on every read.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, AttributeValue, Attributes, ObjectStore, ObjectStoreExt, PutOptions, PutPayload,
    WriteMultipart,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{Result, StoreError};
use crate::model::{sha256_hex, ArtifactRecord};

/// Where an artifact lives and what its bytes hash to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    /// Absolute URI (`file:///...` or `s3://bucket/...`).
    pub uri: String,
    /// Key relative to the store's prefix: `runs/<run_id>/<name>`.
    pub key: String,
    /// Lowercase hex sha256 of the content.
    pub sha256: String,
    pub size: u64,
}

impl ArtifactRef {
    /// The metadata-store record of this artifact.
    pub fn to_record(
        &self,
        run_id: Uuid,
        name: &str,
        content_type: Option<String>,
    ) -> ArtifactRecord {
        ArtifactRecord {
            run_id,
            name: name.to_string(),
            uri: self.uri.clone(),
            sha256: self.sha256.clone(),
            size: self.size,
            content_type,
        }
    }
}

/// An object listed under a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactEntry {
    pub name: String,
    pub key: String,
    pub uri: String,
    pub size: u64,
}

/// Explicit S3 settings; anything left `None` comes from the environment
/// (AWS_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
/// AWS_ALLOW_HTTP).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub allow_http: Option<bool>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

/// Object storage for artifacts: an `ObjectStore` plus a key prefix.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// URI of the prefix, without a trailing slash.
    base_uri: String,
    /// Whether the backend stores object attributes (S3 does; the local
    /// filesystem does not).
    attributes: bool,
}

const MAX_NAME_LEN: usize = 512;

/// Checks an artifact name: non-empty relative path of `[A-Za-z0-9._-]`
/// segments separated by `/`, with no empty, `.` or `..` segments.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(StoreError::InvalidKey {
            key: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty name");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("name longer than 512 bytes");
    }
    if name.starts_with('/') {
        return bad("absolute path");
    }
    if name.contains('\\') {
        return bad("backslash");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
    {
        let _ = c;
        return bad("only A-Z, a-z, 0-9, '.', '_', '-' and '/' are allowed");
    }
    for seg in name.split('/') {
        match seg {
            "" => return bad("empty path segment"),
            "." | ".." => return bad("'.' or '..' path segment"),
            _ => {}
        }
    }
    Ok(())
}

/// `runs/<run_id>/<name>`, after validating `name`.
pub fn artifact_key(run_id: Uuid, name: &str) -> Result<String> {
    validate_name(name)?;
    Ok(format!("runs/{run_id}/{name}"))
}

/// Keys are `runs/<run_id>/<name>` (a run's artifacts) or
/// `teams/<team>/<name>` (a team's uploads), the name validated.
fn validate_key(key: &str) -> Result<()> {
    let mut parts = key.splitn(3, '/');
    let ok = match (parts.next(), parts.next()) {
        (Some("runs"), Some(id)) => Uuid::parse_str(id).is_ok(),
        (Some("teams"), Some(team)) => crate::model::validate_team_name(team).is_ok(),
        _ => false,
    };
    if !ok {
        return Err(StoreError::InvalidKey {
            key: key.to_string(),
            reason: "keys look like runs/<run_id>/<name> or teams/<team>/<name>",
        });
    }
    validate_name(parts.next().unwrap_or(""))
}

impl ArtifactStore {
    /// Wraps any object store. `prefix` is prepended to every key and
    /// `base_uri` is the URI of that prefix (used to build artifact URIs).
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        base_uri: &str,
        attributes: bool,
    ) -> Self {
        Self {
            store,
            prefix: prefix.trim_matches('/').to_string(),
            base_uri: base_uri.trim_end_matches('/').to_string(),
            attributes,
        }
    }

    /// Builds the store from a URL: a plain path or `file:///abs/path`
    /// (created when missing) or `s3://bucket/prefix` (settings from the
    /// environment).
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_url_with(url, &S3Options::default())
    }

    /// Like [`ArtifactStore::from_url`], with explicit S3 settings that win
    /// over the environment.
    pub fn from_url_with(url: &str, s3: &S3Options) -> Result<Self> {
        let invalid = |reason: String| StoreError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(invalid("s3 url needs a bucket (s3://bucket/prefix)".into()));
            }
            let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
            if let Some(e) = &s3.endpoint {
                b = b.with_endpoint(e);
            }
            if let Some(h) = s3.allow_http {
                b = b.with_allow_http(h);
            }
            if let Some(r) = &s3.region {
                b = b.with_region(r);
            }
            if let Some(k) = &s3.access_key_id {
                b = b.with_access_key_id(k);
            }
            if let Some(k) = &s3.secret_access_key {
                b = b.with_secret_access_key(k);
            }
            let store = b.build()?;
            let prefix = prefix.trim_matches('/');
            let base = if prefix.is_empty() {
                format!("s3://{bucket}")
            } else {
                format!("s3://{bucket}/{prefix}")
            };
            tracing::info!(uri = %base, "s3 artifact store");
            return Ok(Self::new(Arc::new(store), prefix, &base, true));
        }
        let dir = if url.starts_with("file://") {
            url::Url::parse(url)
                .ok()
                .and_then(|u| u.to_file_path().ok())
                .ok_or_else(|| invalid("file url must be file:///absolute/path".into()))?
        } else if url.contains("://") {
            return Err(invalid(
                "expected a path, file:///path or s3://bucket/prefix".into(),
            ));
        } else {
            std::path::PathBuf::from(url)
        };
        Self::local(&dir)
    }

    /// A store on the local filesystem rooted at `dir` (created when missing).
    pub fn local(dir: &std::path::Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::InvalidUrl {
            url: dir.display().to_string(),
            reason: format!("cannot create the directory: {e}"),
        })?;
        let dir = dir.canonicalize().map_err(|e| StoreError::InvalidUrl {
            url: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let store = LocalFileSystem::new_with_prefix(&dir)?;
        let base = url::Url::from_directory_path(&dir)
            .map(|u| u.to_string())
            .unwrap_or_else(|_| format!("file://{}", dir.display()));
        tracing::info!(uri = %base, "local artifact store");
        Ok(Self::new(Arc::new(store), "", &base, false))
    }

    /// The underlying object store (tests use it to tamper with objects).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// The full object path of a key (the prefix included).
    pub fn object_path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// The URI of a key.
    pub fn uri(&self, key: &str) -> String {
        format!("{}/{key}", self.base_uri)
    }

    /// The key of a URI produced by this store (InvalidKey otherwise).
    pub fn key_from_uri(&self, uri: &str) -> Result<String> {
        let key = uri
            .strip_prefix(&self.base_uri)
            .and_then(|k| k.strip_prefix('/'))
            .ok_or_else(|| StoreError::InvalidKey {
                key: uri.to_string(),
                reason: "uri is not under this artifact store",
            })?;
        validate_key(key)?;
        Ok(key.to_string())
    }

    /// A reference from a recorded artifact (uri + checksum).
    pub fn ref_from_record(&self, rec: &ArtifactRecord) -> Result<ArtifactRef> {
        Ok(ArtifactRef {
            key: self.key_from_uri(&rec.uri)?,
            uri: rec.uri.clone(),
            sha256: rec.sha256.clone(),
            size: rec.size,
        })
    }

    /// Stores `bytes` as `runs/<run_id>/<name>` atomically and returns its
    /// reference with the sha256 of the content.
    pub async fn put(&self, run_id: Uuid, name: &str, bytes: Bytes) -> Result<ArtifactRef> {
        let key = artifact_key(run_id, name)?;
        let sha256 = sha256_hex(&bytes);
        let size = bytes.len() as u64;
        let mut opts = PutOptions::default();
        if self.attributes {
            let mut attrs = Attributes::new();
            attrs.insert(
                Attribute::Metadata("sha256".into()),
                AttributeValue::from(sha256.clone()),
            );
            opts.attributes = attrs;
        }
        self.store
            .put_opts(&self.object_path(&key), PutPayload::from(bytes), opts)
            .await?;
        metrics::counter!("deadbolt_artifact_bytes_total", "direction" => "out").increment(size);
        tracing::debug!(key = %key, size, sha256 = %sha256, "stored artifact");
        Ok(ArtifactRef {
            uri: self.uri(&key),
            key,
            sha256,
            size,
        })
    }

    /// Reads the object and checks its sha256 against the reference
    /// (StoreError::Checksum naming the object on mismatch).
    pub async fn get(&self, r: &ArtifactRef) -> Result<Bytes> {
        let bytes = self.get_unverified(&r.key).await?;
        metrics::counter!("deadbolt_artifact_bytes_total", "direction" => "in")
            .increment(bytes.len() as u64);
        let actual = sha256_hex(&bytes);
        if !actual.eq_ignore_ascii_case(&r.sha256) {
            metrics::counter!("deadbolt_artifact_checksum_failures_total").increment(1);
            tracing::error!(uri = %r.uri, expected = %r.sha256, actual = %actual, "artifact checksum mismatch");
            return Err(StoreError::Checksum {
                key: r.uri.clone(),
                expected: r.sha256.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Reads the object at `key` without checking its content.
    pub async fn get_unverified(&self, key: &str) -> Result<Bytes> {
        validate_key(key)?;
        let path = self.object_path(key);
        match self.store.get(&path).await {
            Ok(r) => Ok(r.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => {
                Err(StoreError::not_found("artifact", self.uri(key)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the object of `r` (after the metadata record is gone, see
    /// `MetadataStore::delete_artifact`). A missing object is Ok, so a
    /// repeated or interrupted delete can be run again.
    pub async fn delete(&self, r: &ArtifactRef) -> Result<()> {
        validate_key(&r.key)?;
        match self.store.delete(&self.object_path(&r.key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                tracing::debug!(key = %r.key, "deleted artifact");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Starts an upload into `key`: the bytes go to a staging object and
    /// reach `key` only in [`UploadWriter::finish`], once their size and
    /// sha256 are what the client declared. Nothing partial or unverified
    /// is ever visible at `key`.
    pub async fn start_upload(&self, key: &str) -> Result<UploadWriter> {
        validate_key(key)?;
        let staging = self.object_path(&format!("staging/{}", Uuid::new_v4()));
        let upload = self.store.put_multipart(&staging).await?;
        Ok(UploadWriter {
            store: self.store.clone(),
            writer: WriteMultipart::new(upload),
            hasher: Sha256::new(),
            size: 0,
            staging,
            key: key.to_string(),
            final_path: self.object_path(key),
            uri: self.uri(key),
        })
    }

    /// The objects under `prefix` (a key prefix, without the trailing
    /// `/`): their keys relative to it and sizes, sorted.
    pub async fn list_prefix(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        validate_key(prefix)?;
        let full = self.object_path(prefix);
        let strip = format!("{full}/");
        let metas: Vec<_> = self.store.list(Some(&full)).try_collect().await?;
        let mut out: Vec<(String, u64)> = metas
            .into_iter()
            .filter_map(|m| {
                let loc = m.location.to_string();
                Some((loc.strip_prefix(&strip)?.to_string(), m.size))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Whether an object exists at `key`.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        validate_key(key)?;
        match self.store.head(&self.object_path(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The objects stored under a run, by name.
    pub async fn list(&self, run_id: Uuid) -> Result<Vec<ArtifactEntry>> {
        let run_prefix = format!("runs/{run_id}");
        let full = self.object_path(&run_prefix);
        let strip = format!("{full}/");
        let metas: Vec<_> = self.store.list(Some(&full)).try_collect().await?;
        let mut out: Vec<ArtifactEntry> = metas
            .into_iter()
            .filter_map(|m| {
                let loc = m.location.to_string();
                let name = loc.strip_prefix(&strip)?.to_string();
                let key = format!("{run_prefix}/{name}");
                Some(ArtifactEntry {
                    uri: self.uri(&key),
                    name,
                    key,
                    size: m.size,
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// An upload in progress (see [`ArtifactStore::start_upload`]).
pub struct UploadWriter {
    store: Arc<dyn ObjectStore>,
    writer: WriteMultipart,
    hasher: Sha256,
    size: u64,
    staging: ObjectPath,
    key: String,
    final_path: ObjectPath,
    uri: String,
}

impl UploadWriter {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a chunk (waits while too many parts are in flight).
    pub async fn write(&mut self, chunk: Bytes) -> Result<()> {
        self.writer.wait_for_capacity(4).await?;
        self.hasher.update(&chunk);
        self.size += chunk.len() as u64;
        self.writer.put(chunk);
        Ok(())
    }

    /// Drops what was written; nothing is stored.
    pub async fn abort(self) {
        if let Err(e) = self.writer.abort().await {
            tracing::warn!(key = %self.key, error = %e, "aborting an upload");
        }
        let _ = self.store.delete(&self.staging).await;
    }

    /// Completes the upload when it is `size` bytes hashing to `sha256`
    /// (lowercase hex): moves it to its key and stores the checksum beside
    /// it (`<key>.sha256`). Otherwise deletes it and answers Invalid naming
    /// `size` or `sha256`.
    pub async fn finish(self, size: u64, sha256: &str) -> Result<ArtifactRef> {
        let actual = hex::encode(self.hasher.clone().finalize());
        if self.size != size {
            let got = self.size;
            self.abort().await;
            return Err(StoreError::Invalid {
                field: "size",
                message: format!("the header declared {size} bytes, {got} arrived"),
            });
        }
        if !actual.eq_ignore_ascii_case(sha256) {
            self.abort().await;
            return Err(StoreError::Invalid {
                field: "sha256",
                message: format!("the header declared {sha256}, the bytes hash to {actual}"),
            });
        }
        self.writer.finish().await?;
        self.store.rename(&self.staging, &self.final_path).await?;
        // the checksum last: it is the commit marker (an upload counts as
        // present only with it), so a crash between the two leaves an
        // object that a retried upload overwrites, never one that is used
        // unchecked
        let sidecar = ObjectPath::from(format!("{}.sha256", self.final_path));
        self.store
            .put(&sidecar, PutPayload::from(Bytes::from(actual.clone())))
            .await?;
        metrics::counter!("deadbolt_artifact_bytes_total", "direction" => "out")
            .increment(self.size);
        tracing::info!(key = %self.key, size = self.size, sha256 = %actual, "upload stored");
        Ok(ArtifactRef {
            uri: self.uri,
            key: self.key,
            sha256: actual,
            size: self.size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_escape_are_rejected() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a/",
            "./a",
            "a\\b",
            "a b",
            "ä",
            "a/./b",
            "..",
        ] {
            assert!(
                matches!(validate_name(bad), Err(StoreError::InvalidKey { .. })),
                "{bad:?} accepted"
            );
        }
        for good in ["model.safetensors", "ckpt/epoch-3.safetensors", "a_b-c.1"] {
            validate_name(good).unwrap();
        }
    }

    #[test]
    fn keys_from_foreign_uris_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let s = ArtifactStore::local(dir.path()).unwrap();
        let id = Uuid::new_v4();
        let key = artifact_key(id, "x.bin").unwrap();
        assert_eq!(s.key_from_uri(&s.uri(&key)).unwrap(), key);
        assert!(s.key_from_uri("s3://other/runs/x").is_err());
        assert!(s
            .key_from_uri(&format!("{}/runs/{id}/../../x", s.base_uri))
            .is_err());
    }
}
