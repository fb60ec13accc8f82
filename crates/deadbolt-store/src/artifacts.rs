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

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
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
use crate::records::{sha256_hex, ArtifactRecord};

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
        (Some("teams"), Some(team)) => crate::records::validate_team_name(team).is_ok(),
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

    /// Opens the object of `r` for a streaming read ([`ArtifactReader`]):
    /// memory stays at about one chunk whatever the object's size, and its
    /// size and sha256 are checked against the reference as it is read
    /// (StoreError::Checksum naming the object when they differ).
    pub async fn open(&self, r: &ArtifactRef) -> Result<ArtifactReader> {
        validate_key(&r.key)?;
        let stream = match self.store.get(&self.object_path(&r.key)).await {
            Ok(g) => g.into_stream(),
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::not_found("artifact", self.uri(&r.key)))
            }
            Err(e) => return Err(e.into()),
        };
        Ok(ArtifactReader {
            stream,
            buf: BytesMut::new(),
            hasher: Sha256::new(),
            read: 0,
            r: r.clone(),
            ended: false,
            checked: false,
        })
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
    /// `ArtifactRepo::delete_artifact`). A missing object is Ok, so a
    /// repeated or interrupted delete can be run again.
    pub async fn delete(&self, r: &ArtifactRef) -> Result<()> {
        self.delete_key(&r.key).await
    }

    /// Deletes the object at `key` (a missing one is Ok).
    pub async fn delete_key(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        match self.store.delete(&self.object_path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                tracing::debug!(key = %key, "deleted artifact");
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
            writer: Some(WriteMultipart::new(upload)),
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

/// A streaming read of an artifact (see [`ArtifactStore::open`]).
pub struct ArtifactReader {
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    buf: BytesMut,
    hasher: Sha256,
    /// Bytes read from the object so far.
    read: u64,
    r: ArtifactRef,
    /// The object's stream ended.
    ended: bool,
    /// Its size and sha256 were checked.
    checked: bool,
}

impl ArtifactReader {
    /// The reference being read.
    pub fn artifact(&self) -> &ArtifactRef {
        &self.r
    }

    /// The next at most `max` (> 0) bytes; None once the whole object was
    /// returned and its size and sha256 matched the reference. An object
    /// longer than its reference stops being read at the first byte past
    /// it. A mismatch is StoreError::Checksum (the bytes already returned
    /// are not to be trusted).
    pub async fn next_chunk(&mut self, max: usize) -> Result<Option<Bytes>> {
        let max = max.max(1);
        loop {
            if self.buf.len() >= max || (self.ended && !self.buf.is_empty()) {
                let n = max.min(self.buf.len());
                return Ok(Some(self.buf.split_to(n).freeze()));
            }
            if self.ended {
                if !self.checked {
                    self.checked = true;
                    self.check(true)?;
                }
                return Ok(None);
            }
            match self.stream.next().await {
                Some(Ok(b)) => {
                    self.hasher.update(&b);
                    self.read += b.len() as u64;
                    metrics::counter!("deadbolt_artifact_bytes_total", "direction" => "in")
                        .increment(b.len() as u64);
                    self.check(false)?;
                    self.buf.extend_from_slice(&b);
                }
                Some(Err(e)) => return Err(e.into()),
                None => self.ended = true,
            }
        }
    }

    /// Checks the size (while reading: not above the reference's) and, at
    /// the end, the sha256.
    fn check(&mut self, at_end: bool) -> Result<()> {
        let size_bad = if at_end {
            self.read != self.r.size
        } else {
            self.read > self.r.size
        };
        if !size_bad && !at_end {
            return Ok(());
        }
        let actual = if size_bad {
            format!("{} bytes (recorded: {})", self.read, self.r.size)
        } else {
            hex::encode(self.hasher.clone().finalize())
        };
        if size_bad || !actual.eq_ignore_ascii_case(&self.r.sha256) {
            self.ended = true;
            self.checked = true;
            self.buf.clear();
            metrics::counter!("deadbolt_artifact_checksum_failures_total").increment(1);
            tracing::error!(uri = %self.r.uri, expected = %self.r.sha256, actual = %actual, "artifact checksum mismatch");
            return Err(StoreError::Checksum {
                key: self.r.uri.clone(),
                expected: self.r.sha256.clone(),
                actual,
            });
        }
        Ok(())
    }
}

/// An upload in progress (see [`ArtifactStore::start_upload`]). Dropped
/// before [`UploadWriter::finish`] (the client went away, the handler was
/// cancelled), it aborts its multipart upload and deletes its staging
/// object in the background: nothing partial is left behind.
pub struct UploadWriter {
    store: Arc<dyn ObjectStore>,
    /// None once finished or aborted.
    writer: Option<WriteMultipart>,
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

    fn writer(&mut self) -> Result<&mut WriteMultipart> {
        self.writer.as_mut().ok_or(StoreError::Invalid {
            field: "upload",
            message: "the upload already ended".into(),
        })
    }

    /// Appends a chunk (waits while too many parts are in flight).
    pub async fn write(&mut self, chunk: Bytes) -> Result<()> {
        self.writer()?.wait_for_capacity(4).await?;
        self.hasher.update(&chunk);
        self.size += chunk.len() as u64;
        self.writer()?.put(chunk);
        Ok(())
    }

    /// Drops what was written; nothing is stored.
    pub async fn abort(mut self) {
        if let Some(w) = self.writer.take() {
            abort_staged(
                self.store.clone(),
                w,
                self.staging.clone(),
                self.key.clone(),
            )
            .await;
        }
    }

    /// Completes the upload when it is `size` bytes hashing to `sha256`
    /// (lowercase hex): moves it to its key and stores the checksum beside
    /// it (`<key>.sha256`), replacing an object already there. Otherwise
    /// deletes it and answers Invalid naming `size` or `sha256`.
    pub async fn finish(mut self, size: u64, sha256: &str) -> Result<ArtifactRef> {
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
        let writer = self.writer.take().ok_or(StoreError::Invalid {
            field: "upload",
            message: "the upload already ended".into(),
        })?;
        // a failed completion aborts the multipart upload itself
        writer.finish().await?;
        let sidecar = ObjectPath::from(format!("{}.sha256", self.final_path));
        // an upload that replaces another reads as absent from here until
        // its own checksum is stored: never the new bytes with the old
        // checksum
        match self.store.delete(&sidecar).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                let _ = self.store.delete(&self.staging).await;
                return Err(e.into());
            }
        }
        if let Err(e) = self.store.rename(&self.staging, &self.final_path).await {
            let _ = self.store.delete(&self.staging).await;
            return Err(e.into());
        }
        // the checksum last: it is the commit marker (an upload counts as
        // present only with it), so a crash between the two leaves an
        // object that a retried upload overwrites, never one that is used
        // unchecked
        self.store
            .put(&sidecar, PutPayload::from(Bytes::from(actual.clone())))
            .await?;
        metrics::counter!("deadbolt_artifact_bytes_total", "direction" => "out")
            .increment(self.size);
        tracing::info!(key = %self.key, size = self.size, sha256 = %actual, "upload stored");
        Ok(ArtifactRef {
            uri: std::mem::take(&mut self.uri),
            key: std::mem::take(&mut self.key),
            sha256: actual,
            size: self.size,
        })
    }
}

