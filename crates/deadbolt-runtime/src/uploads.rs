//! Files clients upload (datasets, trigger images): where they live in
//! object storage, and how a job gets them back.
//!
//! A team's uploads live under `teams/<team>/datasets/<name>/<file>` and
//! `teams/<team>/triggers/<name>`, each with its sha256 beside it
//! (`<key>.sha256`, written once the upload's size and checksum were
//! checked). A remote spec names one as `upload:<name>`; the gateway
//! replaces that by `object:<location>` under the submitting team's prefix
//! ([`crate::policy::resolve_remote_paths`]), so a spec can never reach
//! another team's files, and a job downloads and verifies the objects into
//! its work folder before it reads them ([`materialize`]).

use std::path::{Path, PathBuf};

use deadbolt_spec::{BlendPattern, ExperimentSpec, PatchPattern, TriggerSpec};
use deadbolt_store::artifacts::ArtifactStore;
use deadbolt_store::sha256_hex;

use crate::error::JobError;

/// How a spec names an upload.
pub const UPLOAD_SCHEME: &str = "upload:";
/// How a resolved spec names an object-storage location (only the gateway
/// writes these).
pub const OBJECT_SCHEME: &str = "object:";
/// The checksum object beside each upload.
pub const SHA_SUFFIX: &str = ".sha256";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadKind {
    Dataset,
    TriggerImage,
    /// A model folder: its weights (`model.safetensors`) and card.
    Model,
}

/// An upload a spec uses.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadUse {
    /// The spec field that names it.
    pub field: &'static str,
    pub name: String,
    pub kind: UploadKind,
    /// `object:<key or key prefix>`.
    pub location: String,
}

/// An upload or file name: 1 to 64 characters of `[a-z0-9._-]`, not
/// starting with a dot, not ending in `.sha256`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > 64 || !ok_chars || name.starts_with('.') {
        return Err(format!(
            "{name:?} is not an upload name (1 to 64 characters of a-z, 0-9, '.', '_', '-', not starting with '.')"
        ));
    }
    if name.ends_with(SHA_SUFFIX) {
        return Err(format!(
            "{name:?}: names ending in {SHA_SUFFIX} are reserved"
        ));
    }
    Ok(())
}

/// A file of a dataset upload: `FILE`, or `CLASS/FILE` for an image
/// folder (torchvision's `ImageFolder` layout: one folder level), each part
/// an upload name ([`check_name`]).
pub fn check_file(file: &str) -> Result<(), String> {
    let parts: Vec<&str> = file.split('/').collect();
    if parts.len() > 2 {
        return Err(format!(
            "{file:?}: a dataset file is FILE or CLASS/FILE (one folder level)"
        ));
    }
    parts.iter().try_for_each(|p| check_name(p))
}

/// The object key (trigger image) or key prefix (dataset) of an upload.
pub fn key(team: &str, kind: UploadKind, name: &str) -> String {
    match kind {
        UploadKind::Dataset => format!("teams/{team}/datasets/{name}"),
        UploadKind::TriggerImage => format!("teams/{team}/triggers/{name}"),
        UploadKind::Model => format!("teams/{team}/models/{name}"),
    }
}

/// `object:<key>`: what a resolved spec holds.
pub fn location(team: &str, kind: UploadKind, name: &str) -> String {
    format!("{OBJECT_SCHEME}{}", key(team, kind, name))
}

/// Whether the upload exists (a dataset: at least one stored file).
pub async fn exists(
    artifacts: &ArtifactStore,
    team: &str,
    kind: UploadKind,
    name: &str,
) -> Result<bool, deadbolt_store::StoreError> {
    let k = key(team, kind, name);
    match kind {
        UploadKind::Dataset | UploadKind::Model => Ok(artifacts
            .list_prefix(&k)
            .await?
            .iter()
            .any(|(f, _)| f.ends_with(SHA_SUFFIX))),
        UploadKind::TriggerImage => artifacts.exists(&format!("{k}{SHA_SUFFIX}")).await,
    }
}

