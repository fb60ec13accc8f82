//! Per-channel activation statistics of a prunable layer.
//!
//! For every image and channel `c` of a layer's activation `A` (`[N, C, H, W]`,
//! the output of the layer's stage, i.e. after its ReLU where it has one), the
//! l1 norm `sum |A_c|`, the l2 norm `sqrt(sum A_c^2)`, the l_inf norm
//! `max |A_c|` and the mean activation `mean A_c`. Images are streamed in
//! batches under `no_grad` with the model in eval mode; what is kept is the
//! `[N, C]` table of values per norm (O(N*C) floats, never the activations).
//!
//! The *separation* of a norm compares, channel by channel, the mean value
//! on triggered inputs with the mean on clean inputs (on the backdoored
//! model): `ratio_c = (t_c + eps) / (c_c + eps)` with
//! `eps = 1e-3 * max_c c_c + 1e-12` (so dead channels give ratio 1). The
//! figure is the largest ratio; channels "stand out" when their ratio is at
//! least [`RATIO_THRESHOLD`] (2x), and robust outliers are those whose ratio
//! is above `median + ROBUST_Z * 1.4826 * MAD` of the ratios.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

use super::{mad, median, Setting};
use crate::error::{Error, Result};
use crate::model::Model;

/// Ratio at or above which a channel counts as standing out.
pub const RATIO_THRESHOLD: f64 = 2.0;
/// Robust z-score above which a ratio is an outlier.
pub const ROBUST_Z: f64 = 3.5;

/// A per-channel summary of an activation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Norm {
    L1,
    L2,
    Linf,
    Mean,
}

impl Norm {
    pub const ALL: [Norm; 4] = [Norm::L1, Norm::L2, Norm::Linf, Norm::Mean];
    pub fn as_str(&self) -> &'static str {
        match self {
            Norm::L1 => "l1",
            Norm::L2 => "l2",
            Norm::Linf => "linf",
            Norm::Mean => "mean",
        }
    }
}

/// Per-image, per-channel norms of one batch, each `[N, C]`.
#[derive(Debug)]
pub struct BatchNorms {
    pub l1: Tensor,
    pub l2: Tensor,
    pub linf: Tensor,
    pub mean: Tensor,
}

/// The four norms of an activation batch `[N, C, H, W]` (or `[N, C]`, read
/// as 1x1 maps), per image and channel.
pub fn channel_norms(act: &Tensor) -> Result<BatchNorms> {
    let a = match act.dim() {
        4 => act.flatten(2, 3),
        2 => act.unsqueeze(2),
        d => {
            return Err(Error::invalid(
                "activations",
                format!("expected [N, C, H, W] or [N, C], got {d} dimensions"),
            ))
        }
    };
    let a = a.to_kind(Kind::Float);
    let abs = a.abs();
    Ok(BatchNorms {
        l1: abs.sum_dim_intlist(2, false, Kind::Float),
        l2: a.square().sum_dim_intlist(2, false, Kind::Float).sqrt(),
        linf: abs.amax(2, false),
        mean: a.mean_dim(2, false, Kind::Float),
    })
}

/// Per-image, per-channel values of the four norms for a set of images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivationStats {
    pub layer: String,
    pub images: usize,
    pub channels: usize,
    /// Row-major `[images][channels]`.
    pub l1: Vec<f32>,
    pub l2: Vec<f32>,
    pub linf: Vec<f32>,
    pub mean: Vec<f32>,
}

impl ActivationStats {
    /// The `[images][channels]` table of a norm.
    pub fn values(&self, norm: Norm) -> &[f32] {
        match norm {
            Norm::L1 => &self.l1,
            Norm::L2 => &self.l2,
            Norm::Linf => &self.linf,
            Norm::Mean => &self.mean,
        }
    }

    /// Mean over images, per channel.
    pub fn channel_means(&self, norm: Norm) -> Vec<f64> {
        let v = self.values(norm);
        let mut sums = vec![0f64; self.channels];
        for row in v.chunks(self.channels.max(1)) {
            for (s, x) in sums.iter_mut().zip(row) {
                *s += *x as f64;
            }
        }
        let n = self.images.max(1) as f64;
        sums.into_iter().map(|s| s / n).collect()
    }

