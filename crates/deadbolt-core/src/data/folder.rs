//! Clean data for a model deadbolt did not train. One folder, in one of
//! three layouts, told apart by what it holds:
//! - **MNIST IDX** (`t10k-*-idx?-ubyte`, `train-*`, gzipped or not);
//! - **CIFAR-10 binary** (`test_batch.bin`, `data_batch_*.bin`);
//! - **an image folder** (`<class>/*.png|jpg|jpeg`, torchvision's
//!   `ImageFolder` layout). Classes are the card's `class_names` in that
//!   order when given, else the sub-folder names sorted (as `ImageFolder`
//!   sorts them, by byte order).
//!
//! Every image must already have the card's height and width (no silent
//! resizing: a resized image is not what the model was trained on); grey
//! images are widened to RGB for a 3-channel model and RGB narrowed to grey
//! (luma) for a 1-channel one.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tch::{Kind, Tensor};

use super::mnist::idx_file;
use super::{cifar, idx, mnist, Budget, DataLimits, Dataset};
use crate::error::{Error, Result};

/// Which part of an IDX or CIFAR-10 folder to read (an image folder has
/// no parts: every image is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
    All,
}

impl FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            "all" => Ok(Split::All),
            other => Err(Error::invalid(
                "split",
                format!("unknown split `{other}` (train, test or all)"),
            )),
        }
    }
}

/// The layout the data was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    ImageFolder,
    MnistIdx,
    Cifar10,
}

/// Clean labelled images, float32 in [0, 1] (not normalised).
#[derive(Debug)]
pub struct Clean {
    pub data: Dataset,
    pub source: Source,
    /// Class names by label (image folders: the folder names; other
    /// layouts: empty, the card names them).
    pub classes: Vec<String>,
}

const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Loads the clean data of `dir` for a model of input `(c, h, w)` and
/// `classes` classes; `class_names` (the card's, may be empty) fixes the
/// class order of an image folder. Within the local CLI's
/// [`DataLimits::default`] (see [`load_clean_with`]).
pub fn load_clean(
    dir: &Path,
    split: Split,
    class_names: &[String],
    shape: (i64, i64, i64),
    classes: i64,
) -> Result<Clean> {
    load_clean_with(
        dir,
        split,
        class_names,
        shape,
        classes,
        &DataLimits::default(),
    )
}

/// [`load_clean`] within `limits`: the card's shape and class count are
/// checked first, IDX and CIFAR headers before their pixels are read, and
/// an image folder while it is read (entries counted as they are listed,
/// each image's header dimensions checked before it is decoded, images
/// and decoded bytes counted before each decode).
pub fn load_clean_with(
    dir: &Path,
    split: Split,
    class_names: &[String],
    (c, h, w): (i64, i64, i64),
    classes: i64,
    limits: &DataLimits,
) -> Result<Clean> {
    if c < 1 || h < 1 || w < 1 {
        return Err(Error::invalid(
            "input_shape",
            format!("[C, H, W] must be positive, got [{c}, {h}, {w}]"),
        ));
    }
    limits.check_image("input_shape", c as u64, h as u64, w as u64)?;
    limits.check_classes("classes", classes.max(0) as u64)?;
    let mut budget = Budget::new(limits);
    if !dir.is_dir() {
        return Err(Error::bad_file(
            dir,
            "clean data folder not found (an image folder <class>/*.png|jpg, MNIST IDX files or CIFAR-10 batches)",
        ));
    }
    let data = if has_idx(dir) {
        let d = load_idx(dir, split, classes, &mut budget)?;
        (d, Source::MnistIdx, Vec::new())
    } else if dir.join("test_batch.bin").is_file() || has_cifar_train(dir)? {
        let d = load_cifar(dir, split, &mut budget)?;
        (d, Source::Cifar10, Vec::new())
    } else {
        let (d, names) = load_image_folder(dir, class_names, (c, h, w), classes, &mut budget)?;
        (d, Source::ImageFolder, names)
    };
    let (data, source, names) = data;
    let (dc, dh, dw) = data.image_shape();
    if (dc, dh, dw) != (c, h, w) {
        return Err(Error::bad_file(
            dir,
            format!(
                "images are {dc}x{dh}x{dw} (C x H x W) but the card's input_shape is {c}x{h}x{w}"
            ),
        ));
    }
    if data.classes > classes {
        return Err(Error::bad_file(
            dir,
            format!(
                "the data has {} classes but the card's classes is {classes}",
                data.classes
            ),
        ));
    }
    if data.is_empty() {
        return Err(Error::EmptyDataset(format!("{}: no images", dir.display())));
    }
    let data = Dataset { classes, ..data };
    tracing::info!(dir = %dir.display(), ?source, images = data.len(), "clean data loaded");
    Ok(Clean {
        data,
        source,
        classes: names,
    })
}

