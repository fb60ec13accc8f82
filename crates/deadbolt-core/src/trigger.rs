//! Triggers: a per-pixel mask in [0, 1] and a pattern, stamped as
//! `x' = (1 - m) x + m p` where `m > 0`; pixels with `m == 0` are untouched
//! (bit-exact). BadNets patches, blends and reverse-engineered (synthetic)
//! triggers are all of this form. An attack's trigger ([`AttackTrigger`])
//! is one of these, or an additive signal ([`sig`]) or a warp ([`wanet`]).

pub mod sig;
pub mod wanet;

use std::path::Path;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::spec::{BlendPattern, PatchPattern, TriggerSpec};

/// The trigger of an attack, as it acts on images.
#[derive(Debug, Clone)]
pub enum AttackTrigger {
    /// `x' = (1 - m) x + m p`: a patch, a blend or a synthetic trigger.
    Stamp(Trigger),
    /// SIG: a sinusoid added and clipped.
    Signal(sig::Signal),
    /// WaNet: a fixed warp.
    Warp(wanet::Warp),
}

impl From<Trigger> for AttackTrigger {
    fn from(t: Trigger) -> Self {
        AttackTrigger::Stamp(t)
    }
}

impl AttackTrigger {
    /// Builds the trigger a spec describes for images of shape `(c, h, w)`.
    pub fn from_spec(spec: &TriggerSpec, (c, h, w): (i64, i64, i64)) -> Result<AttackTrigger> {
        Ok(match spec {
            TriggerSpec::Patch { .. } | TriggerSpec::Blend { .. } => {
                AttackTrigger::Stamp(Trigger::from_spec(spec, (c, h, w))?)
            }
            TriggerSpec::Sig {
                delta,
                test_delta,
                frequency,
            } => AttackTrigger::Signal(sig::Signal::new(
                (c, h, w),
                *delta,
                test_delta.unwrap_or(*delta),
                *frequency,
            )),
            TriggerSpec::Wanet {
                k,
                s,
                grid_rescale,
                seed,
                ..
            } => {
                if *k < 2 || *k > h || *k > w {
                    return Err(Error::invalid(
                        "attack.trigger.k",
                        format!("a {k}x{k} control grid does not fit the {h}x{w} image"),
                    ));
                }
                AttackTrigger::Warp(wanet::Warp::new((c, h, w), *k, *s, *grid_rescale, *seed))
            }
        })
    }

    /// The triggered version of a batch `[N, C, H, W]` as the attack is
    /// measured (test time), on the batch's device.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        match self {
            AttackTrigger::Stamp(t) => t.apply(x),
            AttackTrigger::Signal(s) => sig::Signal::add(x, &s.test),
            AttackTrigger::Warp(w) => w.apply(x),
        }
    }

    /// The poisoned version of training images (SIG: the training
    /// amplitude; otherwise as [`AttackTrigger::apply`]).
    pub fn apply_poison(&self, x: &Tensor) -> Tensor {
        match self {
            AttackTrigger::Signal(s) => sig::Signal::add(x, &s.train),
            other => other.apply(x),
        }
    }

    pub fn to_device(&self, device: Device) -> AttackTrigger {
        match self {
            AttackTrigger::Stamp(t) => AttackTrigger::Stamp(t.to_device(device)),
            AttackTrigger::Signal(s) => AttackTrigger::Signal(s.to_device(device)),
            AttackTrigger::Warp(w) => AttackTrigger::Warp(w.to_device(device)),
        }
    }

    /// `(C, H, W)` of the images the trigger is built for.
    pub fn shape(&self) -> (i64, i64, i64) {
        let s = match self {
            AttackTrigger::Stamp(t) => t.pattern.size(),
            AttackTrigger::Signal(s) => s.test.size(),
            AttackTrigger::Warp(w) => {
                let g = w.grid.size();
                vec![w.channels, g[1], g[2]]
            }
        };
        (s[0], s[1], s[2])
    }

    /// Where the trigger acts ([`Trigger::strong_region`]); a signal or a
    /// warp acts on the whole image.
    pub fn strong_region(&self) -> (i64, i64, i64, i64) {
        match self {
            AttackTrigger::Stamp(t) => t.strong_region(),
            other => {
                let (_, h, w) = other.shape();
                (0, 0, h, w)
            }
        }
    }
}