/// Where a team's uploads live: `teams/<team>`.
pub fn team_prefix(team: &str) -> String {
    format!("teams/{team}")
}

/// One stored upload of a team.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredUpload {
    pub kind: UploadKind,
    pub name: String,
    /// Its files (empty name for a trigger image) and their sizes, sorted.
    pub files: Vec<(String, u64)>,
}

impl StoredUpload {
    pub fn size(&self) -> u64 {
        self.files.iter().map(|(_, n)| n).sum()
    }
}

/// What a team's uploads hold: every stored file but the checksums
/// (an object whose checksum was not written yet still takes space).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub files: u64,
}

/// The uploads of `team`, by kind then name, from one listing of its
/// prefix; with what they hold.
pub async fn list(
    artifacts: &ArtifactStore,
    team: &str,
) -> Result<(Vec<StoredUpload>, Usage), deadbolt_store::StoreError> {
    let mut objects = Vec::new();
    for sub in ["datasets", "models", "triggers"] {
        let dir = format!("{}/{sub}", team_prefix(team));
        for (rel, n) in artifacts.list_prefix(&dir).await? {
            objects.push((format!("{sub}/{rel}"), n));
        }
    }
    Ok(group(&objects))
}

/// Groups the objects under a team's prefix (keys relative to it) into
/// uploads. Checksums count neither as files nor as bytes; unknown keys
/// (none are written) count in the usage only.
fn group(objects: &[(String, u64)]) -> (Vec<StoredUpload>, Usage) {
    let mut usage = Usage::default();
    let mut out: Vec<StoredUpload> = Vec::new();
    for (rel, size) in objects {
        if rel.ends_with(SHA_SUFFIX) {
            continue;
        }
        usage.bytes += size;
        usage.files += 1;
        let (kind, rest) = match rel.split_once('/') {
            Some(("datasets", r)) => (UploadKind::Dataset, r),
            Some(("models", r)) => (UploadKind::Model, r),
            Some(("triggers", r)) => (UploadKind::TriggerImage, r),
            _ => continue,
        };
        let (name, file) = match kind {
            UploadKind::TriggerImage => (rest, ""),
            _ => match rest.split_once('/') {
                Some(p) => p,
                None => continue,
            },
        };
        match out.iter_mut().find(|u| u.kind == kind && u.name == name) {
            Some(u) => u.files.push((file.to_string(), *size)),
            None => out.push(StoredUpload {
                kind,
                name: name.to_string(),
                files: vec![(file.to_string(), *size)],
            }),
        }
    }
    let order = |k: UploadKind| match k {
        UploadKind::Dataset => 0,
        UploadKind::Model => 1,
        UploadKind::TriggerImage => 2,
    };
    out.sort_by(|a, b| (order(a.kind), &a.name).cmp(&(order(b.kind), &b.name)));
    for u in &mut out {
        u.files.sort();
    }
    (out, usage)
}

/// Checks that storing `size` bytes as one file, replacing a stored file of
/// `replaced` bytes (None: a new file), keeps a team that holds `used`
/// (plus `pending`: its uploads in flight) within `max_bytes` and
/// `max_files`. The error names the quota.
pub fn check_quota(
    used: Usage,
    pending: Usage,
    replaced: Option<u64>,
    size: u64,
    max_bytes: u64,
    max_files: u64,
) -> Result<(), String> {
    let bytes = (used.bytes + pending.bytes)
        .saturating_sub(replaced.unwrap_or(0))
        .saturating_add(size);
    let files = used.files + pending.files + u64::from(replaced.is_none());
    if bytes > max_bytes {
        return Err(format!(
            "max_upload_bytes_per_team: this upload would bring the team's uploads to {bytes} bytes, above its quota of {max_bytes} (it holds {}{}; delete uploads with `deadbolt uploads delete`)",
            used.bytes,
            if pending.bytes > 0 { format!(", {} more arriving", pending.bytes) } else { String::new() }
        ));
    }
    if files > max_files {
        return Err(format!(
            "max_uploads_per_team: this upload would bring the team's uploads to {files} files, above its quota of {max_files} (delete uploads with `deadbolt uploads delete`)"
        ));
    }
    Ok(())
}

