//! The BadNets CNN: conv(C→16, 5) → ReLU → maxpool 2 → conv(16→32, 5) → ReLU
//! → maxpool 2 → fc(→512) → ReLU → fc(→classes). Parameter names `conv1`,
//! `conv2`, `fc1`, `fc2` as in the PyTorch module.

use tch::{nn, nn::Module, Tensor};

use super::{HeadOp, LayerInfo, LinearHead, Network};
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

    /// Channels-last throughout (oneDNN's NHWC convolutions need no
    /// reorders, libtorch's channels-last max-pool is vectorised, its NCHW
    /// one is scalar), and pools before the ReLU (max and ReLU commute
    /// exactly, values and gradients, and the ReLU then touches a quarter
    /// of the elements).
    fn forward_unmasked(&self, x: &Tensor, _train: bool) -> Option<Tensor> {
        let x = conv_channels_last(&self.conv1, x)
            .max_pool2d_default(2)
            .relu_();
        let x = conv_channels_last(&self.conv2, &x)
            .max_pool2d_default(2)
            .relu_();
        Some(
            self.fc2
                .forward(&self.fc1.forward(&x.flatten(1, -1)).relu_()),
        )
    }

    /// The same kernels as [`Network::forward_unmasked`] on the same
    /// layouts; a prunable layer's output is handed out in the usual
    /// (contiguous NCHW) layout.
    fn run_stage(&self, i: usize, x: &Tensor, _train: bool) -> Tensor {
        match i {
            0 => conv_channels_last(&self.conv1, x).relu_().contiguous(),
            2 => conv_channels_last(&self.conv2, x).relu_().contiguous(),
            1 | 3 => channels_last(x).max_pool2d_default(2),
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

    fn batch_independent(&self) -> bool {
        true
    }

    /// After `conv2`: max-pool (per channel; a zero channel pools to
    /// zeros) and flatten, then `fc2(relu(fc1(.)))`.
    fn linear_head(&self, layer: &str) -> Option<LinearHead> {
        (layer == "conv2").then(|| LinearHead {
            blocks: |f| pool_channels_last(f).flatten(2, -1),
            weight: self.fc1.ws.shallow_clone(),
            bias: self.fc1.bs.as_ref().map(Tensor::shallow_clone),
            rest: vec![
                HeadOp::Relu,
                HeadOp::Linear {
                    weight: self.fc2.ws.shallow_clone(),
                    bias: self.fc2.bs.as_ref().map(Tensor::shallow_clone),
                },
            ],
        })
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

/// The same values in channels-last memory order (no copy when they
/// already are). Through a flat view, so that a one-channel tensor gets
/// channels-last strides too (`contiguous` keeps its NCHW strides, which
/// are as valid, and libtorch would then pick its NCHW kernels).
pub(super) fn channels_last(x: &Tensor) -> Tensor {
    let nhwc = x.permute([0, 2, 3, 1]).contiguous();
    nhwc.flatten(0, -1)
        .view(nhwc.size().as_slice())
        .permute([0, 3, 1, 2])
}

/// A convolution on channels-last input: libtorch then runs oneDNN's NHWC
/// kernel (it lays the NCHW weight out to match, and returns the weight's
/// gradient in the parameter's layout, so checkpoints keep PyTorch's) and
/// returns channels-last activations.
fn conv_channels_last(conv: &nn::Conv2D, x: &Tensor) -> Tensor {
    channels_last(x).conv2d(&conv.ws, conv.bs.as_ref(), [1, 1], [0, 0], [1, 1], 1)
}

/// 2x2 max-pooling through libtorch's channels-last kernel, in
/// channels-last order.
fn pool_channels_last(x: &Tensor) -> Tensor {
    channels_last(x).max_pool2d_default(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both convolutions get and give channels-last activations, a
    /// one-channel input included (where `contiguous` would leave NCHW
    /// strides and libtorch would silently take its NCHW kernels).
    #[test]
    fn convolutions_run_channels_last() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let m = BadNetCnn::new(&vs.root(), 1, 28, 28, 10).unwrap();
        let x = crate::rng::uniform(&[2, 1, 28, 28], 9);
        let cl = channels_last(&x);
        assert_eq!(cl.stride()[1], 1);
        assert!(cl.equal(&x));
        let h = conv_channels_last(&m.conv1, &x);
        assert_eq!(h.stride()[1], 1, "conv1 gives {:?}", h.stride());
        let y = conv_channels_last(&m.conv2, &h.max_pool2d_default(2));
        assert_eq!(y.stride()[1], 1, "conv2 gives {:?}", y.stride());
        assert_eq!(y.size(), [2, 32, 8, 8]);
    }

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