#[derive(Debug)]
pub struct Trigger {
    /// `[1, H, W]` in [0, 1].
    pub mask: Tensor,
    /// `[C, H, W]` in [0, 1].
    pub pattern: Tensor,
}

impl Clone for Trigger {
    fn clone(&self) -> Self {
        Trigger {
            mask: self.mask.shallow_clone(),
            pattern: self.pattern.shallow_clone(),
        }
    }
}

impl Trigger {
    /// Builds the trigger a spec describes for images of shape `(c, h, w)`.
    pub fn from_spec(spec: &TriggerSpec, (c, h, w): (i64, i64, i64)) -> Result<Trigger> {
        let opts = (Kind::Float, Device::Cpu);
        match spec {
            TriggerSpec::Patch {
                size,
                position,
                pattern,
                value,
            } => {
                let s = *size;
                let (r, col) = position.top_left(s, h, w);
                // checked: a position near i64::MAX must not wrap into the image
                let past =
                    |at: i64, side: i64| at < 0 || at.checked_add(s).is_none_or(|e| e > side);
                if s < 1 || s > h || s > w || past(r, h) || past(col, w) {
                    return Err(Error::invalid(
                        "attack.trigger.size",
                        format!("a {s}x{s} patch at row {r}, col {col} does not fit in the {h}x{w} image"),
                    ));
                }
                let patch = match pattern {
                    PatchPattern::Solid => Tensor::full([c, s, s], *value, opts),
                    PatchPattern::Checkerboard => {
                        let i = Tensor::arange(s, (Kind::Int64, Device::Cpu));
                        let board = (i.unsqueeze(1) + i.unsqueeze(0)).remainder(2).eq(0);
                        board
                            .to_kind(Kind::Float)
                            .unsqueeze(0)
                            .expand([c, s, s], true)
                            * *value
                    }
                    PatchPattern::Image(p) => load_png(p, c, s, s, "attack.trigger.pattern")?,
                };
                let mask = Tensor::zeros([1, h, w], opts);
                let _ = mask.narrow(1, r, s).narrow(2, col, s).fill_(1.0);
                let pattern = Tensor::zeros([c, h, w], opts);
                pattern.narrow(1, r, s).narrow(2, col, s).copy_(&patch);
                Ok(Trigger { mask, pattern })
            }
            TriggerSpec::Blend { alpha, pattern } => {
                let pattern = match pattern {
                    BlendPattern::Noise { seed } => seeded_uniform(*seed, &[c, h, w]),
                    BlendPattern::Image(p) => load_png(p, c, h, w, "attack.trigger.pattern")?,
                };
                Ok(Trigger {
                    mask: Tensor::full([1, h, w], *alpha, opts),
                    pattern,
                })
            }
            TriggerSpec::Sig { .. } | TriggerSpec::Wanet { .. } => Err(Error::invalid(
                "attack.trigger.kind",
                format!(
                    "{} is not a mask-and-pattern trigger (see AttackTrigger)",
                    spec.kind_str()
                ),
            )),
        }
    }

    /// Stamps the trigger on a batch `[N, C, H, W]` (on the batch's device).
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let dev = x.device();
        let m = self.mask.to_device(dev);
        let p = self.pattern.to_device(dev);
        let blended: Tensor = x * (1.0 - &m) + &p * &m;
        blended.where_self(&m.gt(0.0), x)
    }

    pub fn to_device(&self, device: Device) -> Trigger {
        Trigger {
            mask: self.mask.to_device(device),
            pattern: self.pattern.to_device(device),
        }
    }

    /// Bounding box `(row, col, height, width)` of the mask's support, or the
    /// whole image when the mask is everywhere (blend).
    pub fn region(&self) -> (i64, i64, i64, i64) {
        let nz = self.mask.squeeze_dim(0).gt(0.0).nonzero();
        let (h, w) = (self.mask.size()[1], self.mask.size()[2]);
        if nz.size()[0] == 0 {
            return (0, 0, h, w);
        }
        let r0 = nz.select(1, 0).min().int64_value(&[]);
        let r1 = nz.select(1, 0).max().int64_value(&[]);
        let c0 = nz.select(1, 1).min().int64_value(&[]);
        let c1 = nz.select(1, 1).max().int64_value(&[]);
        (r0, c0, r1 - r0 + 1, c1 - c0 + 1)
    }

    /// Bounding box of where the trigger acts: its mask's support
    /// ([`Trigger::region`]), or for a mask that is non-zero everywhere
    /// (synthetic, blend), of the pixels at >= half its max.
    pub fn strong_region(&self) -> (i64, i64, i64, i64) {
        let (h, w) = (self.mask.size()[1], self.mask.size()[2]);
        let r = self.region();
        if r != (0, 0, h, w) {
            return r;
        }
        let max = self.mask.max().double_value(&[]);
        let strong = self.mask.ge(0.5 * max).to_kind(Kind::Float);
        Trigger {
            mask: strong,
            pattern: self.pattern.shallow_clone(),
        }
        .region()
    }
}