/// Deletes an upload of `team` (all its files, or the one named `file`),
/// checksums first (the commit markers: a half-deleted upload reads as
/// missing, never as complete). Returns the files and bytes deleted;
/// (0, 0) when there was nothing.
pub async fn delete(
    artifacts: &ArtifactStore,
    team: &str,
    kind: UploadKind,
    name: &str,
    file: Option<&str>,
) -> Result<Usage, deadbolt_store::StoreError> {
    let base = key(team, kind, name);
    let objects: Vec<(String, u64)> = match (kind, file) {
        (UploadKind::TriggerImage, _) => {
            // the image and its checksum, not another name sharing a prefix
            let dir = team_prefix(team) + "/triggers";
            artifacts
                .list_prefix(&dir)
                .await?
                .into_iter()
                .filter(|(f, _)| f == name || *f == format!("{name}{SHA_SUFFIX}"))
                .map(|(f, n)| (format!("{dir}/{f}"), n))
                .collect()
        }
        (_, Some(file)) => artifacts
            .list_prefix(&base)
            .await?
            .into_iter()
            .filter(|(f, _)| f == file || *f == format!("{file}{SHA_SUFFIX}"))
            .map(|(f, n)| (format!("{base}/{f}"), n))
            .collect(),
        (_, None) => artifacts
            .list_prefix(&base)
            .await?
            .into_iter()
            .map(|(f, n)| (format!("{base}/{f}"), n))
            .collect(),
    };
    let (sums, data): (Vec<_>, Vec<_>) = objects.iter().partition(|(k, _)| k.ends_with(SHA_SUFFIX));
    for (k, _) in &sums {
        artifacts.delete_key(k).await?;
    }
    let mut gone = Usage::default();
    for (k, n) in &data {
        artifacts.delete_key(k).await?;
        gone.files += 1;
        gone.bytes += n;
    }
    if gone.files > 0 {
        tracing::info!(team = %team, upload = %base, file = file.unwrap_or(""), files = gone.files, bytes = gone.bytes, "upload deleted");
    }
    Ok(gone)
}

fn data_loss(message: String) -> JobError {
    JobError::permanent(tonic::Code::DataLoss, message)
}

/// Downloads one object, checking it against its stored sha256.
async fn fetch_verified(artifacts: &ArtifactStore, key: &str, dest: &Path) -> Result<(), JobError> {
    let want = artifacts
        .get_unverified(&format!("{key}{SHA_SUFFIX}"))
        .await?;
    let want = String::from_utf8_lossy(&want).trim().to_string();
    let bytes = artifacts.get_unverified(key).await?;
    let got = sha256_hex(&bytes);
    if !got.eq_ignore_ascii_case(&want) {
        return Err(data_loss(format!(
            "upload {key}: sha256 {got} differs from the {want} stored at upload"
        )));
    }
    tokio::fs::write(dest, &bytes)
        .await
        .map_err(|e| JobError::transient(format!("writing {}: {e}", dest.display())))
}

/// The trigger's pattern image of the spec's attack, if it has one.
pub fn trigger_image_mut(spec: &mut ExperimentSpec) -> Option<&mut PathBuf> {
    match &mut spec.attack.as_mut()?.trigger {
        TriggerSpec::Patch {
            pattern: PatchPattern::Image(p),
            ..
        }
        | TriggerSpec::Blend {
            pattern: BlendPattern::Image(p),
            ..
        } => Some(p),
        _ => None,
    }
}