    /// All images' values of one channel.
    pub fn channel_values(&self, norm: Norm, channel: usize) -> Vec<f32> {
        self.values(norm)
            .iter()
            .skip(channel)
            .step_by(self.channels.max(1))
            .copied()
            .collect()
    }
}

/// Streams `images` through `model` up to `layer` in batches (no_grad, eval
/// mode) and keeps the per-image, per-channel norms.
pub fn collect(
    model: &Model,
    layer: &str,
    images: &Tensor,
    batch: usize,
) -> Result<ActivationStats> {
    let info = model.layer(layer)?;
    let n = images.size().first().copied().unwrap_or(0);
    if n == 0 {
        return Err(Error::EmptyDataset(format!(
            "no images to compute activation statistics of layer {layer}"
        )));
    }
    let dev = model.device();
    let batch = batch.max(1) as i64;
    let cap = (n * info.channels) as usize;
    let mut out = ActivationStats {
        layer: layer.to_string(),
        images: n as usize,
        channels: info.channels as usize,
        l1: Vec::with_capacity(cap),
        l2: Vec::with_capacity(cap),
        linf: Vec::with_capacity(cap),
        mean: Vec::with_capacity(cap),
    };
    tch::no_grad(|| -> Result<()> {
        let mut s = 0;
        while s < n {
            let len = batch.min(n - s);
            let x = images.narrow(0, s, len).to_device(dev);
            let a = model.features_t(&x, layer, false)?;
            let norms = channel_norms(&a)?;
            for (dst, t) in [
                (&mut out.l1, &norms.l1),
                (&mut out.l2, &norms.l2),
                (&mut out.linf, &norms.linf),
                (&mut out.mean, &norms.mean),
            ] {
                let t = t.to_device(Device::Cpu).contiguous();
                dst.extend(Vec::<f32>::try_from(t.flatten(0, -1))?);
            }
            s += len;
        }
        Ok(())
    })?;
    Ok(out)
}

/// Statistics in the paper's four settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FourSettings {
    pub layer: String,
    pub stats: BTreeMap<Setting, ActivationStats>,
}

/// Collects the statistics of `layer` for {clean, backdoored} model x
/// {clean, triggered} images.
pub fn four_settings(
    clean_model: &Model,
    backdoored_model: &Model,
    layer: &str,
    clean_images: &Tensor,
    triggered_images: &Tensor,
    batch: usize,
) -> Result<FourSettings> {
    let mut stats = BTreeMap::new();
    for s in Setting::ALL {
        let model = if s.backdoored_model() {
            backdoored_model
        } else {
            clean_model
        };
        let images = if s.triggered_input() {
            triggered_images
        } else {
            clean_images
        };
        stats.insert(s, collect(model, layer, images, batch)?);
    }
    Ok(FourSettings {
        layer: layer.to_string(),
        stats,
    })
}

impl FourSettings {
    pub fn get(&self, s: Setting) -> &ActivationStats {
        &self.stats[&s]
    }

    /// Separation of each norm on the backdoored model.
    pub fn separations(&self) -> BTreeMap<Norm, Separation> {
        Norm::ALL
            .into_iter()
            .map(|n| {
                (
                    n,
                    separation(
                        self.get(Setting::BackdooredModelCleanInput),
                        self.get(Setting::BackdooredModelTriggeredInput),
                        n,
                    ),
                )
            })
            .collect()
    }

    /// Per setting and norm, the mean value of each channel.
    pub fn channel_means(&self) -> BTreeMap<Setting, BTreeMap<Norm, Vec<f64>>> {
        self.stats
            .iter()
            .map(|(s, st)| {
                (
                    *s,
                    Norm::ALL
                        .into_iter()
                        .map(|n| (n, st.channel_means(n)))
                        .collect(),
                )
            })
            .collect()
    }
}

/// How much a trigger moves a norm, channel by channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Separation {
    pub norm: Norm,
    /// Largest triggered/clean ratio of channel means.
    pub max_ratio: f64,
    /// The channel with that ratio.
    pub top_channel: usize,
    /// Channels with ratio >= [`RATIO_THRESHOLD`].
    pub above_threshold: usize,
    /// Channels whose ratio is a robust outlier (see the module docs).
    pub outliers: usize,
    /// Ratio per channel.
    pub ratios: Vec<f64>,
}

