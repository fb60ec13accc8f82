//! MNIST IDX files (`*-idx3-ubyte` images, `*-idx1-ubyte` labels), gzipped or not.

use std::io::Write;
use std::path::Path;
use tch::{Kind, Tensor};

use super::{Budget, DataLimits, Input};
use crate::error::{Error, Result};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Reads and checks an IDX header (magic, then `dims` big-endian u32
/// sizes) from the start of `input`, and returns the sizes.
fn header(input: &mut Input, path: &Path, magic: u32, what: &str, dims: usize) -> Result<Vec<u64>> {
    let truncated = || Error::bad_file(path, format!("truncated: no complete IDX {what} header"));
    let mut b = [0u8; 16];
    let len = 4 + 4 * dims;
    if input.read_some(&mut b[..4])? < 4 {
        return Err(truncated());
    }
    let found = be_u32(&b, 0);
    if found != magic {
        return Err(Error::bad_file(
            path,
            format!("wrong magic 0x{found:08x} for an IDX {what} file (expected 0x{magic:08x})"),
        ));
    }
    if input.read_some(&mut b[4..len])? < len - 4 {
        return Err(truncated());
    }
    Ok((0..dims).map(|i| be_u32(&b, 4 + 4 * i) as u64).collect())
}

/// Reads the `need` bytes a header promised, refusing a file that holds
/// fewer or more. A plain file's length is checked before anything is
/// read; a gzipped one is read as it inflates (the buffer grows with what
/// arrives) and at most one byte past the promise.
fn body(
    input: &mut Input,
    path: &Path,
    header_len: u64,
    need: u64,
    promise: &str,
) -> Result<Vec<u8>> {
    let mismatch = |have: String| {
        Error::bad_file(
            path,
            format!("the header promises {promise} ({need} bytes), {have}"),
        )
    };
    if let Some(len) = input.plain_len {
        let have = len.saturating_sub(header_len);
        if have < need {
            return Err(mismatch(format!(
                "truncated: the file has {have} bytes after it"
            )));
        }
        if have > need {
            return Err(mismatch(format!(
                "the file has {} bytes more after them",
                have - need
            )));
        }
    }
    let bytes = input.read_up_to(need)?;
    if (bytes.len() as u64) < need {
        return Err(mismatch(format!(
            "truncated: the data holds {} bytes after it",
            bytes.len()
        )));
    }
    if !input.at_end()? {
        return Err(mismatch("the data goes on after them".to_string()));
    }
    Ok(bytes)
}

/// Reads an idx3 image file into `[N, 1, H, W]` floats in [0, 1], within
/// the local CLI's [`DataLimits::default`].
pub fn read_images(path: &Path) -> Result<Tensor> {
    read_images_with(path, &mut Budget::new(&DataLimits::default()))
}

/// Reads an idx3 image file into `[N, 1, H, W]` floats in [0, 1]: the
/// header's sizes are checked against the budget's limits (and the file's
/// length) before the pixels are read.
pub fn read_images_with(path: &Path, budget: &mut Budget) -> Result<Tensor> {
    let mut input = Input::open(path, budget.limits())?;
    let d = header(&mut input, path, IMAGES_MAGIC, "image", 3)?;
    let (n, h, w) = (d[0], d[1], d[2]);
    if h == 0 || w == 0 {
        return Err(Error::bad_file(path, format!("invalid image size {h}x{w}")));
    }
    budget
        .limits()
        .check_image(&path.display().to_string(), 1, h, w)?;
    let need = n
        .checked_mul(h)
        .and_then(|v| v.checked_mul(w))
        .ok_or_else(|| Error::bad_file(path, "header sizes overflow"))?;
    budget.take(path, n, h * w)?;
    let b = body(
        &mut input,
        path,
        16,
        need,
        &format!("{n} images of {h}x{w}"),
    )?;
    let t = Tensor::from_slice(&b)
        .view([n as i64, 1, h as i64, w as i64])
        .to_kind(Kind::Float)
        / 255.0;
    Ok(t)
}

/// Reads an idx1 label file into `[N]` int64, within the local CLI's
/// [`DataLimits::default`].
pub fn read_labels(path: &Path) -> Result<Tensor> {
    read_labels_with(path, &DataLimits::default())
}

/// Reads an idx1 label file into `[N]` int64; the header's count is
/// checked against `limits.max_images` before the labels are read.
pub fn read_labels_with(path: &Path, limits: &DataLimits) -> Result<Tensor> {
    let mut input = Input::open(path, limits)?;
    let n = header(&mut input, path, LABELS_MAGIC, "label", 1)?[0];
    if n > limits.max_images {
        return Err(Error::too_large(
            path.display().to_string(),
            "max_images",
            format!(
                "the header promises {n} labels, over the limit of {} images",
                limits.max_images
            ),
        ));
    }
    let b = body(&mut input, path, 8, n, &format!("{n} labels"))?;
    Ok(Tensor::from_slice(&b).to_kind(Kind::Int64))
}

/// Reads an image file and its label file, checking counts and label
/// range, within the local CLI's [`DataLimits::default`].
pub fn read_pair(images: &Path, labels: &Path, classes: i64) -> Result<super::Dataset> {
    read_pair_with(
        images,
        labels,
        classes,
        &mut Budget::new(&DataLimits::default()),
    )
}

/// Reads an image file and its label file within `budget`, checking
/// counts and label range.
pub fn read_pair_with(
    images: &Path,
    labels: &Path,
    classes: i64,
    budget: &mut Budget,
) -> Result<super::Dataset> {
    let y = read_labels_with(labels, budget.limits())?;
    let x = read_images_with(images, budget)?;
    let (nx, ny) = (x.size()[0], y.size()[0]);
    if nx != ny {
        return Err(Error::bad_file(
            labels,
            format!("{ny} labels but {} holds {nx} images", images.display()),
        ));
    }
    if ny > 0 {
        let max = y.max().int64_value(&[]);
        if max >= classes {
            return Err(Error::bad_file(
                labels,
                format!("label {max} out of range (expected 0..{classes})"),
            ));
        }
    }
    super::Dataset::new(x, y, classes, &images.display().to_string())
}

/// Writes `[N, 1, H, W]` floats in [0, 1] as an idx3 file (uncompressed).
pub fn write_images(path: &Path, images: &Tensor) -> Result<()> {
    let s = images.size();
    let (n, h, w) = (s[0], s[2], s[3]);
    let bytes: Vec<u8> = Vec::try_from(
        (images * 255.0)
            .round()
            .clamp(0.0, 255.0)
            .to_kind(Kind::Uint8)
            .contiguous()
            .view([-1]),
    )?;
    let mut out = Vec::with_capacity(16 + bytes.len());
    for v in [IMAGES_MAGIC, n as u32, h as u32, w as u32] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&bytes);
    write_atomic(path, &out)
}