/// Downloads every file of the folder upload at `location`
/// (`object:<prefix>` or the prefix itself) into `local`, keeping an image
/// folder's class folders, each file checked against its stored sha256 (a
/// mismatch is DATA_LOSS, no file NOT_FOUND).
pub async fn fetch_folder(
    artifacts: &ArtifactStore,
    location: &str,
    local: &Path,
) -> Result<(), JobError> {
    let prefix = location.strip_prefix(OBJECT_SCHEME).unwrap_or(location);
    std::fs::create_dir_all(local)
        .map_err(|e| JobError::transient(format!("creating {}: {e}", local.display())))?;
    let files = artifacts.list_prefix(prefix).await?;
    let mut n = 0;
    for (file, _) in files.iter().filter(|(f, _)| f.ends_with(SHA_SUFFIX)) {
        let file = file.trim_end_matches(SHA_SUFFIX);
        check_file(file).map_err(data_loss)?;
        let dest = local.join(file);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| JobError::transient(format!("creating {}: {e}", parent.display())))?;
        }
        fetch_verified(artifacts, &format!("{prefix}/{file}"), &dest).await?;
        n += 1;
    }
    if n == 0 {
        return Err(JobError::permanent(
            tonic::Code::NotFound,
            format!("upload {prefix} holds no files"),
        ));
    }
    tracing::info!(location = %prefix, files = n, "upload fetched");
    Ok(())
}