/// Aborts a multipart upload into `staging` and deletes what it left.
async fn abort_staged(
    store: Arc<dyn ObjectStore>,
    writer: WriteMultipart,
    staging: ObjectPath,
    key: String,
) {
    if let Err(e) = writer.abort().await {
        tracing::warn!(key = %key, error = %e, "aborting an upload");
    }
    let _ = store.delete(&staging).await;
}

impl Drop for UploadWriter {
    fn drop(&mut self) {
        let Some(w) = self.writer.take() else {
            return;
        };
        tracing::info!(key = %self.key, size = self.size, "upload abandoned; aborting it");
        let job = abort_staged(
            self.store.clone(),
            w,
            self.staging.clone(),
            self.key.clone(),
        );
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn(job)),
            Err(_) => {
                tracing::warn!(key = %self.key, "an upload dropped outside a runtime was not aborted")
            }
        }
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

    #[tokio::test]
    async fn a_streamed_read_comes_in_bounded_chunks_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let s = ArtifactStore::local(dir.path()).unwrap();
        let id = Uuid::new_v4();
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let r = s
            .put(id, "big.bin", Bytes::from(body.clone()))
            .await
            .unwrap();
        let mut rd = s.open(&r).await.unwrap();
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        while let Some(c) = rd.next_chunk(30_000).await.unwrap() {
            sizes.push(c.len());
            got.extend_from_slice(&c);
        }
        assert_eq!(got, body);
        assert_eq!(sizes, vec![30_000, 30_000, 30_000, 10_000]);
        assert!(rd.next_chunk(30_000).await.unwrap().is_none());

        // an empty artifact: no chunk, checked
        let e = s.put(id, "empty.bin", Bytes::new()).await.unwrap();
        assert!(s
            .open(&e)
            .await
            .unwrap()
            .next_chunk(10)
            .await
            .unwrap()
            .is_none());

        // a changed object, a longer one, a shorter one: Checksum
        let path = dir.path().join(&r.key);
        let drain = |r: ArtifactRef| {
            let s = s.clone();
            async move {
                let mut rd = s.open(&r).await?;
                while rd.next_chunk(4096).await?.is_some() {}
                Ok::<_, StoreError>(())
            }
        };
        let mut changed = body.clone();
        changed[77_777] ^= 1;
        std::fs::write(&path, &changed).unwrap();
        assert!(matches!(
            drain(r.clone()).await,
            Err(StoreError::Checksum { .. })
        ));
        let mut longer = body.clone();
        longer.extend_from_slice(&[0; 10]);
        std::fs::write(&path, &longer).unwrap();
        assert!(matches!(
            drain(r.clone()).await,
            Err(StoreError::Checksum { .. })
        ));
        std::fs::write(&path, &body[..99_999]).unwrap();
        assert!(matches!(
            drain(r.clone()).await,
            Err(StoreError::Checksum { .. })
        ));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(s.open(&r).await, Err(StoreError::NotFound { .. })));
    }

    /// An object store that counts the aborts of its multipart uploads.
    #[derive(Debug)]
    struct CountAborts {
        inner: object_store::memory::InMemory,
        aborts: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl std::fmt::Display for CountAborts {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "CountAborts")
        }
    }

    #[derive(Debug)]
    struct Counted {
        inner: Box<dyn object_store::MultipartUpload>,
        aborts: Arc<std::sync::atomic::AtomicUsize>,
    }

    #[async_trait::async_trait]
    impl object_store::MultipartUpload for Counted {
        fn put_part(&mut self, data: PutPayload) -> object_store::UploadPart {
            self.inner.put_part(data)
        }
        async fn complete(&mut self) -> object_store::Result<object_store::PutResult> {
            self.inner.complete().await
        }
        async fn abort(&mut self) -> object_store::Result<()> {
            self.aborts
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.abort().await
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for CountAborts {
        async fn put_opts(
            &self,
            location: &ObjectPath,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &ObjectPath,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            let inner = self.inner.put_multipart_opts(location, opts).await?;
            Ok(Box::new(Counted {
                inner,
                aborts: self.aborts.clone(),
            }))
        }
        async fn get_opts(
            &self,
            location: &ObjectPath,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<ObjectPath>>,
        ) -> BoxStream<'static, object_store::Result<ObjectPath>> {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &ObjectPath,
            to: &ObjectPath,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    #[tokio::test]
    async fn a_dropped_upload_aborts_its_multipart_upload() {
        let aborts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let s = ArtifactStore::new(
            Arc::new(CountAborts {
                inner: object_store::memory::InMemory::new(),
                aborts: aborts.clone(),
            }),
            "p",
            "mem://p",
            false,
        );
        let key = "teams/t/datasets/d/f.bin";
        // dropped midway (a client that went away)
        let mut w = s.start_upload(key).await.unwrap();
        w.write(Bytes::from(vec![1u8; 6 << 20])).await.unwrap();
        drop(w);
        let count = || aborts.load(std::sync::atomic::Ordering::SeqCst);
        for _ in 0..200 {
            if count() == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(count(), 1, "the dropped upload was not aborted");
        let all: Vec<_> = s.object_store().list(None).try_collect().await.unwrap();
        assert!(all.is_empty(), "{all:?}");

        // a finished one is not aborted, and a second upload of the key
        // replaces it (object and checksum), leaving no staging object
        for body in [&b"first"[..], b"second!"] {
            let mut w = s.start_upload(key).await.unwrap();
            w.write(Bytes::copy_from_slice(body)).await.unwrap();
            w.finish(body.len() as u64, &sha256_hex(body))
                .await
                .unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(count(), 1);
        let all: Vec<String> = s
            .object_store()
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(&s.get_unverified(key).await.unwrap()[..], b"second!");
        assert_eq!(
            s.get_unverified(&format!("{key}.sha256")).await.unwrap(),
            Bytes::from(sha256_hex(b"second!"))
        );
        // an explicit abort counts once too
        let w = s.start_upload(key).await.unwrap();
        w.abort().await;
        assert_eq!(count(), 2);
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
