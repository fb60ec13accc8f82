//! The files a job fetches and uploads, the same way for several stages:
//! a trained model, figures, report folders, a scan run's model and data.

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

/// Uploads every file under `dir` (recursively) as `<prefix>/<relative
/// path>`; returns the references by artifact name.
pub fn upload_dir(
    ctx: &JobContext,
    dir: &Path,
    prefix: &str,
) -> Result<BTreeMap<String, ArtifactRef>, JobError> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d)
            .map_err(|e| JobError::transient(format!("listing {}: {e}", d.display())))?;
        for e in entries {
            let p = e
                .map_err(|e| JobError::transient(format!("listing {}: {e}", d.display())))?
                .path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut refs = BTreeMap::new();
    for f in files {
        let rel = relative(dir, &f).to_string_lossy().replace('\\', "/");
        let content_type = match f.extension().and_then(|e| e.to_str()) {
            Some("png") => "image/png",
            Some("json") => "application/json",
            Some("md") => "text/markdown",
            Some("toml") => "application/toml",
            _ => "application/octet-stream",
        };
        let name = format!("{prefix}/{rel}");
        let r = ctx.put_file(&name, &f, content_type)?;
        refs.insert(name, r);
    }
    Ok(refs)
}

/// The data limits of the stages, from the operator's `[limits]`: what a
/// header, a card or an image folder may ask to be allocated.
pub fn data_limits(l: &deadbolt_runtime::policy::Limits) -> deadbolt_core::data::DataLimits {
    deadbolt_core::data::DataLimits {
        max_image_pixels: l.max_image_pixels,
        max_channels: l.max_image_channels,
        max_images: l.max_dataset_images,
        max_decoded_bytes: l.max_dataset_bytes,
        max_inflated_bytes: l.max_inflated_bytes,
        max_classes: l.max_classes,
        // the images and room for class folders and stray files
        max_folder_files: l
            .max_dataset_images
            .saturating_add(l.max_dataset_images / 20),
    }
}

/// Opens the model and clean data of a scan run (fetched by
/// [`JobContext::scan_spec`]) on this process's device, within `limits`.
pub fn scan_subject(
    spec: &deadbolt_spec::ScanSpec,
    files: &deadbolt_runtime::scan::ScanFiles,
    limits: &deadbolt_core::data::DataLimits,
) -> Result<deadbolt_core::byom::scan::Subject, JobError> {
    let split: deadbolt_core::data::folder::Split = spec
        .split
        .as_str()
        .parse()
        .map_err(|e| JobError::invalid("options_toml.split", format!("{e}")))?;
    let device = crate::error::core(deadbolt_core::device::resolve(
        deadbolt_core::spec::DeviceSpec::Auto,
    ))?;
    crate::error::core(deadbolt_core::byom::scan::open_with(
        &files.model,
        Some(&files.card),
        &files.data,
        split,
        spec.layer.as_deref(),
        device,
        limits,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use deadbolt_core::data::DataLimits;
    use deadbolt_runtime::policy::Limits;

    /// The embedded `deadbolt experiment` (unbounded costs) reads data
    /// within the local CLI's bounds; the service defaults let MNIST,
    /// CIFAR-10 and small images through and refuse a 512x512 upload.
    #[test]
    fn data_limits_of_the_services() {
        assert_eq!(data_limits(&Limits::unbounded()), DataLimits::default());
        let l = data_limits(&Limits::default());
        for (c, h, w) in [(1, 28, 28), (3, 32, 32), (3, 64, 64)] {
            l.check_image("x", c, h, w).unwrap();
        }
        let e = l.check_image("images", 1, 512, 512).unwrap_err();
        assert!(matches!(e, deadbolt_core::Error::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("max_image_pixels"), "{e}");
    }
}
