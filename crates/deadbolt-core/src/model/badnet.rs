//! The BadNets CNN: conv(C→16, 5) → ReLU → maxpool 2 → conv(16→32, 5) → ReLU
//! → maxpool 2 → fc(→512) → ReLU → fc(→classes). Parameter names `conv1`,
//! `conv2`, `fc1`, `fc2` as in the PyTorch module.

use tch::{nn, nn::Module, Tensor};

use super::{LayerInfo, Network};
use crate::error::{Error, Result};

#[derive(Debug)]
pub struct BadNetCnn {
    pub conv1: nn::Conv2D,
    pub conv2: nn::Conv2D,
    pub fc1: nn::Linear,
    pub fc2: nn::Linear,
}

const STAGES: [&str; 5] = ["conv1", "pool1", "conv2", "pool2", "classifier"];

impl BadNetCnn {
    pub fn new(vs: &nn::Path, c: i64, h: i64, w: i64, classes: i64) -> Result<Self> {
        // spatial size after conv5 → pool2 → conv5 → pool2
        let side = |s: i64| ((s - 4) / 2 - 4) / 2;
        let (fh, fw) = (side(h), side(w));
        if fh < 1 || fw < 1 {
            return Err(Error::invalid(
                "model.arch",
                format!("badnet-cnn needs images of at least 16x16, got {h}x{w}"),
            ));
        }
        Ok(BadNetCnn {
            conv1: nn::conv2d(vs / "conv1", c, 16, 5, Default::default()),
            conv2: nn::conv2d(vs / "conv2", 16, 32, 5, Default::default()),
            fc1: nn::linear(vs / "fc1", 32 * fh * fw, 512, Default::default()),
            fc2: nn::linear(vs / "fc2", 512, classes, Default::default()),
        })
    }
}

impl Network for BadNetCnn {
    fn stages(&self) -> &[&'static str] {
        &STAGES
    }

    /// Pools before the ReLU (max and ReLU commute exactly, values and
    /// gradients, and the ReLU then touches a quarter of the elements), and
    /// on channels-last activations: libtorch's NCHW max-pool kernel is
    /// scalar and took a quarter of the training time, its channels-last
    /// one is vectorised (same window order, same argmax).
    fn forward_unmasked(&self, x: &Tensor, _train: bool) -> Option<Tensor> {
        let x = pool_channels_last(&self.conv1.forward(x)).relu_();
        let x = pool_channels_last(&self.conv2.forward(&x)).relu_();
        Some(
            self.fc2
                .forward(&self.fc1.forward(&x.flatten(1, -1)).relu_()),
        )
    }

    fn run_stage(&self, i: usize, x: &Tensor, _train: bool) -> Tensor {
        match i {
            0 => self.conv1.forward(x).relu_(),
            1 | 3 => pool_channels_last(x),
            2 => self.conv2.forward(x).relu_(),
            _ => self
                .fc2
                .forward(&self.fc1.forward(&x.flatten(1, -1)).relu_()),
        }
    }

    fn prunable(&self) -> Vec<LayerInfo> {
        vec![
            LayerInfo {
                name: "conv1".into(),
                channels: 16,
            },
            LayerInfo {
                name: "conv2".into(),
                channels: 32,
            },
        ]
    }

    fn default_layer(&self) -> &'static str {
        "conv2"
    }

    fn bake_mask(&self, layer: &str, keep: &Tensor) {
        // relu(0 * x + 0) = 0: zeroing a channel's filter and bias zeroes it.
        let conv = if layer == "conv1" {
            &self.conv1
        } else {
            &self.conv2
        };
        let keep = keep.to_device(conv.ws.device());
        let mut ws = conv.ws.shallow_clone();
        let _ = ws.g_mul_(&keep.view([-1, 1, 1, 1]));
        if let Some(b) = &conv.bs {
            let mut b = b.shallow_clone();
            let _ = b.g_mul_(&keep);
        }
    }
}

/// 2x2 max-pooling through libtorch's channels-last kernel, returned in
/// the usual (contiguous NCHW) layout so that the convolutions run exactly
/// as they would without it.
fn pool_channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1])
        .contiguous()
        .permute([0, 3, 1, 2])
        .max_pool2d_default(2)
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Channels-last pooling is libtorch's NCHW max-pool, values and
    /// gradients bitwise, ties included.
    #[test]
    fn channels_last_pooling_is_max_pool_exactly() {
        let x = (crate::rng::uniform(&[3, 5, 12, 12], 7) * 4.0).round() - 2.0; // many ties
        let grad = |f: &dyn Fn(&Tensor) -> Tensor| {
            let a = x.detach().set_requires_grad(true);
            let y = f(&a);
            let w = crate::rng::uniform(&y.size(), 8);
            (&y * &w).sum(tch::Kind::Float).backward();
            (y.detach(), a.grad())
        };
        let (ya, ga) = grad(&|a| pool_channels_last(a));
        let (yb, gb) = grad(&|a| a.max_pool2d_default(2));
        assert!(ya.equal(&yb) && ga.equal(&gb));
    }
}
