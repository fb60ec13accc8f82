//! Bytes in and out of object storage on the clients' behalf, so that no
//! client holds storage credentials: uploads (a per-team quota, a deadline
//! that grows with the declared size, nothing stored or charged when cut
//! off) and downloads of a run's artifacts (streamed in bounded chunks,
//! team-scoped).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadbolt_proto::v1 as pb;
use deadbolt_proto::validate::invalid_argument;
use deadbolt_runtime::policy::Limits;
use deadbolt_runtime::uploads::{self, UploadKind, Usage};
use deadbolt_store::artifacts::{ArtifactRef, ArtifactStore, UploadWriter};
use deadbolt_store::ArtifactRecord;
use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::error::GatewayError;

/// Bytes per download message (the clients decode 4 MiB at most).
pub const DOWNLOAD_CHUNK: usize = 1 << 20;
/// Download messages buffered per call: with [`DOWNLOAD_CHUNK`], a
/// download holds about 5 MiB whatever the artifact's size.
const DOWNLOAD_BUFFER: usize = 4;
/// The slowest upload the gateway waits for, in bytes per second: an
/// upload's deadline is the request timeout plus its declared size at
/// this rate (30 s + 256 s for a 256 MiB file with the defaults).
pub const MIN_UPLOAD_RATE: u64 = 1 << 20;

/// How long an upload of `size` declared bytes may take.
pub fn upload_deadline(base: Duration, size: u64) -> Duration {
    base + Duration::from_secs_f64(size as f64 / MIN_UPLOAD_RATE as f64)
}

/// Receives an upload's bytes (after its header) into `w`: `first` (the
/// header message's bytes), then the stream's messages, never more than
/// the declared `size`. On an error the caller aborts `w`.
pub async fn receive(
    w: &mut UploadWriter,
    first: Vec<u8>,
    stream: &mut tonic::Streaming<pb::UploadChunk>,
    size: u64,
) -> Result<(), Status> {
    let mut data = first;
    loop {
        if !data.is_empty() {
            if w.size() + data.len() as u64 > size {
                return Err(invalid_argument(
                    "header.size",
                    format!("more than the declared {size} bytes arrived"),
                ));
            }
            w.write(bytes::Bytes::from(data)).await?;
        }
        match stream.message().await? {
            Some(c) if c.header.is_some() => {
                return Err(invalid_argument(
                    "header",
                    "only the first message of an upload carries a header",
                ))
            }
            Some(c) => data = c.data,
            None => return Ok(()),
        }
    }
}

/// The upload kind of a request, or INVALID_ARGUMENT naming `field`.
pub fn kind_of(field: &str, kind: i32) -> Result<UploadKind, Status> {
    match pb::UploadKind::try_from(kind) {
        Ok(pb::UploadKind::Dataset) => Ok(UploadKind::Dataset),
        Ok(pb::UploadKind::TriggerImage) => Ok(UploadKind::TriggerImage),
        Ok(pb::UploadKind::Model) => Ok(UploadKind::Model),
        _ => Err(invalid_argument(
            field,
            "UPLOAD_KIND_DATASET, UPLOAD_KIND_TRIGGER_IMAGE or UPLOAD_KIND_MODEL",
        )),
    }
}

fn kind_to_proto(k: UploadKind) -> pb::UploadKind {
    match k {
        UploadKind::Dataset => pb::UploadKind::Dataset,
        UploadKind::TriggerImage => pb::UploadKind::TriggerImage,
        UploadKind::Model => pb::UploadKind::Model,
    }
}

/// The upload quotas of this gateway process: what each team's uploads in
/// flight will add. The check of an upload (a listing of the team's
/// uploads plus what is in flight) and the release of a stored upload's
/// reservation take one lock, so concurrent uploads of a team are counted
/// exactly once. Across gateway replicas a team may exceed its quota by
/// the uploads in flight on the other replicas.
#[derive(Clone, Default)]
pub struct Quotas {
    check: Arc<tokio::sync::Mutex<()>>,
    pending: Arc<Mutex<HashMap<String, Usage>>>,
}

/// An upload's share of its team's quota while it arrives; dropped (the
/// upload failed or was cut off), it is given back: nothing is charged.
pub struct Reservation {
    quotas: Quotas,
    team: String,
    usage: Usage,
    released: bool,
}

