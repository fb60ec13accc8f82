//! Bounds on the data deadbolt reads: image dimensions, counts, decoded
//! and inflated bytes, class counts, folder listings. Every reader checks
//! them *before* it allocates what a header, a card or a file name asks
//! for, and a gzip stream is inflated at most to its bound (never to its
//! end first), so a file that lies about its size is refused cheaply with
//! [`Error::TooLarge`] naming the file or field and the bound.
//!
//! [`DataLimits::default`] suits the local CLI (the user's own files):
//! MNIST (28x28), CIFAR-10 (32x32) and 224x224 images pass, yet a
//! gzip bomb or a header claiming gigabytes is still refused. The services
//! build theirs from the operator's `[limits]` (much smaller defaults: see
//! `deadbolt_runtime::policy::Limits`).

use std::path::Path;

use crate::error::{Error, Result};

/// Upper bounds on one load of data (one dataset spec, one clean-data
/// folder, one model card).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataLimits {
    /// Pixels (H x W) of one image. Default 256 x 256 = 65,536: 224x224
    /// (ImageNet-sized) inputs pass; badnet-cnn's `fc1` grows with the
    /// image, and at 256x256 it is already ~61M weights.
    pub max_image_pixels: u64,
    /// Channels of one image. Default 4 (grey is 1, RGB 3).
    pub max_channels: u64,
    /// Images of one load, all its files together. Default 2,000,000
    /// (MNIST has 70,000, CIFAR-10 60,000).
    pub max_images: u64,
    /// Decoded pixel bytes of one load (one byte per channel value, all
    /// files together; the float tensors built from them are 4x this).
    /// Default 4 GiB.
    pub max_decoded_bytes: u64,
    /// Bytes of one data file as stored, or once inflated when gzipped
    /// (inflating stops here). Default 4 GiB (MNIST's largest file
    /// inflates to 47 MB).
    pub max_inflated_bytes: u64,
    /// Classes of a model card or a dataset. Default 1000.
    pub max_classes: u64,
    /// Directory entries an image folder may list, all its class folders
    /// together (listing stops here). Default 2,100,000: `max_images`
    /// and room for stray files.
    pub max_folder_files: u64,
}

impl Default for DataLimits {
    fn default() -> Self {
        DataLimits {
            max_image_pixels: 256 * 256,
            max_channels: 4,
            max_images: 2_000_000,
            max_decoded_bytes: 4 << 30,
            max_inflated_bytes: 4 << 30,
            max_classes: 1000,
            max_folder_files: 2_100_000,
        }
    }
}

impl DataLimits {
    /// Refuses an image shape over the bounds; `what` names the file or
    /// field that gave the shape.
    pub fn check_image(&self, what: &str, c: u64, h: u64, w: u64) -> Result<()> {
        if c > self.max_channels {
            return Err(Error::too_large(
                what,
                "max_channels",
                format!(
                    "images of {c} channels exceed the limit of {}",
                    self.max_channels
                ),
            ));
        }
        let pixels = h.saturating_mul(w);
        if pixels > self.max_image_pixels {
            return Err(Error::too_large(
                what,
                "max_image_pixels",
                format!(
                    "images of {h}x{w} = {pixels} pixels exceed the limit of {} pixels",
                    self.max_image_pixels
                ),
            ));
        }
        Ok(())
    }

    /// Refuses a class count over the bound; `what` names the field.
    pub fn check_classes(&self, what: &str, classes: u64) -> Result<()> {
        if classes > self.max_classes {
            return Err(Error::too_large(
                what,
                "max_classes",
                format!("{classes} classes exceed the limit of {}", self.max_classes),
            ));
        }
        Ok(())
    }

    /// Refuses a file whose stored size is over `max_inflated_bytes`.
    pub fn check_file_len(&self, path: &Path, len: u64) -> Result<()> {
        if len > self.max_inflated_bytes {
            return Err(Error::too_large(
                path.display().to_string(),
                "max_inflated_bytes",
                format!(
                    "{len} bytes exceed the limit of {} bytes for one data file",
                    self.max_inflated_bytes
                ),
            ));
        }
        Ok(())
    }
}

/// What one load has taken of its [`DataLimits`] so far: images and
/// decoded bytes are counted over all the files of the load.
#[derive(Debug)]
pub struct Budget<'a> {
    limits: &'a DataLimits,
    images: u64,
    bytes: u64,
}

impl<'a> Budget<'a> {
    pub fn new(limits: &'a DataLimits) -> Self {
        Budget {
            limits,
            images: 0,
            bytes: 0,
        }
    }

    pub fn limits(&self) -> &'a DataLimits {
        self.limits
    }

    /// Takes `images` images of `bytes_per_image` decoded bytes each, or
    /// refuses (naming `what`) when the load would go over its bounds.
    /// Called before the pixels are allocated.
    pub fn take(&mut self, what: &Path, images: u64, bytes_per_image: u64) -> Result<()> {
        let l = self.limits;
        let n = self.images.saturating_add(images);
        if n > l.max_images {
            return Err(Error::too_large(
                what.display().to_string(),
                "max_images",
                format!(
                    "{images} more images make {n}, over the limit of {} images",
                    l.max_images
                ),
            ));
        }
        let bytes = self
            .bytes
            .saturating_add(images.saturating_mul(bytes_per_image));
        if bytes > l.max_decoded_bytes {
            return Err(Error::too_large(
                what.display().to_string(),
                "max_decoded_bytes",
                format!(
                    "{images} images of {bytes_per_image} bytes make {bytes} decoded bytes, over the limit of {}",
                    l.max_decoded_bytes
                ),
            ));
        }
        self.images = n;
        self.bytes = bytes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_common_shapes_and_refuse_large_ones() {
        let l = DataLimits::default();
        for (c, h, w) in [(1, 28, 28), (3, 32, 32), (3, 224, 224)] {
            l.check_image("x", c, h, w).unwrap();
        }
        let e = l.check_image("x", 1, 1024, 1024).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("max_image_pixels"), "{e}");
        let e = l.check_image("x", 64, 8, 8).unwrap_err().to_string();
        assert!(e.contains("max_channels"), "{e}");
        let e = l
            .check_classes("classes", 4_000_000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("classes") && e.contains("max_classes"), "{e}");
    }

    #[test]
    fn budget_counts_over_files() {
        let l = DataLimits {
            max_images: 10,
            max_decoded_bytes: 100,
            ..DataLimits::default()
        };
        let mut b = Budget::new(&l);
        b.take(Path::new("a"), 6, 10).unwrap();
        let e = b.take(Path::new("b"), 5, 1).unwrap_err().to_string();
        assert!(e.contains("b") && e.contains("max_images"), "{e}");
        let e = b.take(Path::new("c"), 3, 15).unwrap_err().to_string();
        assert!(e.contains("max_decoded_bytes"), "{e}");
        b.take(Path::new("d"), 4, 1).unwrap();
    }
}