fn has_idx(dir: &Path) -> bool {
    idx_file(dir, mnist::TEST_IMAGES).is_some() || idx_file(dir, mnist::TRAIN_IMAGES).is_some()
}

fn has_cifar_train(dir: &Path) -> Result<bool> {
    Ok(!cifar::train_files(dir)?.is_empty())
}

fn concat(parts: Vec<Dataset>, classes: i64, what: &Path) -> Result<Dataset> {
    if parts.len() == 1 {
        return Ok(parts.into_iter().next().expect("one part"));
    }
    Dataset::new(
        Tensor::cat(&parts.iter().map(|d| &d.images).collect::<Vec<_>>(), 0),
        Tensor::cat(&parts.iter().map(|d| &d.labels).collect::<Vec<_>>(), 0),
        classes,
        &what.display().to_string(),
    )
}

fn load_idx(dir: &Path, split: Split, classes: i64, budget: &mut Budget) -> Result<Dataset> {
    let mut pair = |images: &str, labels: &str| -> Result<Dataset> {
        let x = idx_file(dir, images).ok_or_else(|| {
            Error::bad_file(dir.join(images), format!("missing (split {split:?})"))
        })?;
        let y = idx_file(dir, labels).ok_or_else(|| {
            Error::bad_file(dir.join(labels), "missing: the labels of the images")
        })?;
        idx::read_pair_with(&x, &y, classes, budget)
    };
    let test = (mnist::TEST_IMAGES, mnist::TEST_LABELS);
    let train = (mnist::TRAIN_IMAGES, mnist::TRAIN_LABELS);
    match split {
        Split::Test => pair(test.0, test.1),
        Split::Train => pair(train.0, train.1),
        Split::All => {
            let mut parts = Vec::new();
            if idx_file(dir, mnist::TRAIN_IMAGES).is_some() {
                parts.push(pair(train.0, train.1)?);
            }
            if idx_file(dir, mnist::TEST_IMAGES).is_some() {
                parts.push(pair(test.0, test.1)?);
            }
            concat(parts, classes, dir)
        }
    }
}

fn load_cifar(dir: &Path, split: Split, budget: &mut Budget) -> Result<Dataset> {
    let train = |budget: &mut Budget| -> Result<Dataset> {
        let files = cifar::train_files(dir)?;
        if files.is_empty() {
            return Err(Error::bad_file(
                dir,
                "no data_batch_*.bin files (split train)",
            ));
        }
        let parts = files
            .iter()
            .map(|p| cifar::read_batch_with(p, budget))
            .collect::<Result<Vec<_>>>()?;
        concat(parts, cifar::CLASSES, dir)
    };
    match split {
        Split::Test => read_cifar_test(dir, budget),
        Split::Train => train(budget),
        Split::All => {
            let mut parts = Vec::new();
            if has_cifar_train(dir)? {
                parts.push(train(budget)?);
            }
            if dir.join("test_batch.bin").is_file() {
                parts.push(read_cifar_test(dir, budget)?);
            }
            concat(parts, cifar::CLASSES, dir)
        }
    }
}

