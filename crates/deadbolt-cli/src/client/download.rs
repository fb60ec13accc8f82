//! `deadbolt report`: a run's files downloaded through the gateway (no
//! storage credentials), each checked against the sha256 it announces.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use deadbolt_proto::v1 as pb;

use deadbolt_gateway::transfer::in_report;

use super::{connect, get_run, status_error, Client};
use crate::headline::Headline;
#[cfg(feature = "torch")]
use deadbolt_core::pipeline::report::Report;
#[cfg(feature = "torch")]
use deadbolt_core::report::Document;

/// Where a file of a run's report lands in an output folder: `report/*`
/// as `*`, the rest of what the gateway serves as the report (with
/// `with_models`, the final and pruned models and the synthetic trigger)
/// under its own name; the same layout as the core's `experiment::run`.
fn local_path(name: &str, with_models: bool) -> Option<PathBuf> {
    match name.strip_prefix("report/") {
        Some(rest) => Some(PathBuf::from(rest)),
        None => in_report(name, with_models).then(|| PathBuf::from(name)),
    }
}

/// Refuses an artifact name (from the server) that is not a plain relative
/// path of safe segments.
fn safe_name(name: &str) -> Result<()> {
    deadbolt_store::validate_name(name)
        .with_context(|| format!("the server sent artifact name {name:?}; refusing to write it"))?;
    let p = Path::new(name);
    if !p
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        bail!("the server sent artifact name {name:?} that would leave --out; refusing it");
    }
    Ok(())
}

/// One artifact arriving from a download: written to `<path>.part`,
/// hashed as it comes, moved to `path` only once its size and sha256 are
/// the ones the gateway announced; dropped before that, the part file is
/// removed.
struct Incoming {
    name: String,
    size: u64,
    sha256: String,
    written: u64,
    hasher: sha2::Sha256,
    /// None: an artifact not kept (its bytes are checked, not written).
    file: Option<(std::fs::File, PathBuf, PathBuf)>,
}

impl Incoming {
    fn start(c: &pb::DownloadChunk, dest: Option<PathBuf>) -> Result<Incoming> {
        use sha2::Digest;
        let file = match dest {
            Some(path) => {
                if let Some(d) = path.parent() {
                    std::fs::create_dir_all(d)
                        .with_context(|| format!("creating {}", d.display()))?;
                }
                let mut part = path.clone().into_os_string();
                part.push(".part");
                let part = PathBuf::from(part);
                let f = std::fs::File::create(&part)
                    .with_context(|| format!("creating {}", part.display()))?;
                Some((f, part, path))
            }
            None => None,
        };
        Ok(Incoming {
            name: c.name.clone(),
            size: c.size,
            sha256: c.sha256.to_ascii_lowercase(),
            written: 0,
            hasher: sha2::Sha256::new(),
            file,
        })
    }

    fn write(&mut self, c: &pb::DownloadChunk) -> Result<()> {
        use sha2::Digest;
        use std::io::Write;
        if c.offset != self.written
            || self.written + c.data.len() as u64 > self.size
            || c.size != self.size
            || !c.sha256.eq_ignore_ascii_case(&self.sha256)
        {
            bail!(
                "the gateway sent {} out of order (offset {} after {} of {} bytes)",
                self.name,
                c.offset,
                self.written,
                self.size
            );
        }
        self.hasher.update(&c.data);
        self.written += c.data.len() as u64;
        if let Some((f, part, _)) = &mut self.file {
            f.write_all(&c.data)
                .with_context(|| format!("writing {}", part.display()))?;
        }
        Ok(())
    }

    /// Checks the whole artifact and moves it into place.
    fn finish(mut self) -> Result<()> {
        use sha2::Digest;
        let actual = hex::encode(self.hasher.clone().finalize());
        if self.written != self.size || actual != self.sha256 {
            bail!(
                "{}: {} bytes hashing to {actual} arrived, not the announced {} bytes hashing to {} (refused)",
                self.name,
                self.written,
                self.size,
                self.sha256
            );
        }
        if let Some((f, part, path)) = self.file.take() {
            f.sync_all()
                .with_context(|| format!("writing {}", part.display()))?;
            drop(f);
            std::fs::rename(&part, &path)
                .with_context(|| format!("moving {} to {}", part.display(), path.display()))?;
        }
        Ok(())
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some((_, part, _)) = self.file.take() {
            let _ = std::fs::remove_file(part);
        }
    }
}

