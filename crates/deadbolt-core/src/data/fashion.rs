//! Fashion-MNIST (Xiao, Rasul, Vollgraf 2017; Zalando Research, MIT
//! licence): 60,000 training and 10,000 test images of clothing, 28x28
//! grey, 10 classes, in the MNIST IDX format. Read from the gzipped files
//! of Debian's `dataset-fashion-mnist` (`scripts/setup.sh` installs it),
//! each checked against the sha256 pinned in `fashion-mnist.sha256` (the
//! file `setup.sh` verifies with `sha256sum -c`) before it is read.

use std::path::{Path, PathBuf};

use super::{idx, mnist, Budget, Splits};
use crate::error::{Error, Result};

/// The pinned files: `sha256  /path/name.gz`, one per line.
pub const PINS: &str = include_str!("fashion-mnist.sha256");
pub const LICENSE: &str = "MIT (Zalando SE)";
pub const CLASSES: i64 = 10;
/// The ten labels, in label order.
pub const LABELS: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// One pinned file: where Debian puts it and its sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub path: PathBuf,
    pub sha256: String,
}

impl Pin {
    /// The file's name (`train-images-idx3-ubyte.gz`, ...).
    pub fn name(&self) -> &str {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    }
}

/// The pinned files, in [`PINS`] order.
pub fn pins() -> Vec<Pin> {
    PINS.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let (sha, path) = l.split_once("  ")?;
            Some(Pin {
                path: PathBuf::from(path.trim()),
                sha256: sha.trim().to_string(),
            })
        })
        .collect()
}

/// The folder Debian installs the files into.
pub fn default_dir() -> PathBuf {
    pins()
        .first()
        .and_then(|p| p.path.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/usr/share/datasets/fashion-mnist"))
}

/// Loads the train and test splits from `dir` (default: [`default_dir`])
/// within `budget`: the four pinned gzipped IDX files must be there with
/// their pinned sha256, else the load is refused naming the file.
pub fn load_with(dir: Option<&Path>, budget: &mut Budget) -> Result<Splits> {
    let dir = dir.map(Path::to_path_buf).unwrap_or_else(default_dir);
    let pins = pins();
    let missing: Vec<&str> = pins
        .iter()
        .map(Pin::name)
        .filter(|n| !dir.join(n).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(Error::bad_file(
            &dir,
            format!(
                "not a Fashion-MNIST folder: missing {} (scripts/setup.sh installs Debian's \
                 dataset-fashion-mnist into {})",
                missing.join(", "),
                default_dir().display()
            ),
        ));
    }
    for pin in &pins {
        let path = dir.join(pin.name());
        let got = mnist::file_sha256(&path)?;
        if got != pin.sha256 {
            return Err(Error::bad_file(
                &path,
                format!(
                    "sha256 mismatch: pinned {}, found {got} (not the Fashion-MNIST file)",
                    pin.sha256
                ),
            ));
        }
    }
    let file = |name: &str| dir.join(format!("{name}.gz"));
    let train = idx::read_pair_with(
        &file(mnist::TRAIN_IMAGES),
        &file(mnist::TRAIN_LABELS),
        CLASSES,
        budget,
    )?;
    let test = idx::read_pair_with(
        &file(mnist::TEST_IMAGES),
        &file(mnist::TEST_LABELS),
        CLASSES,
        budget,
    )?;
    Ok(Splits { train, test })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::DataLimits;

    #[test]
    fn pins_name_the_four_idx_files_in_one_folder() {
        let p = pins();
        let names: Vec<&str> = p.iter().map(Pin::name).collect();
        let want: Vec<String> = [
            mnist::TRAIN_IMAGES,
            mnist::TRAIN_LABELS,
            mnist::TEST_IMAGES,
            mnist::TEST_LABELS,
        ]
        .iter()
        .map(|n| format!("{n}.gz"))
        .collect();
        assert_eq!(names, want);
        assert!(p.iter().all(|p| p.sha256.len() == 64
            && p.sha256.chars().all(|c| c.is_ascii_hexdigit())
            && p.path.parent() == Some(default_dir().as_path())));
    }

    /// The real files (scripts/setup.sh installs them, so CI has them),
    /// through the spec's dataset kind.
    #[test]
    fn loads_the_installed_files_through_the_spec() {
        let spec = crate::spec::DatasetSpec {
            kind: crate::spec::DatasetKind::FashionMnist,
            path: None,
            validation_fraction: 0.1,
            train_limit: 0,
            test_limit: 2_000,
            sha256: Default::default(),
        };
        let s = crate::data::load(&spec).unwrap_or_else(|e| {
            panic!("{e} (scripts/setup.sh installs Debian's dataset-fashion-mnist)")
        });
        assert_eq!(s.train.images.size(), [60_000, 1, 28, 28]);
        assert_eq!(s.test.images.size(), [2_000, 1, 28, 28]);
        assert_eq!(s.train.classes, 10);
        let counts = s.train.labels.bincount(None::<tch::Tensor>, 10);
        assert_eq!(Vec::<i64>::try_from(counts).unwrap(), vec![6_000; 10]);
        let (lo, hi) = (
            s.train.images.min().double_value(&[]),
            s.train.images.max().double_value(&[]),
        );
        assert!(lo == 0.0 && hi == 1.0, "{lo}..{hi}");
        // the stratified subset keeps the classes balanced
        let counts = s.test.labels.bincount(None::<tch::Tensor>, 10);
        assert_eq!(Vec::<i64>::try_from(counts).unwrap(), vec![200; 10]);
    }

    #[test]
    fn a_folder_without_the_files_or_with_other_bytes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let limits = DataLimits::default();
        let e = load_with(Some(dir.path()), &mut Budget::new(&limits)).unwrap_err();
        assert!(
            e.to_string().contains("train-images-idx3-ubyte.gz")
                && e.to_string().contains("dataset-fashion-mnist"),
            "{e}"
        );
        for pin in pins() {
            std::fs::write(dir.path().join(pin.name()), b"not the data").unwrap();
        }
        let e = load_with(Some(dir.path()), &mut Budget::new(&limits))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sha256 mismatch") && e.contains("train-images"),
            "{e}"
        );
    }
}