fn read_cifar_test(dir: &Path, budget: &mut Budget) -> Result<Dataset> {
    let p = dir.join("test_batch.bin");
    if !p.is_file() {
        return Err(Error::bad_file(&p, "missing (split test)"));
    }
    cifar::read_batch_with(&p, budget)
}

/// Counts the directory entries an image folder lists, all its folders
/// together, and refuses past `max_folder_files` (while listing).
struct Listing {
    seen: u64,
    max: u64,
}

impl Listing {
    /// The entries of `dir`, counted as they are read.
    fn read_dir(&mut self, dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            self.seen += 1;
            if self.seen > self.max {
                return Err(Error::too_large(
                    dir.display().to_string(),
                    "max_folder_files",
                    format!(
                        "the image folder lists more than {} files and folders",
                        self.max
                    ),
                ));
            }
            if let Ok(e) = e {
                out.push(e);
            }
        }
        Ok(out)
    }
}

/// The image files of each class folder found, by folder name.
type ClassFiles = BTreeMap<String, Vec<PathBuf>>;

/// Class folders of an image folder: the card's names in order (each must
/// exist as a folder, and no other folder may hold images), else the
/// sub-folders sorted. Returns them with the image files of each found
/// folder (the card may name a class without a folder).
fn class_dirs(
    dir: &Path,
    class_names: &[String],
    classes: i64,
    listing: &mut Listing,
) -> Result<(Vec<String>, ClassFiles)> {
    let mut found: Vec<String> = listing
        .read_dir(dir)?
        .into_iter()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| !n.starts_with('.'))
        .collect();
    found.sort();
    let mut files = BTreeMap::new();
    for f in &found {
        match image_files(&dir.join(f), listing) {
            Ok(v) => {
                files.insert(f.clone(), v);
            }
            Err(e @ Error::TooLarge { .. }) => return Err(e),
            // unreadable: holds no images here; reading it names the error
            Err(_) => {}
        }
    }
    if !files.values().any(|v| !v.is_empty()) {
        return Err(Error::bad_file(
            dir,
            "no images: expected one sub-folder per class (<class>/*.png|jpg), MNIST IDX files or CIFAR-10 batches",
        ));
    }
    if class_names.is_empty() {
        if found.len() as i64 != classes {
            return Err(Error::bad_file(
                dir,
                format!(
                    "{} class folders ({}) but the card's classes is {classes}; give the card's class_names to map folders to labels",
                    found.len(),
                    preview(&found)
                ),
            ));
        }
        return Ok((found, files));
    }
    if let Some(extra) = found.iter().find(|f| !class_names.contains(f)) {
        return Err(Error::bad_file(
            dir.join(extra),
            "a class folder not named in the card's class_names",
        ));
    }
    Ok((class_names.to_vec(), files))
}

/// The image files of a class folder, sorted.
fn image_files(dir: &Path, listing: &mut Listing) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = listing
        .read_dir(dir)?
        .into_iter()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn preview(names: &[String]) -> String {
    let mut s = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        s.push_str(", ...");
    }
    s
}