/// Downloads the run's artifacts of `target` through the gateway (the
/// client holds no storage credentials; the gateway reads only its team's
/// runs) and writes those that `keep` places under `out`, each checked
/// against the sha256 the gateway announces; returns how many it wrote.
async fn download_artifacts(
    c: &mut Client,
    run: &pb::Run,
    out: &Path,
    target: pb::download_request::Target,
    keep: impl Fn(&str) -> Option<PathBuf>,
) -> Result<usize> {
    let mut stream = c
        .download(pb::DownloadRequest {
            run_id: run.id.clone(),
            target: Some(target),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut n = 0;
    let mut cur: Option<Incoming> = None;
    while let Some(chunk) = stream.message().await.map_err(status_error)? {
        if cur.as_ref().is_none_or(|i| i.name != chunk.name) {
            if let Some(done) = cur.take() {
                n += usize::from(done.file.is_some());
                done.finish()?;
            }
            // the names come from the server: one that could leave `out`
            // (an absolute path, `..`, odd characters) is refused, never
            // written
            safe_name(&chunk.name)?;
            let dest = keep(&chunk.name).map(|rel| out.join(rel));
            cur = Some(Incoming::start(&chunk, dest)?);
        }
        cur.as_mut().expect("started").write(&chunk)?;
    }
    if let Some(done) = cur.take() {
        n += usize::from(done.file.is_some());
        done.finish()?;
    }
    Ok(n)
}

/// Whether the run is a scan (bring-your-own-model) run: its artifacts
/// are under `scan/` (and `repair/`).
fn is_scan_run(run: &pb::Run) -> bool {
    run.stages.iter().any(|s| s.stage == "scan")
}

/// Downloads a scan run's files into `out`: `scan/` (report.json,
/// report.md, figures, the synthetic trigger) and `repair/` (the repaired
/// model.safetensors and card.toml, report, figures).
async fn download_scan(c: &mut Client, run: &pb::Run, out: &Path) -> Result<usize> {
    let n = download_artifacts(
        c,
        run,
        out,
        pb::download_request::Target::Report(pb::ReportFiles { models: false }),
        |name| {
            (name.starts_with("scan/") || name.starts_with("repair/")).then(|| PathBuf::from(name))
        },
    )
    .await?;
    if n == 0 {
        bail!("scan run {} has no files yet", run.id);
    }
    tracing::info!(run_id = %run.id, files = n, out = %out.display(), "scan files downloaded");
    Ok(n)
}

/// Downloads a run's report files (and with `with_models` its models) into
/// `out` through the gateway (sha256-verified), as the services stored
/// them; returns the text of its report.json.
async fn download_report_files(
    c: &mut Client,
    run: &pb::Run,
    out: &Path,
    with_models: bool,
) -> Result<String> {
    let n = download_artifacts(
        c,
        run,
        out,
        pb::download_request::Target::Report(pb::ReportFiles {
            models: with_models,
        }),
        |name| local_path(name, with_models),
    )
    .await?;
    let path = out.join("report.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("run {} has no report (read {})", run.id, path.display()))?;
    tracing::info!(run_id = %run.id, files = n, out = %out.display(), "report downloaded");
    Ok(text)
}

/// Downloads a run's report (and with `with_models` its models) into `out`
/// through the gateway (sha256-verified), then rebases the report's paths
/// onto `out`.
#[cfg(feature = "torch")]
pub async fn download_report(
    c: &mut Client,
    run: &pb::Run,
    out: &Path,
    with_models: bool,
) -> Result<Report> {
    let text = download_report_files(c, run, out, with_models).await?;
    let mut report = Report::from_json(&text)?;
    rebase(&mut report, out);
    report.write(out)?;
    Ok(report)
}

/// `deadbolt report`: a scan run's files, or an experiment's report (and
/// with `with_models` its models), downloaded into `out`; prints the
/// report's headline figures. Built with the `torch` feature, the report's
/// paths are rebased onto `out` and report.json and report.md written
/// again (as `deadbolt experiment` writes them); without it, both stay as
/// the services stored them (paths relative to `out`).
pub async fn report(gateway: &str, run_id: &str, out: &Path, with_models: bool) -> Result<()> {
    let mut c = connect(gateway).await?;
    let r = get_run(&mut c, run_id).await?;
    if is_scan_run(&r) {
        download_scan(&mut c, &r, out).await?;
        println!("scan files (scan/, repair/) written to {}", out.display());
        return Ok(());
    }
    #[cfg(feature = "torch")]
    let headline = Headline::of(&download_report(&mut c, &r, out, with_models).await?)?;
    #[cfg(not(feature = "torch"))]
    let headline =
        Headline::from_json(&download_report_files(&mut c, &r, out, with_models).await?)?;
    headline.print();
    Ok(())
}

/// Makes the report's relative paths (as the services store them) relative
/// to `out`, as the core writes them.
#[cfg(feature = "torch")]
fn rebase(r: &mut Report, out: &Path) {
    let j = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            out.join(p)
        }
    };
    r.clean_model.checkpoint = j(&r.clean_model.checkpoint);
    r.backdoored_model.checkpoint = j(&r.backdoored_model.checkpoint);
    r.synthetic_trigger.trigger_file = j(&r.synthetic_trigger.trigger_file);
    for f in r.figures.iter_mut() {
        *f = j(f);
    }
    for t in [&mut r.pruning, &mut r.pruning_synthetic] {
        for c in t.values_mut() {
            if let Some(p) = c.checkpoint.as_mut() {
                *p = j(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_artifact_names_are_refused() {
        for bad in [
            "../escape.png",
            "report/../../etc/passwd",
            "/etc/passwd",
            "report//x.png",
            "report/./x.png",
            "report\\..\\x",
            "",
        ] {
            assert!(safe_name(bad).is_err(), "{bad:?} was accepted");
        }
        for ok in ["report/report.json", "pruned/linf/model.safetensors"] {
            safe_name(ok).unwrap();
        }
    }
}
