//! What several stages do the same way: fetch a trained model, upload
//! figures. Shared machinery, not any one stage's logic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use deadbolt_runtime::{JobContext, JobError, Stage};
use deadbolt_store::ArtifactRef;

use crate::contract::TrainOutput;

/// Downloads (sha256-verified) the final model of training stage `S` into
/// `dir` (`model.safetensors` + `model.json`).
pub fn fetch_model<S: Stage<Output = TrainOutput>>(
    ctx: &JobContext,
    dir: &Path,
) -> Result<TrainOutput, JobError> {
    let r = ctx.output::<S>()?;
    ctx.download(&r.checkpoint, &dir.join("model.safetensors"))?;
    ctx.download(&r.sidecar, &dir.join("model.json"))?;
    Ok(r)
}

/// Uploads each file under `out` as `report/<relative path>`; returns the
/// relative paths and their references.
pub fn upload_figures(
    ctx: &JobContext,
    out: &Path,
    figures: &[PathBuf],
) -> Result<(Vec<PathBuf>, BTreeMap<String, ArtifactRef>), JobError> {
    let mut rel = Vec::new();
    let mut refs = BTreeMap::new();
    for f in figures {
        let r = relative(out, f);
        let name = r.to_string_lossy().replace('\\', "/");
        let a = ctx.put_file(&format!("report/{name}"), &out.join(&r), "image/png")?;
        refs.insert(name, a);
        rel.push(r);
    }
    Ok((rel, refs))
}

/// `p` relative to `out` (unchanged when it is not under `out`).
pub fn relative(out: &Path, p: &Path) -> PathBuf {
    p.strip_prefix(out).unwrap_or(p).to_path_buf()
}