fn load_image_folder(
    dir: &Path,
    class_names: &[String],
    (c, h, w): (i64, i64, i64),
    classes: i64,
    budget: &mut Budget,
) -> Result<(Dataset, Vec<String>)> {
    if c != 1 && c != 3 {
        return Err(Error::invalid(
            "input_shape",
            format!("image folders hold grey or RGB images; the card asks for {c} channels"),
        ));
    }
    let mut listing = Listing {
        seen: 0,
        max: budget.limits().max_folder_files,
    };
    let (names, mut files) = class_dirs(dir, class_names, classes, &mut listing)?;
    let per_image = (c * h * w) as u64;
    // the decoder's own bound on what it allocates: the image, its
    // conversion and room for its workings
    let mut decode_limits = image::Limits::default();
    decode_limits.max_alloc = Some(per_image.saturating_mul(16).max(64 << 20));
    let mut pixels: Vec<u8> = Vec::new();
    let mut labels: Vec<i64> = Vec::new();
    for (label, name) in names.iter().enumerate() {
        let cdir = dir.join(name);
        let list = match files.remove(name) {
            Some(v) => v,
            None if !cdir.is_dir() => continue, // a class named in the card without images
            None => image_files(&cdir, &mut listing)?,
        };
        for f in list {
            let mut reader = image::ImageReader::open(&f)
                .map_err(|e| Error::io(&f, e))?
                .with_guessed_format()
                .map_err(|e| Error::io(&f, e))?;
            reader.limits(decode_limits.clone());
            let decoder = reader
                .into_decoder()
                .map_err(|e| Error::bad_file(&f, format!("cannot read image header: {e}")))?;
            // the header's size, before anything is decoded
            let (iw, ih) = image::ImageDecoder::dimensions(&decoder);
            if (iw as i64, ih as i64) != (w, h) {
                return Err(Error::bad_file(
                    &f,
                    format!(
                        "image is {iw}x{ih} but the card's input_shape wants {w}x{h} (W x H); resize it as the model was trained",
                    ),
                ));
            }
            budget.take(&f, 1, per_image)?;
            let img = image::DynamicImage::from_decoder(decoder)
                .map_err(|e| Error::bad_file(&f, format!("cannot decode image: {e}")))?;
            if c == 1 {
                pixels.extend_from_slice(img.to_luma8().as_raw());
            } else {
                // HWC -> CHW
                let rgb = img.to_rgb8();
                let raw = rgb.as_raw();
                let plane = (h * w) as usize;
                let start = pixels.len();
                pixels.resize(start + 3 * plane, 0);
                for (i, px) in raw.chunks_exact(3).enumerate() {
                    for ch in 0..3 {
                        pixels[start + ch * plane + i] = px[ch];
                    }
                }
            }
            labels.push(label as i64);
        }
    }
    if labels.is_empty() {
        return Err(Error::bad_file(
            dir,
            "no images (png, jpg) in the class folders",
        ));
    }
    let n = labels.len() as i64;
    let images = Tensor::from_slice(&pixels)
        .view([n, c, h, w])
        .to_kind(Kind::Float)
        / 255.0;
    let data = Dataset::new(
        images,
        Tensor::from_slice(&labels),
        classes,
        &dir.display().to_string(),
    )?;
    Ok((data, names))
}