/// Compares the channel means of a norm on triggered vs clean inputs.
pub fn separation(clean: &ActivationStats, triggered: &ActivationStats, norm: Norm) -> Separation {
    separation_of_means(
        &clean.channel_means(norm),
        &triggered.channel_means(norm),
        norm,
    )
}

/// [`separation`] from channel means.
pub fn separation_of_means(clean: &[f64], triggered: &[f64], norm: Norm) -> Separation {
    let scale = clean.iter().map(|v| v.abs()).fold(0.0, f64::max);
    let eps = 1e-3 * scale + 1e-12;
    let ratios: Vec<f64> = clean
        .iter()
        .zip(triggered)
        .map(|(c, t)| (t + eps) / (c + eps))
        .collect();
    let (top_channel, max_ratio) =
        ratios
            .iter()
            .copied()
            .enumerate()
            .fold((0, f64::NEG_INFINITY), |best, (i, r)| {
                if r > best.1 {
                    (i, r)
                } else {
                    best
                }
            });
    let med = median(&ratios);
    let spread = 1.4826 * mad(&ratios);
    let outliers = ratios
        .iter()
        .filter(|&&r| {
            if spread > 0.0 {
                (r - med) / spread > ROBUST_Z
            } else {
                r > med + 1e-9
            }
        })
        .count();
    Separation {
        norm,
        max_ratio: if ratios.is_empty() { 0.0 } else { max_ratio },
        top_channel,
        above_threshold: ratios.iter().filter(|r| **r >= RATIO_THRESHOLD).count(),
        outliers,
        ratios,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norms_of_hand_made_maps() {
        // one image, two channels of 2x2
        let a = Tensor::from_slice(&[1f32, -2., 3., 0., 0., 0., 0., 0.5]).view([1, 2, 2, 2]);
        let n = channel_norms(&a).unwrap();
        let v = |t: &Tensor| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        assert_eq!(v(&n.l1), [6.0, 0.5]);
        let l2 = v(&n.l2);
        assert!((l2[0] - 14f32.sqrt()).abs() < 1e-6 && (l2[1] - 0.5).abs() < 1e-6);
        assert_eq!(v(&n.linf), [3.0, 0.5]);
        assert_eq!(v(&n.mean), [0.5, 0.125]);
        // [N, C] reads as 1x1 maps
        let n = channel_norms(&Tensor::from_slice(&[-2f32, 3.]).view([1, 2])).unwrap();
        assert_eq!(v(&n.linf), [2.0, 3.0]);
        assert_eq!(v(&n.mean), [-2.0, 3.0]);
        assert!(channel_norms(&Tensor::zeros([2, 3, 4], (Kind::Float, Device::Cpu))).is_err());
    }

    #[test]
    fn separation_finds_the_moved_channel() {
        let clean = [1.0, 1.0, 2.0, 0.0, 1.0];
        let trig = [1.1, 9.0, 2.0, 0.0, 0.9];
        let s = separation_of_means(&clean, &trig, Norm::Linf);
        assert_eq!(s.top_channel, 1);
        assert!((s.max_ratio - 9.0).abs() < 0.05, "{s:?}");
        assert_eq!(s.above_threshold, 1);
        assert_eq!(s.outliers, 1);
        assert!((s.ratios[3] - 1.0).abs() < 1e-9, "dead channel ratio is 1");
    }

    #[test]
    fn collect_streams_batches_and_matches_direct_norms() {
        let m = crate::model::test_badnet(3, (16, 16), 0);
        let x = crate::rng::uniform(&[7, 1, 16, 16], 101);
        let s = collect(&m, "conv2", &x, 3).unwrap();
        assert_eq!((s.images, s.channels), (7, 32));
        assert_eq!(s.linf.len(), 7 * 32);
        let a = tch::no_grad(|| m.features_t(&x, "conv2", false).unwrap());
        let direct = Vec::<f32>::try_from(a.flatten(2, 3).amax(2, false).flatten(0, -1)).unwrap();
        for (p, q) in s.linf.iter().zip(&direct) {
            assert!((p - q).abs() < 1e-5);
        }
        assert_eq!(s.channel_values(Norm::Linf, 2).len(), 7);
        let e = collect(&m, "fc9", &x, 3).unwrap_err().to_string();
        assert!(e.contains("fc9") && e.contains("conv2"), "{e}");
        let e = collect(&m, "conv2", &x.narrow(0, 0, 0), 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
    }
}