impl Quotas {
    /// Reserves room for `size` bytes stored as `kind`/`name`/`file` of
    /// `team` (replacing a stored file of that name frees its bytes), or
    /// RESOURCE_EXHAUSTED naming the quota.
    #[allow(clippy::too_many_arguments)]
    pub async fn reserve(
        &self,
        artifacts: &ArtifactStore,
        limits: &Limits,
        team: &str,
        kind: UploadKind,
        name: &str,
        file: &str,
        size: u64,
    ) -> Result<Reservation, Status> {
        let _check = self.check.lock().await;
        let (stored, used) = uploads::list(artifacts, team).await?;
        let file = match kind {
            UploadKind::TriggerImage => "",
            _ => file,
        };
        let replaced = stored
            .iter()
            .find(|u| u.kind == kind && u.name == name)
            .and_then(|u| u.files.iter().find(|(f, _)| f == file))
            .map(|(_, n)| *n);
        let pending = self.pending_of(team);
        uploads::check_quota(
            used,
            pending,
            replaced,
            size,
            limits.max_upload_bytes_per_team,
            limits.max_uploads_per_team,
        )
        .map_err(|m| {
            tracing::info!(team = %team, name = %name, size, "upload over the team's quota");
            Status::from(GatewayError::UploadQuota(m))
        })?;
        let usage = Usage {
            bytes: size.saturating_sub(replaced.unwrap_or(0)),
            files: u64::from(replaced.is_none()),
        };
        let mut p = self.pending.lock().expect("lock");
        let e = p.entry(team.to_string()).or_default();
        e.bytes += usage.bytes;
        e.files += usage.files;
        Ok(Reservation {
            quotas: self.clone(),
            team: team.to_string(),
            usage,
            released: false,
        })
    }

    /// What `team`'s uploads in flight here will add.
    pub fn pending_of(&self, team: &str) -> Usage {
        self.pending
            .lock()
            .expect("lock")
            .get(team)
            .copied()
            .unwrap_or_default()
    }
}

impl Reservation {
    /// The upload is stored (a listing shows it): its reservation goes,
    /// under the check lock, so no check counts it twice or misses it.
    pub async fn settle(mut self) {
        let check = self.quotas.check.clone();
        let _check = check.lock().await;
        self.release();
    }