/// Writes every `step`-th image of `data` (1- or 3-channel) as
/// `<out>/<label>/<index>.png`: the image-folder layout [`load_clean`]
/// reads (pixels rounded to 8 bits, so 8-bit data round-trips exactly).
/// Returns the number of images written.
pub fn write_image_folder(data: &Dataset, out: &Path, step: usize) -> Result<usize> {
    let (c, h, w) = data.image_shape();
    if c != 1 && c != 3 {
        return Err(Error::invalid(
            "images",
            format!("{c} channels: an image folder holds grey or RGB images"),
        ));
    }
    let bytes: Vec<u8> = Vec::try_from(
        (&data.images * 255.0)
            .round()
            .clamp(0.0, 255.0)
            .to_kind(Kind::Uint8)
            // NCHW -> NHWC, as image files store pixels
            .permute([0, 2, 3, 1])
            .contiguous()
            .flatten(0, -1),
    )
    .map_err(|e: tch::TchError| Error::invalid("images", e.to_string()))?;
    let labels = data.labels_vec();
    let per = (c * h * w) as usize;
    let mut n = 0;
    for i in (0..labels.len()).step_by(step.max(1)) {
        let d = out.join(labels[i].to_string());
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        let px = bytes[i * per..(i + 1) * per].to_vec();
        let f = d.join(format!("{i:05}.png"));
        let saved = if c == 1 {
            image::GrayImage::from_raw(w as u32, h as u32, px).map(|m| m.save(&f))
        } else {
            image::RgbImage::from_raw(w as u32, h as u32, px).map(|m| m.save(&f))
        };
        saved
            .expect("the buffer holds h x w pixels")
            .map_err(|e| Error::bad_file(&f, e.to_string()))?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pinned_checksums_name_the_changed_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.bin"), b"abc").unwrap();
        let good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let mut want = std::collections::BTreeMap::new();
        want.insert("a.bin".to_string(), good.to_string());
        super::super::verify_checksums(dir.path(), &want).unwrap();
        std::fs::write(dir.path().join("a.bin"), b"abd").unwrap();
        let e = super::super::verify_checksums(dir.path(), &want)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.bin") && e.contains("sha256 mismatch"), "{e}");
        want.insert("../etc".to_string(), good.to_string());
        let e = super::super::verify_checksums(dir.path(), &want)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dataset.sha256"), "{e}");
    }

    #[test]
    fn written_image_folders_read_back_exactly() {
        for c in [1i64, 3] {
            let dir = tempfile::tempdir().unwrap();
            let x = Tensor::randint(256, [6, c, 4, 5], (Kind::Uint8, tch::Device::Cpu))
                .to_kind(Kind::Float)
                / 255.0;
            let y = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]);
            let data = Dataset::new(x, y, 3, "t").unwrap();
            assert_eq!(write_image_folder(&data, dir.path(), 1).unwrap(), 6);
            let back = load_clean(dir.path(), Split::All, &[], (c, 4, 5), 3).unwrap();
            assert_eq!(back.source, Source::ImageFolder);
            // the folder reads class by class: compare as sets of (label, image)
            let key = |d: &Dataset| {
                let mut v: Vec<(i64, Vec<u8>)> = (0..d.len())
                    .map(|i| {
                        let px = (d.images.get(i) * 255.0).round().to_kind(Kind::Uint8);
                        (
                            d.labels.int64_value(&[i]),
                            Vec::try_from(px.flatten(0, -1)).unwrap(),
                        )
                    })
                    .collect();
                v.sort();
                v
            };
            assert_eq!(key(&back.data), key(&data), "{c} channels");
            let two = tempfile::tempdir().unwrap();
            assert_eq!(write_image_folder(&data, two.path(), 2).unwrap(), 3);
        }
    }

    #[test]
    fn split_parses_and_names_the_field() {
        assert_eq!("all".parse::<Split>().unwrap(), Split::All);
        let e = "val".parse::<Split>().unwrap_err().to_string();
        assert!(e.contains("split") && e.contains("val"), "{e}");
    }

    #[test]
    fn rgb_folder_in_card_order_and_idx() {
        let dir = tempfile::tempdir().unwrap();
        for (k, cls) in ["cat", "dog"].iter().enumerate() {
            let d = dir.path().join(cls);
            std::fs::create_dir_all(&d).unwrap();
            image::RgbImage::from_fn(4, 3, |x, _| image::Rgb([k as u8 * 100, x as u8, 7]))
                .save(d.join("a.png"))
                .unwrap();
        }
        let c = load_clean(
            dir.path(),
            Split::Test,
            &names(&["dog", "cat"]),
            (3, 3, 4),
            2,
        )
        .unwrap();
        assert_eq!(c.source, Source::ImageFolder);
        assert_eq!(c.classes, names(&["dog", "cat"]));
        assert_eq!(c.data.labels_vec(), vec![0, 1]);
        // dog (label 0) has red channel 100/255; channel planes are CHW
        let red = c.data.images.double_value(&[0, 0, 0, 0]);
        assert!((red - 100.0 / 255.0).abs() < 1e-6);
        assert!((c.data.images.double_value(&[0, 1, 0, 3]) - 3.0 / 255.0).abs() < 1e-6);
        assert!((c.data.images.double_value(&[0, 2, 2, 2]) - 7.0 / 255.0).abs() < 1e-6);
        // sorted folder order without names; a folder outside the names is refused
        let c = load_clean(dir.path(), Split::Test, &[], (3, 3, 4), 2).unwrap();
        assert_eq!(c.classes, names(&["cat", "dog"]));
        let e = load_clean(
            dir.path(),
            Split::Test,
            &names(&["cat", "bird"]),
            (3, 3, 4),
            2,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("dog") && e.contains("class_names"), "{e}");
        let e = load_clean(dir.path(), Split::Test, &[], (3, 3, 4), 3)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("2 class folders") && e.contains("class_names"),
            "{e}"
        );

        // IDX: test split by default, all = train + test
        let idx_dir = tempfile::tempdir().unwrap();
        let x = Tensor::rand([6, 1, 5, 5], (Kind::Float, tch::Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]);
        idx::write_images(&idx_dir.path().join(mnist::TEST_IMAGES), &x).unwrap();
        idx::write_labels(&idx_dir.path().join(mnist::TEST_LABELS), &y).unwrap();
        let c = load_clean(idx_dir.path(), Split::Test, &[], (1, 5, 5), 3).unwrap();
        assert_eq!((c.source, c.data.len()), (Source::MnistIdx, 6));
        let e = load_clean(idx_dir.path(), Split::Train, &[], (1, 5, 5), 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains(mnist::TRAIN_IMAGES), "{e}");
        let e = load_clean(idx_dir.path(), Split::Test, &[], (1, 28, 28), 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("input_shape"), "{e}");
    }

    /// A PNG whose header claims `w` x `h` pixels and holds almost none.
    fn lying_png(w: u32, h: u32) -> Vec<u8> {
        fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            let mut crc = flate2::Crc::new();
            crc.update(kind);
            crc.update(data);
            out.extend_from_slice(&crc.sum().to_be_bytes());
        }
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = w.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit grey
        chunk(&mut out, b"IHDR", &ihdr);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut z, &[0u8; 64]).unwrap();
        chunk(&mut out, b"IDAT", &z.finish().unwrap());
        chunk(&mut out, b"IEND", &[]);
        out
    }

    #[test]
    fn image_folders_are_bounded_while_read() {
        let dir = tempfile::tempdir().unwrap();
        let x = Tensor::randint(256, [6, 1, 3, 4], (Kind::Uint8, tch::Device::Cpu))
            .to_kind(Kind::Float)
            / 255.0;
        let y = Tensor::from_slice(&[0i64, 1, 0, 1, 0, 1]);
        write_image_folder(&Dataset::new(x, y, 2, "t").unwrap(), dir.path(), 1).unwrap();
        let load = |limits: &DataLimits| {
            load_clean_with(dir.path(), Split::All, &[], (1, 3, 4), 2, limits)
        };
        let too_large = |e: Error, limit: &str| match e {
            Error::TooLarge { limit: l, .. } if l == limit => {}
            other => panic!("expected {limit}: {other}"),
        };
        assert_eq!(load(&DataLimits::default()).unwrap().data.len(), 6);
        // 2 class folders + 6 files: listing stops past 5 entries
        let l = DataLimits {
            max_folder_files: 5,
            ..DataLimits::default()
        };
        too_large(load(&l).unwrap_err(), "max_folder_files");
        let l = DataLimits {
            max_images: 5,
            ..DataLimits::default()
        };
        too_large(load(&l).unwrap_err(), "max_images");
        let l = DataLimits {
            max_decoded_bytes: 5 * 12,
            ..DataLimits::default()
        };
        too_large(load(&l).unwrap_err(), "max_decoded_bytes");
        // the card's shape and class count, before any file is read
        let l = DataLimits {
            max_image_pixels: 8,
            ..DataLimits::default()
        };
        too_large(load(&l).unwrap_err(), "max_image_pixels");
        let l = DataLimits {
            max_classes: 1,
            ..DataLimits::default()
        };
        too_large(load(&l).unwrap_err(), "max_classes");
        // an image whose header claims 100000x100000 is refused from its
        // header, not decoded
        std::fs::write(dir.path().join("0/zz.png"), lying_png(100_000, 100_000)).unwrap();
        let e = load(&DataLimits::default()).unwrap_err().to_string();
        assert!(
            e.contains("zz.png") && e.contains("100000x100000") && e.contains("input_shape"),
            "{e}"
        );
    }
}
