//! `deadbolt upload` and `deadbolt uploads`: files streamed into the
//! gateway's object storage under the caller's team, listed and deleted.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use deadbolt_proto::v1 as pb;

use super::{connect, status_error, Client};

/// Bytes per upload message (the servers decode at most 4 MiB).
const UPLOAD_CHUNK: usize = 1 << 20;

/// The files of a dataset upload and the names they are stored under:
/// a file as its file name; a folder as its files (`FILE`) and the files of
/// its sub-folders (`CLASS/FILE`, an image folder's layout). Deeper
/// folders are refused, naming them.
fn dataset_files(paths: &[PathBuf]) -> Result<Vec<(String, PathBuf)>> {
    fn name_of(p: &Path) -> Result<String> {
        p.file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .with_context(|| format!("{}: not a UTF-8 file name", p.display()))
    }
    fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
        let mut v = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<Vec<_>>>()
            .with_context(|| format!("reading {}", dir.display()))?;
        v.sort();
        Ok(v)
    }
    let mut out = Vec::new();
    for p in paths {
        if !p.is_dir() {
            out.push((name_of(p)?, p.clone()));
            continue;
        }
        for e in entries(p)? {
            if !e.is_dir() {
                out.push((name_of(&e)?, e));
                continue;
            }
            let class = name_of(&e)?;
            for f in entries(&e)? {
                if f.is_dir() {
                    anyhow::bail!(
                        "{}: an image folder has one level of class folders (CLASS/FILE)",
                        f.display()
                    );
                }
                out.push((format!("{class}/{}", name_of(&f)?), f));
            }
        }
    }
    Ok(out)
}

/// Uploads one file as `file_name` (a name, or `CLASS/NAME` in a dataset):
/// its sha256 and size first (one pass over the file), then its bytes in
/// 1 MiB messages (a second pass, streamed).
async fn upload(
    c: &mut Client,
    kind: pb::UploadKind,
    name: &str,
    file_name: &str,
    file: &Path,
) -> Result<pb::UploadResponse> {
    use sha2::Digest;
    use tokio::io::AsyncReadExt;
    let (sha256, size) = {
        let mut f =
            std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let mut h = sha2::Sha256::new();
        let size =
            std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", file.display()))?;
        (hex::encode(h.finalize()), size)
    };
    let header = pb::UploadHeader {
        kind: kind as i32,
        name: name.to_string(),
        file: file_name.to_string(),
        sha256,
        size,
    };
    let f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("opening {}", file.display()))?;
    let chunks = futures::stream::unfold((f, Some(header)), |(mut f, header)| async move {
        let mut buf = vec![0u8; UPLOAD_CHUNK];
        let n = match f.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "reading the upload");
                return None;
            }
        };
        if n == 0 && header.is_none() {
            return None;
        }
        buf.truncate(n);
        Some((pb::UploadChunk { header, data: buf }, (f, None)))
    });
    let r = c
        .upload(chunks)
        .await
        .map_err(status_error)
        .with_context(|| format!("uploading {}", file.display()))?;
    Ok(r.into_inner())
}

/// Makes the upload `name` hold exactly the files `keep` (just uploaded):
/// deletes the files an earlier upload of that name stored that this one
/// lacks, so a re-upload replaces the old one and leaves nothing behind.
async fn prune_upload(
    c: &mut Client,
    kind: pb::UploadKind,
    name: &str,
    keep: &[&str],
) -> Result<()> {
    let listed = c
        .list_uploads(pb::ListUploadsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let Some(u) = listed
        .uploads
        .iter()
        .find(|u| u.kind == kind as i32 && u.name == name)
    else {
        return Ok(());
    };
    for f in u.files.iter().filter(|f| !keep.contains(&f.file.as_str())) {
        c.delete_upload(pb::DeleteUploadRequest {
            kind: kind as i32,
            name: name.to_string(),
            file: f.file.clone(),
        })
        .await
        .map_err(status_error)
        .with_context(|| format!("deleting {} of the earlier upload {name}", f.file))?;
        eprintln!("deleted {} (of the earlier upload {name})", f.file);
    }
    Ok(())
}

/// `deadbolt upload KIND NAME FILES...`: prints each file's reference,
/// sha256 and size; a dataset or model then holds exactly these files.
pub async fn upload_files(gateway: &str, kind: &str, name: &str, files: &[PathBuf]) -> Result<()> {
    let kind = upload_kind(kind).context("upload")?;
    if kind == pb::UploadKind::TriggerImage && files.len() != 1 {
        anyhow::bail!("upload trigger: give exactly one image file");
    }
    let files = match kind {
        pb::UploadKind::Dataset => dataset_files(files)?,
        _ => files
            .iter()
            .map(|f| {
                let n = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                (n.to_string(), f.clone())
            })
            .collect(),
    };
    let mut c = connect(gateway).await?;
    for (file_name, f) in &files {
        let r = upload(&mut c, kind, name, file_name, f).await?;
        println!("{} {} {} {}", f.display(), r.reference, r.sha256, r.size);
    }
    if kind != pb::UploadKind::TriggerImage {
        let keep: Vec<&str> = files.iter().map(|(f, _)| f.as_str()).collect();
        prune_upload(&mut c, kind, name, &keep).await?;
    }
    Ok(())
}

/// `deadbolt uploads list`: one line per upload (KIND NAME FILES BYTES),
/// then the team's usage against its quota.
pub async fn list(gateway: &str) -> Result<()> {
    let mut c = connect(gateway).await?;
    let r = c
        .list_uploads(pb::ListUploadsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    for u in &r.uploads {
        println!(
            "{} {} {} {}",
            kind_name(u.kind),
            u.name,
            u.files.len(),
            u.size
        );
    }
    println!(
        "quota: {} of {} bytes, {} of {} files",
        r.used_bytes, r.max_bytes, r.used_files, r.max_files
    );
    Ok(())
}

/// `deadbolt uploads delete KIND NAME [--file FILE]`.
pub async fn delete(gateway: &str, kind: &str, name: &str, file: Option<String>) -> Result<()> {
    let kind = upload_kind(kind).context("uploads delete")?;
    let mut c = connect(gateway).await?;
    let r = c
        .delete_upload(pb::DeleteUploadRequest {
            kind: kind as i32,
            name: name.to_string(),
            file: file.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!("deleted {} files, {} bytes", r.files, r.bytes);
    Ok(())
}

fn upload_kind(kind: &str) -> Result<pb::UploadKind> {
    Ok(match kind {
        "dataset" => pb::UploadKind::Dataset,
        "trigger" => pb::UploadKind::TriggerImage,
        "model" => pb::UploadKind::Model,
        other => anyhow::bail!("unknown upload kind {other:?} (dataset, trigger or model)"),
    })
}

fn kind_name(kind: i32) -> &'static str {
    match pb::UploadKind::try_from(kind) {
        Ok(pb::UploadKind::Dataset) => "dataset",
        Ok(pb::UploadKind::TriggerImage) => "trigger",
        Ok(pb::UploadKind::Model) => "model",
        _ => "unknown",
    }
}