/// Uniform noise in [0, 1] from a seeded generator independent of torch's
/// global RNG, so the same seed gives the same pattern everywhere.
pub fn seeded_uniform(seed: u64, shape: &[i64]) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
    Tensor::from_slice(&v).view(shape)
}

/// The largest trigger image (either side, in pixels): a pattern is
/// resized to its patch or to the input, so nothing larger is useful, and
/// the header is checked before anything is decoded.
pub const MAX_PATTERN_SIDE: u32 = 1024;

/// Loads a PNG as `[c, h, w]` floats in [0, 1], resized (nearest). Its
/// header's size is checked against [`MAX_PATTERN_SIDE`] before decoding,
/// and the decoder may allocate at most 64 MiB.
pub fn load_png(path: &Path, c: i64, h: i64, w: i64, field: &str) -> Result<Tensor> {
    let bad = |e: &dyn std::fmt::Display| Error::invalid(field, format!("{}: {e}", path.display()));
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| bad(&e))?
        .with_guessed_format()
        .map_err(|e| bad(&e))?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(64 << 20);
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| bad(&e))?;
    let (iw, ih) = image::ImageDecoder::dimensions(&decoder);
    if iw > MAX_PATTERN_SIDE || ih > MAX_PATTERN_SIDE {
        return Err(Error::too_large(
            field,
            "max_pattern_side",
            format!(
                "{}: a {iw}x{ih} trigger image; at most {MAX_PATTERN_SIDE} pixels a side",
                path.display()
            ),
        ));
    }
    let img = image::DynamicImage::from_decoder(decoder).map_err(|e| bad(&e))?;
    let img = img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Nearest);
    let (data, ch): (Vec<u8>, i64) = match c {
        1 => (img.to_luma8().into_raw(), 1),
        3 => (img.to_rgb8().into_raw(), 3),
        other => {
            return Err(Error::invalid(
                field,
                format!("image patterns need 1 or 3 channels, the data has {other}"),
            ))
        }
    };
    Ok(Tensor::from_slice(&data)
        .view([h, w, ch])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        / 255.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Corner, PatchPosition};

    #[test]
    fn huge_trigger_images_are_refused_from_their_header() {
        let dir = tempfile::tempdir().unwrap();
        // a PNG whose header claims 100000 x 100000 (a few bytes on disk)
        let chunk = |tag: &[u8], data: &[u8]| {
            let mut c = (data.len() as u32).to_be_bytes().to_vec();
            c.extend_from_slice(tag);
            c.extend_from_slice(data);
            let mut h = flate2::Crc::new();
            h.update(&c[4..]);
            c.extend_from_slice(&h.sum().to_be_bytes());
            c
        };
        let mut ihdr = 100_000u32.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(chunk(b"IHDR", &ihdr));
        png.extend(chunk(b"IDAT", &[]));
        png.extend(chunk(b"IEND", &[]));
        let p = dir.path().join("huge.png");
        std::fs::write(&p, &png).unwrap();
        let e = load_png(&p, 1, 3, 3, "attack.trigger.pattern").unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("100000x100000"), "{e}");
        // a small one loads
        let ok = dir.path().join("ok.png");
        image::GrayImage::from_fn(4, 4, |x, _| image::Luma([if x % 2 == 0 { 255 } else { 0 }]))
            .save(&ok)
            .unwrap();
        let t = load_png(&ok, 1, 3, 3, "attack.trigger.pattern").unwrap();
        assert_eq!(t.size(), vec![1, 3, 3]);
    }

    fn patch(size: i64, position: PatchPosition, pattern: PatchPattern) -> TriggerSpec {
        TriggerSpec::Patch {
            size,
            position,
            pattern,
            value: 1.0,
        }
    }

    #[test]
    fn patch_touches_only_its_pixels() {
        let t = Trigger::from_spec(
            &patch(
                3,
                PatchPosition::Corner(Corner::BottomRight),
                PatchPattern::Solid,
            ),
            (1, 8, 8),
        )
        .unwrap();
        let x = crate::rng::uniform(&[4, 1, 8, 8], 101);
        let y = t.apply(&x);
        let inside = y.narrow(2, 5, 3).narrow(3, 5, 3);
        assert!(inside.eq(1.0).all().int64_value(&[]) == 1);
        // exactly equal outside
        let outside = t.mask.eq(0.0).unsqueeze(0).expand([4, 1, 8, 8], true);
        assert!(y.masked_select(&outside).equal(&x.masked_select(&outside)));
        assert_eq!(t.region(), (5, 5, 3, 3));
    }

    #[test]
    fn a_huge_position_is_refused_not_wrapped() {
        for (row, col) in [(i64::MAX, 0), (0, i64::MAX - 1), (i64::MIN, 0)] {
            let spec = patch(3, PatchPosition::At { row, col }, PatchPattern::Solid);
            let e = Trigger::from_spec(&spec, (1, 28, 28)).unwrap_err();
            assert!(e.to_string().contains("does not fit"), "{e}");
        }
    }

    #[test]
    fn explicit_position_and_checkerboard() {
        let t = Trigger::from_spec(
            &patch(
                2,
                PatchPosition::At { row: 1, col: 2 },
                PatchPattern::Checkerboard,
            ),
            (3, 6, 6),
        )
        .unwrap();
        let x = Tensor::full([1, 3, 6, 6], 0.5, (Kind::Float, Device::Cpu));
        let y = t.apply(&x);
        assert_eq!(y.double_value(&[0, 0, 1, 2]), 1.0);
        assert_eq!(y.double_value(&[0, 2, 1, 3]), 0.0);
        assert_eq!(y.double_value(&[0, 1, 2, 3]), 1.0);
        assert_eq!(y.double_value(&[0, 0, 0, 0]), 0.5);
        assert_eq!(t.region(), (1, 2, 2, 2));
    }

    #[test]
    fn blend_mixes_everywhere_and_is_seeded() {
        let spec = TriggerSpec::Blend {
            alpha: 0.2,
            pattern: BlendPattern::Noise { seed: 3 },
        };
        let a = Trigger::from_spec(&spec, (1, 4, 4)).unwrap();
        let b = Trigger::from_spec(&spec, (1, 4, 4)).unwrap();
        assert!(a.pattern.equal(&b.pattern));
        let x = Tensor::zeros([1, 1, 4, 4], (Kind::Float, Device::Cpu));
        let y = a.apply(&x);
        assert!(y.allclose(&(&a.pattern * 0.2).unsqueeze(0), 1e-6, 1e-6, false));
    }

    #[test]
    fn image_pattern_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.png");
        image::GrayImage::from_fn(2, 2, |x, _| image::Luma([if x == 0 { 255 } else { 0 }]))
            .save(&p)
            .unwrap();
        let t = Trigger::from_spec(
            &patch(
                2,
                PatchPosition::Corner(Corner::TopLeft),
                PatchPattern::Image(p),
            ),
            (1, 5, 5),
        )
        .unwrap();
        assert_eq!(t.pattern.double_value(&[0, 0, 0]), 1.0);
        assert_eq!(t.pattern.double_value(&[0, 0, 1]), 0.0);
        let e = Trigger::from_spec(
            &patch(
                2,
                PatchPosition::Corner(Corner::TopLeft),
                PatchPattern::Image("/no/such.png".into()),
            ),
            (1, 5, 5),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/no/such.png"), "{e}");
        let e = Trigger::from_spec(
            &patch(
                6,
                PatchPosition::Corner(Corner::TopLeft),
                PatchPattern::Solid,
            ),
            (1, 5, 5),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("attack.trigger.size"), "{e}");
    }
}
