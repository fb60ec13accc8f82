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
use deadbolt_store::model::sha256_hex;

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