/// Replaces `object:` locations in `spec` (its dataset folder, its trigger
/// image) by local copies under `dir`, each checked against the sha256
/// stored at upload (a mismatch is DATA_LOSS).
pub async fn materialize(
    artifacts: &ArtifactStore,
    spec: &mut ExperimentSpec,
    dir: &Path,
) -> Result<(), JobError> {
    let mkdir = |d: &Path| {
        std::fs::create_dir_all(d)
            .map_err(|e| JobError::transient(format!("creating {}: {e}", d.display())))
    };
    if let Some(p) = &spec.dataset.path {
        if let Some(prefix) = p.to_str().and_then(|s| s.strip_prefix(OBJECT_SCHEME)) {
            let local = dir.join("dataset");
            fetch_folder(artifacts, prefix, &local).await?;
            spec.dataset.path = Some(local);
        }
    }
    if let Some(p) = trigger_image_mut(spec) {
        if let Some(key) = p.to_str().and_then(|s| s.strip_prefix(OBJECT_SCHEME)) {
            let key = key.to_string();
            mkdir(dir)?;
            let local = dir.join("trigger.png");
            fetch_verified(artifacts, &key, &local).await?;
            *p = local;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in [
            "digits",
            "t10k-images-idx3-ubyte",
            "data_batch_1.bin",
            "a.png",
        ] {
            check_name(good).unwrap();
        }
        for bad in [
            "",
            ".hidden",
            "../x",
            "a/b",
            "A",
            "x.sha256",
            &"a".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            location("team-a", UploadKind::Dataset, "digits"),
            "object:teams/team-a/datasets/digits"
        );
        for good in ["a.png", "3/a.png", "cat/img_001.jpg"] {
            check_file(good).unwrap();
        }
        for bad in [
            "a/b/c.png",
            "../a.png",
            "a/../b",
            "/a.png",
            "a/",
            "Cat/a.png",
        ] {
            assert!(check_file(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn quotas_count_bytes_and_files_and_a_replaced_file_is_freed() {
        let used = Usage {
            bytes: 900,
            files: 3,
        };
        let none = Usage::default();
        check_quota(used, none, None, 100, 1000, 4).unwrap();
        let e = check_quota(used, none, None, 101, 1000, 4).unwrap_err();
        assert!(e.starts_with("max_upload_bytes_per_team"), "{e}");
        // replacing a 300-byte file by a 400-byte one
        check_quota(used, none, Some(300), 400, 1000, 3).unwrap();
        let e = check_quota(used, none, None, 1, 1000, 3).unwrap_err();
        assert!(e.starts_with("max_uploads_per_team"), "{e}");
        // uploads in flight count
        let pending = Usage {
            bytes: 50,
            files: 1,
        };
        assert!(check_quota(used, pending, None, 100, 1000, 9).is_err());
        // unbounded (the embedded services)
        check_quota(used, pending, None, u64::MAX, u64::MAX, u64::MAX).unwrap();
    }

    #[test]
    fn a_teams_objects_group_into_uploads() {
        let objects: Vec<(String, u64)> = [
            ("datasets/digits/a", 10),
            ("datasets/digits/a.sha256", 64),
            ("datasets/digits/b", 5),
            ("datasets/faces/0/x.png", 7),
            ("datasets/faces/0/x.png.sha256", 64),
            ("models/net/model.safetensors", 100),
            ("models/net/model.safetensors.sha256", 64),
            ("triggers/mark", 3),
            ("triggers/mark.sha256", 64),
        ]
        .iter()
        .map(|(k, n)| (k.to_string(), *n))
        .collect();
        let (ups, usage) = group(&objects);
        assert_eq!(
            usage,
            Usage {
                bytes: 125,
                files: 5
            }
        );
        let names: Vec<(UploadKind, &str, u64)> = ups
            .iter()
            .map(|u| (u.kind, u.name.as_str(), u.size()))
            .collect();
        assert_eq!(
            names,
            vec![
                (UploadKind::Dataset, "digits", 15),
                (UploadKind::Dataset, "faces", 7),
                (UploadKind::Model, "net", 100),
                (UploadKind::TriggerImage, "mark", 3),
            ]
        );
        assert_eq!(ups[1].files, vec![("0/x.png".to_string(), 7)]);
        assert_eq!(ups[3].files, vec![(String::new(), 3)]);
    }

    #[tokio::test]
    async fn deleting_an_upload_takes_its_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let art = ArtifactStore::local(&dir.path().join("store")).unwrap();
        let put = |key: String, body: &'static [u8]| {
            let art = art.clone();
            async move {
                let body = bytes::Bytes::from_static(body);
                let mut w = art.start_upload(&key).await.unwrap();
                w.write(body.clone()).await.unwrap();
                w.finish(body.len() as u64, &sha256_hex(&body))
                    .await
                    .unwrap();
            }
        };
        let d = key("t", UploadKind::Dataset, "d");
        put(format!("{d}/a"), b"aaaa").await;
        put(format!("{d}/b"), b"bb").await;
        put(key("t", UploadKind::TriggerImage, "m"), b"m").await;
        put(key("t", UploadKind::TriggerImage, "m2"), b"mm").await;
        put(key("u", UploadKind::Dataset, "d") + "/a", b"other team").await;
        // a re-upload replaces: still one file of its new size
        put(format!("{d}/b"), b"bbb").await;
        let (ups, usage) = list(&art, "t").await.unwrap();
        assert_eq!(
            usage,
            Usage {
                bytes: 10,
                files: 4
            }
        );
        assert_eq!(ups.len(), 3);

        let gone = delete(&art, "t", UploadKind::Dataset, "d", Some("a"))
            .await
            .unwrap();
        assert_eq!(gone, Usage { bytes: 4, files: 1 });
        assert!(exists(&art, "t", UploadKind::Dataset, "d").await.unwrap());
        let gone = delete(&art, "t", UploadKind::TriggerImage, "m", None)
            .await
            .unwrap();
        assert_eq!(gone, Usage { bytes: 1, files: 1 });
        assert!(exists(&art, "t", UploadKind::TriggerImage, "m2")
            .await
            .unwrap());
        let gone = delete(&art, "t", UploadKind::Dataset, "d", None)
            .await
            .unwrap();
        assert_eq!(gone, Usage { bytes: 3, files: 1 });
        assert!(!exists(&art, "t", UploadKind::Dataset, "d").await.unwrap());
        // nothing left to delete; the other team's upload is untouched
        let gone = delete(&art, "t", UploadKind::Dataset, "d", None)
            .await
            .unwrap();
        assert_eq!(gone, Usage::default());
        assert!(exists(&art, "u", UploadKind::Dataset, "d").await.unwrap());
        let (_, usage) = list(&art, "t").await.unwrap();
        assert_eq!(usage, Usage { bytes: 2, files: 1 });
    }

    #[tokio::test]
    async fn an_image_folder_upload_keeps_its_class_folders() {
        let dir = tempfile::tempdir().unwrap();
        let art = ArtifactStore::local(&dir.path().join("store")).unwrap();
        let k = key("t", UploadKind::Dataset, "faces");
        for (f, body) in [
            ("0/a.png", &b"zero"[..]),
            ("1/b.png", b"one"),
            ("1/c.png", b"one!"),
        ] {
            let body = bytes::Bytes::copy_from_slice(body);
            let mut w = art.start_upload(&format!("{k}/{f}")).await.unwrap();
            w.write(body.clone()).await.unwrap();
            w.finish(body.len() as u64, &sha256_hex(&body))
                .await
                .unwrap();
        }
        let local = dir.path().join("local");
        fetch_folder(&art, &location("t", UploadKind::Dataset, "faces"), &local)
            .await
            .unwrap();
        assert_eq!(std::fs::read(local.join("0/a.png")).unwrap(), b"zero");
        assert_eq!(std::fs::read(local.join("1/c.png")).unwrap(), b"one!");
        assert_eq!(std::fs::read_dir(local.join("1")).unwrap().count(), 2);
    }

    #[tokio::test]
    async fn a_tampered_upload_is_data_loss() {
        let dir = tempfile::tempdir().unwrap();
        let art = ArtifactStore::local(&dir.path().join("store")).unwrap();
        let k = key("t", UploadKind::Dataset, "d");
        let body = bytes::Bytes::from_static(b"0123456789");
        let mut w = art.start_upload(&format!("{k}/f.bin")).await.unwrap();
        w.write(body.clone()).await.unwrap();
        w.finish(10, &sha256_hex(&body)).await.unwrap();
        assert!(exists(&art, "t", UploadKind::Dataset, "d").await.unwrap());
        assert!(!exists(&art, "u", UploadKind::Dataset, "d").await.unwrap());

        let mut spec: ExperimentSpec = toml::from_str(&format!(
            "[dataset]\nkind = \"mnist\"\npath = \"{}\"\n",
            location("t", UploadKind::Dataset, "d")
        ))
        .unwrap();
        let work = dir.path().join("work");
        materialize(&art, &mut spec, &work).await.unwrap();
        let local = spec.dataset.path.clone().unwrap();
        assert_eq!(std::fs::read(local.join("f.bin")).unwrap(), b"0123456789");

        // the object changes behind the store's back
        std::fs::write(
            dir.path().join("store").join(&k).join("f.bin"),
            b"0123456780",
        )
        .unwrap();
        let mut spec2: ExperimentSpec = toml::from_str(&format!(
            "[dataset]\nkind = \"mnist\"\npath = \"{}\"\n",
            location("t", UploadKind::Dataset, "d")
        ))
        .unwrap();
        let e = materialize(&art, &mut spec2, &work).await.unwrap_err();
        assert!(format!("{e:?}").contains("DataLoss"), "{e:?}");

        // a wrong declared checksum or size stores nothing
        let mut w = art.start_upload(&format!("{k}/g.bin")).await.unwrap();
        w.write(body.clone()).await.unwrap();
        let e = w.finish(10, &"0".repeat(64)).await.unwrap_err();
        assert!(e.to_string().contains("sha256"), "{e}");
        let mut w = art.start_upload(&format!("{k}/g.bin")).await.unwrap();
        w.write(body.clone()).await.unwrap();
        let e = w.finish(11, &sha256_hex(&body)).await.unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
        let files = art.list_prefix(&k).await.unwrap();
        assert!(
            files.iter().all(|(f, _)| f.starts_with("f.bin")),
            "{files:?}"
        );
        let staging = dir.path().join("store/staging");
        assert!(
            !staging.exists() || std::fs::read_dir(&staging).unwrap().next().is_none(),
            "staging objects left behind"
        );
    }
}