/// Writes `[N]` labels as an idx1 file.
pub fn write_labels(path: &Path, labels: &Tensor) -> Result<()> {
    let v: Vec<i64> = Vec::try_from(labels.contiguous())?;
    let mut out = Vec::with_capacity(8 + v.len());
    out.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
    out.extend(v.iter().map(|&l| l as u8));
    write_atomic(path, &out)
}

/// Writes to a temp file next to `path` then renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Tensor, Tensor) {
        let x = crate::rng::uniform(&[5, 1, 4, 3], 101);
        let x = (x * 255.0).round() / 255.0;
        (x, Tensor::from_slice(&[0i64, 1, 2, 9, 3]))
    }

    #[test]
    fn round_trip_plain_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let (x, y) = sample();
        let (pi, pl) = (
            dir.path().join("i-idx3-ubyte"),
            dir.path().join("l-idx1-ubyte"),
        );
        write_images(&pi, &x).unwrap();
        write_labels(&pl, &y).unwrap();
        let ds = read_pair(&pi, &pl, 10).unwrap();
        assert_eq!(ds.images.size(), [5, 1, 4, 3]);
        assert!(ds.images.allclose(&x, 1e-6, 1e-6, false));
        assert_eq!(ds.labels_vec(), vec![0, 1, 2, 9, 3]);
        // gzip
        let gz = dir.path().join("i-idx3-ubyte.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&std::fs::read(&pi).unwrap()).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        assert!(read_images(&gz).unwrap().allclose(&x, 1e-6, 1e-6, false));
    }

    #[test]
    fn bad_files_name_file_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let (x, y) = sample();
        let (pi, pl) = (
            dir.path().join("i-idx3-ubyte"),
            dir.path().join("l-idx1-ubyte"),
        );
        write_images(&pi, &x).unwrap();
        write_labels(&pl, &y).unwrap();
        // wrong magic: a label file read as images
        let e = read_images(&pl).unwrap_err().to_string();
        assert!(
            e.contains("l-idx1-ubyte") && e.contains("wrong magic"),
            "{e}"
        );
        // truncated
        let bytes = std::fs::read(&pi).unwrap();
        let tr = dir.path().join("trunc-idx3-ubyte");
        std::fs::write(&tr, &bytes[..bytes.len() - 3]).unwrap();
        let e = read_images(&tr).unwrap_err().to_string();
        assert!(
            e.contains("trunc-idx3-ubyte") && e.contains("truncated"),
            "{e}"
        );
        std::fs::write(&tr, &bytes[..7]).unwrap();
        assert!(read_images(&tr)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        // count mismatch
        let pl3 = dir.path().join("three-idx1-ubyte");
        write_labels(&pl3, &Tensor::from_slice(&[0i64, 1, 2])).unwrap();
        let e = read_pair(&pi, &pl3, 10).unwrap_err().to_string();
        assert!(
            e.contains("three-idx1-ubyte") && e.contains("3 labels"),
            "{e}"
        );
        // label out of range
        let e = read_pair(&pi, &pl, 5).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
        // corrupt gzip
        let gz = dir.path().join("bad.gz");
        std::fs::write(&gz, [0x1f, 0x8b, 1, 2, 3]).unwrap();
        assert!(read_images(&gz).unwrap_err().to_string().contains("gzip"));
        // missing file
        let e = read_images(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }
}