    fn release(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let mut p = self.quotas.pending.lock().expect("lock");
        if let Some(e) = p.get_mut(&self.team) {
            e.bytes = e.bytes.saturating_sub(self.usage.bytes);
            e.files = e.files.saturating_sub(self.usage.files);
            if *e == Usage::default() {
                p.remove(&self.team);
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

/// The uploads of `team` with its quota.
pub async fn list_uploads(
    artifacts: &ArtifactStore,
    limits: &Limits,
    team: &str,
) -> Result<pb::ListUploadsResponse, Status> {
    let (stored, used) = uploads::list(artifacts, team).await?;
    Ok(pb::ListUploadsResponse {
        uploads: stored
            .iter()
            .map(|u| pb::UploadInfo {
                kind: kind_to_proto(u.kind) as i32,
                name: u.name.clone(),
                size: u.size(),
                files: u
                    .files
                    .iter()
                    .map(|(f, n)| pb::UploadFile {
                        file: f.clone(),
                        size: *n,
                    })
                    .collect(),
            })
            .collect(),
        used_bytes: used.bytes,
        used_files: used.files,
        max_bytes: limits.max_upload_bytes_per_team,
        max_files: limits.max_uploads_per_team,
    })
}

/// Deletes an upload of `team` (or one of its files); NOT_FOUND when the
/// team has none of that name (another team's answers the same).
pub async fn delete_upload(
    artifacts: &ArtifactStore,
    team: &str,
    req: &pb::DeleteUploadRequest,
) -> Result<pb::DeleteUploadResponse, Status> {
    let kind = kind_of("kind", req.kind)?;
    uploads::check_name(&req.name).map_err(|m| invalid_argument("name", m))?;
    let file = req.file.trim();
    let file = if file.is_empty() || kind == UploadKind::TriggerImage {
        None
    } else {
        uploads::check_file(file).map_err(|m| invalid_argument("file", m))?;
        Some(file)
    };
    let gone = uploads::delete(artifacts, team, kind, &req.name, file).await?;
    if gone.files == 0 {
        return Err(GatewayError::NoSuchUpload {
            name: req.name.clone(),
            file: file.map(str::to_string),
        }
        .into());
    }
    Ok(pb::DeleteUploadResponse {
        files: gone.files,
        bytes: gone.bytes,
    })
}

/// Whether an artifact belongs to a run's report: an experiment's
/// `report/` files, a scan run's `scan/` and `repair/` files; with
/// `models`, an experiment's models and synthetic trigger too.
pub fn in_report(name: &str, models: bool) -> bool {
    if ["report/", "scan/", "repair/"]
        .iter()
        .any(|p| name.starts_with(p))
    {
        return true;
    }
    models
        && (matches!(
            name,
            "clean/model.safetensors"
                | "clean/model.json"
                | "backdoored/model.safetensors"
                | "backdoored/model.json"
                | "synthetic/trigger.safetensors"
        ) || name.starts_with("pruned/"))
}

/// The recorded artifacts a download asks for: one by name (NOT_FOUND
/// when the run has none of that name) or the report's.
pub fn select(
    records: Vec<ArtifactRecord>,
    target: Option<&pb::download_request::Target>,
) -> Result<Vec<ArtifactRecord>, Status> {
    use pb::download_request::Target;
    match target {
        Some(Target::Artifact(name)) => {
            let name = name.trim();
            match records.into_iter().find(|r| r.name == name) {
                Some(r) => Ok(vec![r]),
                None => Err(GatewayError::NoSuchArtifact(name.to_string()).into()),
            }
        }
        Some(Target::Report(r)) => Ok(records
            .into_iter()
            .filter(|a| in_report(&a.name, r.models))
            .collect()),
        None => Err(invalid_argument(
            "target",
            "an artifact name or the report (ReportFiles)",
        )),
    }
}

pub type DownloadStream = Pin<Box<dyn Stream<Item = Result<pb::DownloadChunk, Status>> + Send>>;

/// Streams `records` (a run's artifacts, already checked to be the
/// caller's team's) from object storage, each in chunks of at most
/// [`DOWNLOAD_CHUNK`] bytes with its name, size and sha256, with at most
/// [`DOWNLOAD_BUFFER`] chunks in flight. An object whose size or sha256
/// is not the recorded one ends the stream with DATA_LOSS; the client
/// stopping ends the read.
pub fn download(artifacts: ArtifactStore, records: Vec<ArtifactRecord>) -> DownloadStream {
    let (tx, rx) = tokio::sync::mpsc::channel(DOWNLOAD_BUFFER);
    tokio::spawn(async move {
        for rec in records {
            let r: ArtifactRef = match artifacts.ref_from_record(&rec) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            let mut reader = match artifacts.open(&r).await {
                Ok(rd) => rd,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            let chunk = |offset: u64, data: Vec<u8>| pb::DownloadChunk {
                name: rec.name.clone(),
                size: r.size,
                sha256: r.sha256.clone(),
                offset,
                data,
            };
            let mut offset = 0u64;
            let mut sent = false;
            loop {
                let msg = match reader.next_chunk(DOWNLOAD_CHUNK).await {
                    Ok(Some(b)) => {
                        let m = chunk(offset, b.to_vec());
                        offset += b.len() as u64;
                        m
                    }
                    // an empty artifact still names itself
                    Ok(None) if !sent => chunk(0, Vec::new()),
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                sent = true;
                if tx.send(Ok(msg)).await.is_err() {
                    tracing::debug!(name = %rec.name, "download abandoned by its client");
                    return;
                }
            }
            tracing::debug!(name = %rec.name, size = r.size, "artifact downloaded");
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_grow_with_the_size() {
        let base = Duration::from_secs(30);
        assert_eq!(upload_deadline(base, 0), base);
        assert_eq!(upload_deadline(base, 256 << 20), Duration::from_secs(286));
    }

    #[test]
    fn the_report_and_the_models() {
        for n in ["report/report.json", "scan/report.md", "repair/card.toml"] {
            assert!(in_report(n, false), "{n}");
        }
        for n in ["clean/model.safetensors", "pruned/linf/model.safetensors"] {
            assert!(!in_report(n, false) && in_report(n, true), "{n}");
        }
        assert!(!in_report("data/train.bundle", true));
    }

    fn rec(name: &str) -> ArtifactRecord {
        ArtifactRecord {
            run_id: uuid::Uuid::nil(),
            name: name.into(),
            uri: String::new(),
            sha256: String::new(),
            size: 0,
            content_type: None,
        }
    }

    #[test]
    fn selecting_artifacts() {
        use pb::download_request::Target;
        let all = || vec![rec("report/report.json"), rec("clean/model.safetensors")];
        let one = select(
            all(),
            Some(&Target::Artifact("clean/model.safetensors".into())),
        )
        .unwrap();
        assert_eq!(one.len(), 1);
        let e = select(all(), Some(&Target::Artifact("nope".into()))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let rep = select(
            all(),
            Some(&Target::Report(pb::ReportFiles { models: false })),
        )
        .unwrap();
        assert_eq!(rep.len(), 1);
        let e = select(all(), None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn reservations_count_until_settled_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let art = ArtifactStore::local(dir.path()).unwrap();
        let limits = Limits {
            max_upload_bytes_per_team: 100,
            max_uploads_per_team: 2,
            ..Limits::default()
        };
        let q = Quotas::default();
        let a = q
            .reserve(&art, &limits, "t", UploadKind::Dataset, "d", "a", 60)
            .await
            .unwrap();
        // in flight: counted against a second upload
        let e = q
            .reserve(&art, &limits, "t", UploadKind::Dataset, "d", "b", 50)
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("max_upload_bytes_per_team"), "{e:?}");
        // another team has its own quota
        drop(
            q.reserve(&art, &limits, "u", UploadKind::Dataset, "d", "b", 100)
                .await
                .unwrap(),
        );
        // cut off: given back
        drop(a);
        assert_eq!(q.pending_of("t"), Usage::default());
        let b = q
            .reserve(&art, &limits, "t", UploadKind::Dataset, "d", "b", 100)
            .await
            .unwrap();
        b.settle().await;
        assert_eq!(q.pending_of("t"), Usage::default());
    }
}
