//! PreActResNet18 for 32x32 inputs, with the parameter names of
//! BackdoorBench's `PreActResNet18` (`conv1`, `layer1.0.bn1`,
//! `layer1.0.conv1`, ..., `layer2.0.shortcut.0`, `linear`), so a state_dict
//! exported from PyTorch to safetensors loads unchanged.

use tch::{nn, nn::Module, nn::ModuleT, Tensor};

use super::{LayerInfo, LinearHead, Network};

#[derive(Debug)]
pub struct PreActBlock {
    pub bn1: nn::BatchNorm,
    pub conv1: nn::Conv2D,
    pub bn2: nn::BatchNorm,
    pub conv2: nn::Conv2D,
    pub shortcut: Option<nn::Conv2D>,
}

fn conv(vs: nn::Path, i: i64, o: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding,
        bias: false,
        ..Default::default()
    };
    nn::conv2d(vs, i, o, k, cfg)
}

impl PreActBlock {
    fn new(vs: nn::Path, in_planes: i64, planes: i64, stride: i64) -> Self {
        let shortcut = (stride != 1 || in_planes != planes)
            .then(|| conv(&vs / "shortcut" / "0", in_planes, planes, 1, stride, 0));
        PreActBlock {
            bn1: nn::batch_norm2d(&vs / "bn1", in_planes, Default::default()),
            conv1: conv(&vs / "conv1", in_planes, planes, 3, stride, 1),
            bn2: nn::batch_norm2d(&vs / "bn2", planes, Default::default()),
            conv2: conv(&vs / "conv2", planes, planes, 3, 1, 1),
            shortcut,
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let out = self.bn1.forward_t(x, train).relu();
        let shortcut = match &self.shortcut {
            Some(s) => s.forward(&out),
            None => x.shallow_clone(),
        };
        let out = self.conv1.forward(&out);
        let out = self.conv2.forward(&self.bn2.forward_t(&out, train).relu());
        out + shortcut
    }
}

#[derive(Debug)]
pub struct PreActResNet18 {
    pub conv1: nn::Conv2D,
    /// `layer1` .. `layer4`, two blocks each.
    pub layers: [Vec<PreActBlock>; 4],
    pub linear: nn::Linear,
}

const STAGES: [&str; 6] = [
    "conv1",
    "layer1",
    "layer2",
    "layer3",
    "layer4",
    "classifier",
];
const PLANES: [i64; 4] = [64, 128, 256, 512];

impl PreActResNet18 {
    pub fn new(vs: &nn::Path, c: i64, classes: i64) -> Self {
        let mut in_planes = 64;
        let layers = std::array::from_fn(|i| {
            let planes = PLANES[i];
            let stride = if i == 0 { 1 } else { 2 };
            let lp = vs / format!("layer{}", i + 1);
            let blocks = vec![
                PreActBlock::new(&lp / "0", in_planes, planes, stride),
                PreActBlock::new(&lp / "1", planes, planes, 1),
            ];
            in_planes = planes;
            blocks
        });
        PreActResNet18 {
            conv1: conv(vs / "conv1", c, 64, 3, 1, 1),
            layers,
            linear: nn::linear(vs / "linear", 512, classes, Default::default()),
        }
    }
}

impl Network for PreActResNet18 {
    fn stages(&self) -> &[&'static str] {
        &STAGES
    }

    fn run_stage(&self, i: usize, x: &Tensor, train: bool) -> Tensor {
        match i {
            // channels-last from the input on: every later op keeps the
            // layout, and oneDNN's NHWC convolutions need no reorders
            0 => self.conv1.forward(&super::badnet::channels_last(x)),
            1..=4 => self.layers[i - 1]
                .iter()
                .fold(x.shallow_clone(), |h, b| b.forward_t(&h, train)),
            _ => self
                .linear
                .forward(&x.adaptive_avg_pool2d([1, 1]).flatten(1, -1)),
        }
    }

    fn prunable(&self) -> Vec<LayerInfo> {
        STAGES[1..5]
            .iter()
            .zip(PLANES)
            .map(|(n, c)| LayerInfo {
                name: n.to_string(),
                channels: c,
            })
            .collect()
    }

    fn default_layer(&self) -> &'static str {
        "layer4"
    }

    /// After `layer4` (the sum of the last block's residual branch and its
    /// identity path, with no BN or ReLU after it): global average pooling,
    /// which is per channel, then `linear`. The head of `layer1`..`layer3`
    /// runs further blocks (BN, ReLU, convolutions mixing channels), so it
    /// has no such form.
    fn linear_head(&self, layer: &str) -> Option<LinearHead> {
        (layer == "layer4").then(|| LinearHead {
            blocks: |f| f.adaptive_avg_pool2d([1, 1]).flatten(2, -1),
            weight: self.linear.ws.shallow_clone(),
            bias: self.linear.bs.as_ref().map(Tensor::shallow_clone),
            rest: Vec::new(),
        })
    }

    fn bake_mask(&self, layer: &str, keep: &Tensor) {
        // A block's output has an identity path, so a channel cannot be
        // zeroed by the block's own weights. Instead zero what reads it: for
        // layer4 the linear layer's input column (pooling is per channel);
        // for layerN<4 the first block of layerN+1 (bn1 input scale/shift
        // and its shortcut input column).
        let idx: usize = layer[5..].parse().unwrap_or(4);
        if idx == 4 {
            let k = keep.to_device(self.linear.ws.device());
            let mut w = self.linear.ws.shallow_clone();
            let _ = w.g_mul_(&k.view([1, -1]));
        } else {
            let next = &self.layers[idx][0];
            let k = keep.to_device(next.conv1.ws.device());
            // out = relu(bn1(x)); with bn weight and bias 0 the channel is 0
            if let Some(w) = &next.bn1.ws {
                let _ = w.shallow_clone().g_mul_(&k);
            }
            if let Some(b) = &next.bn1.bs {
                let _ = b.shallow_clone().g_mul_(&k);
            }
            // the shortcut conv of the next stage reads relu(bn1(x)) too, so it
            // already sees zeros; nothing else reads the raw channel.
        }
    }
}
