//! Channel Lipschitzness (CLP; Zheng et al., "Data-free backdoor removal
//! based on channel Lipschitzness", ECCV 2022): a data-free score per
//! output channel of a convolution. For channel `k` with kernel `W_k`
//! (`[in, kh, kw]`, read as an `[in, kh * kw]` matrix), followed by a
//! BatchNorm with scale `gamma_k` and running variance `var_k`, the score
//! is the spectral norm (largest singular value) of
//! `W_k * gamma_k / sqrt(var_k + eps)`; without a BatchNorm right after the
//! convolution, of `W_k`. Backdoor channels tend to have an unusually
//! large upper bound of their Lipschitz constant: CLP flags the channels
//! whose score exceeds `mean + u * std` of the layer's scores (`u` = 3 by
//! default, the paper's value).
//!
//! The convolution scored for a prunable layer is the last one writing
//! into it: `conv1`/`conv2` for `badnet-cnn`; `layerN.1.conv2` (with
//! `layerN.1.bn2`) for `resnet18`; `layerN.1.conv2` for `preact-resnet18`
//! (whose next BatchNorm normalises the residual sum, so none is used).

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::spec::Arch;

/// CLP's default threshold, in standard deviations above the mean.
pub const DEFAULT_U: f64 = deadbolt_spec::byom::DEFAULT_CLP_U;
/// BatchNorm's epsilon (PyTorch's default).
pub const BN_EPS: f64 = 1e-5;

/// CLP scores of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClpScores {
    pub layer: String,
    /// The convolution's weight scored, e.g. `layer4.1.conv2.weight`.
    pub conv: String,
    /// The BatchNorm folded in, if any (e.g. `layer4.1.bn2`).
    pub batch_norm: Option<String>,
    /// Score per channel.
    pub scores: Vec<f64>,
    pub mean: f64,
    pub std: f64,
    pub u: f64,
    /// Channels above `mean + u * std`, highest first.
    pub outliers: Vec<i64>,
}

/// The convolution (weight name) and BatchNorm (prefix) behind a layer.
pub fn source(arch: Arch, layer: &str) -> Result<(String, Option<String>)> {
    let block = |l: &str| {
        l.starts_with("layer") && l[5..].parse::<u8>().is_ok_and(|i| (1..=4).contains(&i))
    };
    match arch {
        Arch::BadnetCnn if layer == "conv1" || layer == "conv2" => {
            Ok((format!("{layer}.weight"), None))
        }
        Arch::Resnet18 if block(layer) => Ok((
            format!("{layer}.1.conv2.weight"),
            Some(format!("{layer}.1.bn2")),
        )),
        Arch::PreactResnet18 if block(layer) => Ok((format!("{layer}.1.conv2.weight"), None)),
        _ => Err(Error::invalid(
            "layer",
            format!("no CLP source for layer {layer} of {}", arch.as_str()),
        )),
    }
}

/// Largest singular value of each channel's (scaled) kernel.
pub fn channel_spectral_norms(weight: &Tensor, scale: Option<&Tensor>) -> Result<Vec<f64>> {
    let d = weight.size();
    if d.len() != 4 {
        return Err(Error::invalid(
            "weight",
            format!("a conv weight is [out, in, kh, kw], got {d:?}"),
        ));
    }
    let w = weight.to_device(Device::Cpu).to_kind(Kind::Double);
    let w = match scale {
        Some(s) => {
            w * s
                .to_device(Device::Cpu)
                .to_kind(Kind::Double)
                .view([-1, 1, 1, 1])
        }
        None => w,
    };
    let m = w.reshape([d[0], d[1], d[2] * d[3]]);
    // singular values, largest first
    let (_, sv, _) = tch::no_grad(|| m.svd(true, false));
    Ok(Vec::<f64>::try_from(sv.select(1, 0).contiguous())?)
}

/// CLP scores of a prunable layer of `model`.
pub fn clp_scores(model: &Model, layer: &str, u: f64) -> Result<ClpScores> {
    model.layer(layer)?;
    let (conv, bn) = source(model.info.arch, layer)?;
    let vars = model.vs.variables();
    let get = |n: &str| {
        vars.get(n)
            .map(|t| t.detach())
            .ok_or_else(|| Error::invalid("layer", format!("the model has no tensor {n}")))
    };
    let weight = get(&conv)?;
    let scale = match &bn {
        Some(p) => {
            let gamma = get(&format!("{p}.weight"))?;
            let var = get(&format!("{p}.running_var"))?;
            Some(gamma.abs() / (var + BN_EPS).sqrt())
        }
        None => None,
    };
    let scores = channel_spectral_norms(&weight, scale.as_ref())?;
    let n = scores.len().max(1) as f64;
    let mean = scores.iter().sum::<f64>() / n;
    let std = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt();
    let mut outliers: Vec<i64> = scores
        .iter()
        .enumerate()
        .filter(|(_, s)| **s > mean + u * std)
        .map(|(i, _)| i as i64)
        .collect();
    outliers.sort_by(|a, b| scores[*b as usize].total_cmp(&scores[*a as usize]));
    Ok(ClpScores {
        layer: layer.to_string(),
        conv,
        batch_norm: bn,
        scores,
        mean,
        std,
        u,
        outliers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spectral_norm_per_channel() {
        // channel 0: a rank-one kernel of known norm; channel 1: zeros
        let w = Tensor::zeros([2, 2, 1, 2], (Kind::Float, Device::Cpu));
        w.get(0)
            .copy_(&Tensor::from_slice(&[3f32, 4., 6., 8.]).view([2, 1, 2]));
        let s = channel_spectral_norms(&w, None).unwrap();
        // [[3, 4], [6, 8]] = [1, 2]^T [3, 4]: sigma = sqrt(5) * 5
        assert!(
            (s[0] - 5f64.sqrt() * 5.0).abs() < 1e-9 && s[1].abs() < 1e-12,
            "{s:?}"
        );
        let s = channel_spectral_norms(&w, Some(&Tensor::from_slice(&[2f32, 1.]))).unwrap();
        assert!((s[0] - 10.0 * 5f64.sqrt()).abs() < 1e-9);
    }

    #[test]
    fn scores_flag_a_planted_channel() {
        let m = crate::model::test_badnet(3, (16, 16), 0);
        let vars = m.vs.variables();
        tch::no_grad(|| {
            let _ = vars["conv2.weight"].get(7).g_mul_scalar_(20.0);
        });
        let c = clp_scores(&m, "conv2", DEFAULT_U).unwrap();
        assert_eq!(c.scores.len(), 32);
        assert_eq!(c.outliers, [7]);
        assert!(clp_scores(&m, "fc9", DEFAULT_U).is_err());
        assert_eq!(
            source(Arch::Resnet18, "layer4").unwrap(),
            ("layer4.1.conv2.weight".into(), Some("layer4.1.bn2".into()))
        );
        assert!(source(Arch::Resnet18, "layer5").is_err());
    }
}
