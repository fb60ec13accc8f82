//! CIFAR-10 binary batches: records of 1 label byte + 3x32x32 pixel bytes
//! (`data_batch_1.bin` ... `data_batch_5.bin`, `test_batch.bin`).

use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

use super::{Budget, DataLimits, Dataset, Input, Splits};
use crate::error::{Error, Result};

pub const CLASSES: i64 = 10;
const C: usize = 3;
const H: usize = 32;
const W: usize = 32;
const RECORD: usize = 1 + C * H * W;

/// Reads one batch file into a dataset, within the local CLI's
/// [`DataLimits::default`].
pub fn read_batch(path: &Path) -> Result<Dataset> {
    read_batch_with(path, &mut Budget::new(&DataLimits::default()))
}

/// Reads one batch file into a dataset within `budget`: a plain file's
/// record count is checked from its length before it is read, a gzipped
/// one is inflated at most to `max_inflated_bytes`.
pub fn read_batch_with(path: &Path, budget: &mut Budget) -> Result<Dataset> {
    let limits = budget.limits();
    limits.check_image(&path.display().to_string(), C as u64, H as u64, W as u64)?;
    let mut input = Input::open(path, limits)?;
    if let Some(len) = input.plain_len {
        budget.take(path, len / RECORD as u64, (RECORD - 1) as u64)?;
    }
    let b = input.read_rest()?;
    if input.plain_len.is_none() {
        budget.take(path, (b.len() / RECORD) as u64, (RECORD - 1) as u64)?;
    }
    if b.is_empty() {
        return Err(Error::bad_file(path, "empty CIFAR-10 batch"));
    }
    if b.len() % RECORD != 0 {
        return Err(Error::bad_file(
            path,
            format!(
                "truncated: {} bytes is not a whole number of {RECORD}-byte records",
                b.len()
            ),
        ));
    }
    let n = b.len() / RECORD;
    let mut labels = Vec::with_capacity(n);
    let mut pixels = Vec::with_capacity(n * (RECORD - 1));
    for (i, rec) in b.chunks_exact(RECORD).enumerate() {
        if rec[0] as i64 >= CLASSES {
            return Err(Error::bad_file(
                path,
                format!(
                    "record {i}: label {} out of range (expected 0..{CLASSES})",
                    rec[0]
                ),
            ));
        }
        labels.push(rec[0] as i64);
        pixels.extend_from_slice(&rec[1..]);
    }
    let x = Tensor::from_slice(&pixels)
        .view([n as i64, C as i64, H as i64, W as i64])
        .to_kind(Kind::Float)
        / 255.0;
    Dataset::new(
        x,
        Tensor::from_slice(&labels),
        CLASSES,
        &path.display().to_string(),
    )
}

/// The training batches (`data_batch_*.bin`) of a folder, sorted.
pub fn train_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("data_batch_") && n.ends_with(".bin"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads `data_batch_*.bin` (train) and `test_batch.bin` (test) from a
/// folder, within the local CLI's [`DataLimits::default`].
pub fn load_dir(dir: &Path) -> Result<Splits> {
    load_dir_with(dir, &mut Budget::new(&DataLimits::default()))
}

/// Reads `data_batch_*.bin` (train) and `test_batch.bin` (test) from a
/// folder within `budget` (all the batches together).
pub fn load_dir_with(dir: &Path, budget: &mut Budget) -> Result<Splits> {
    let train_files = train_files(dir)?;
    if train_files.is_empty() {
        return Err(Error::bad_file(dir, "no data_batch_*.bin files"));
    }
    let parts = train_files
        .iter()
        .map(|p| read_batch_with(p, budget))
        .collect::<Result<Vec<_>>>()?;
    let train = Dataset::new(
        Tensor::cat(&parts.iter().map(|d| &d.images).collect::<Vec<_>>(), 0),
        Tensor::cat(&parts.iter().map(|d| &d.labels).collect::<Vec<_>>(), 0),
        CLASSES,
        &dir.display().to_string(),
    )?;
    let test = read_batch_with(&dir.join("test_batch.bin"), budget)?;
    Ok(Splits { train, test })
}

/// Writes a dataset of 3x32x32 images as a CIFAR-10 batch (for tests and tools).
pub fn write_batch(path: &Path, ds: &Dataset) -> Result<()> {
    let px: Vec<u8> = Vec::try_from(
        (&ds.images * 255.0)
            .round()
            .clamp(0.0, 255.0)
            .to_kind(Kind::Uint8)
            .contiguous()
            .view([-1]),
    )
    .map_err(Error::Torch)?;
    let labels = ds.labels_vec();
    let per = C * H * W;
    let mut out = Vec::with_capacity(labels.len() * RECORD);
    for (i, l) in labels.iter().enumerate() {
        out.push(*l as u8);
        out.extend_from_slice(&px[i * per..(i + 1) * per]);
    }
    super::idx::write_atomic(path, &out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn sample(n: i64) -> Dataset {
        let x = (crate::rng::uniform(&[n, 3, 32, 32], 101) * 255.0).round() / 255.0;
        let y = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(10);
        Dataset::new(x, y, 10, "sample").unwrap()
    }

    #[test]
    fn reads_batches_from_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, t) = (sample(4), sample(3), sample(2));
        write_batch(&dir.path().join("data_batch_1.bin"), &a).unwrap();
        write_batch(&dir.path().join("data_batch_2.bin"), &b).unwrap();
        write_batch(&dir.path().join("test_batch.bin"), &t).unwrap();
        let s = load_dir(dir.path()).unwrap();
        assert_eq!(s.train.len(), 7);
        assert_eq!(s.test.len(), 2);
        assert_eq!(s.train.image_shape(), (3, 32, 32));
        assert!(s
            .train
            .images
            .narrow(0, 0, 4)
            .allclose(&a.images, 1e-6, 1e-6, false));
    }

    #[test]
    fn bad_batches_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data_batch_1.bin");
        write_batch(&p, &sample(2)).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let e = read_batch(&p).unwrap_err().to_string();
        assert!(
            e.contains("data_batch_1.bin") && e.contains("truncated"),
            "{e}"
        );
        let mut bad = bytes.clone();
        bad[RECORD] = 12;
        std::fs::write(&p, &bad).unwrap();
        let e = read_batch(&p).unwrap_err().to_string();
        assert!(e.contains("record 1") && e.contains("out of range"), "{e}");
        let e = load_dir(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }
}
