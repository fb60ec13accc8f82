//! ResNet-18 with the parameter names of torchvision's `resnet18`
//! (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.bn1`, ...,
//! `layer2.0.downsample.0`, `layer2.0.downsample.1`, `fc`), so a
//! `torchvision.models.resnet18(num_classes=...)` state_dict exported to
//! safetensors loads unchanged. The stem takes any channel count (the first
//! conv is `C -> 64`, 7x7, stride 2), so a one-channel variant (MNIST) has
//! the same names.
//!
//! Stages: `conv1` (conv, BN, ReLU, 3x3 max-pool), `layer1` .. `layer4`
//! (two basic blocks each), `classifier` (global average pool, `fc`).
//! Prunable layers are the outputs of `layer1` .. `layer4`.

use tch::{nn, nn::Module, nn::ModuleT, Tensor};

use super::{LayerInfo, Network};

fn conv(vs: nn::Path, i: i64, o: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding,
        bias: false,
        ..Default::default()
    };
    nn::conv2d(vs, i, o, k, cfg)
}

/// torchvision's `BasicBlock`.
#[derive(Debug)]
pub struct BasicBlock {
    pub conv1: nn::Conv2D,
    pub bn1: nn::BatchNorm,
    pub conv2: nn::Conv2D,
    pub bn2: nn::BatchNorm,
    /// `downsample.0` (1x1 conv) and `downsample.1` (BN).
    pub downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl BasicBlock {
    fn new(vs: nn::Path, in_planes: i64, planes: i64, stride: i64) -> Self {
        let downsample = (stride != 1 || in_planes != planes).then(|| {
            (
                conv(&vs / "downsample" / "0", in_planes, planes, 1, stride, 0),
                nn::batch_norm2d(&vs / "downsample" / "1", planes, Default::default()),
            )
        });
        BasicBlock {
            conv1: conv(&vs / "conv1", in_planes, planes, 3, stride, 1),
            bn1: nn::batch_norm2d(&vs / "bn1", planes, Default::default()),
            conv2: conv(&vs / "conv2", planes, planes, 3, 1, 1),
            bn2: nn::batch_norm2d(&vs / "bn2", planes, Default::default()),
            downsample,
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let out = self.bn1.forward_t(&self.conv1.forward(x), train).relu();
        let out = self.bn2.forward_t(&self.conv2.forward(&out), train);
        let identity = match &self.downsample {
            Some((c, b)) => b.forward_t(&c.forward(x), train),
            None => x.shallow_clone(),
        };
        (out + identity).relu()
    }
}

#[derive(Debug)]
pub struct ResNet18 {
    pub conv1: nn::Conv2D,
    pub bn1: nn::BatchNorm,
    /// `layer1` .. `layer4`, two blocks each.
    pub layers: [Vec<BasicBlock>; 4],
    pub fc: nn::Linear,
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

impl ResNet18 {
    pub fn new(vs: &nn::Path, c: i64, classes: i64) -> Self {
        let mut in_planes = 64;
        let layers = std::array::from_fn(|i| {
            let planes = PLANES[i];
            let stride = if i == 0 { 1 } else { 2 };
            let lp = vs / format!("layer{}", i + 1);
            let blocks = vec![
                BasicBlock::new(&lp / "0", in_planes, planes, stride),
                BasicBlock::new(&lp / "1", planes, planes, 1),
            ];
            in_planes = planes;
            blocks
        });
        ResNet18 {
            conv1: conv(vs / "conv1", c, 64, 7, 2, 3),
            bn1: nn::batch_norm2d(vs / "bn1", 64, Default::default()),
            layers,
            fc: nn::linear(vs / "fc", 512, classes, Default::default()),
        }
    }
}

impl Network for ResNet18 {
    fn stages(&self) -> &[&'static str] {
        &STAGES
    }

    fn run_stage(&self, i: usize, x: &Tensor, train: bool) -> Tensor {
        match i {
            0 => self
                .bn1
                .forward_t(&self.conv1.forward(x), train)
                .relu()
                .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false),
            1..=4 => self.layers[i - 1]
                .iter()
                .fold(x.shallow_clone(), |h, b| b.forward_t(&h, train)),
            _ => self
                .fc
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

    fn bake_mask(&self, layer: &str, keep: &Tensor) {
        // A block's output has an identity path, so a channel cannot be
        // zeroed by the block's own weights. Zero what reads it instead: for
        // layer4 the input column of `fc` (pooling is per channel); for
        // layerN (N < 4) the input columns of the two convolutions of
        // layerN+1's first block (`conv1` and `downsample.0`), the only
        // readers of that output. Convolutions are linear in their input
        // and have no bias, so this is exact.
        let idx: usize = layer[5..].parse().unwrap_or(4);
        if idx == 4 {
            let k = keep.to_device(self.fc.ws.device());
            let _ = self.fc.ws.shallow_clone().g_mul_(&k.view([1, -1]));
        } else {
            let next = &self.layers[idx][0];
            let k = keep.to_device(next.conv1.ws.device()).view([1, -1, 1, 1]);
            let _ = next.conv1.ws.shallow_clone().g_mul_(&k);
            let (down, _) = next
                .downsample
                .as_ref()
                .expect("the first block of layer2..4 downsamples");
            let _ = down.ws.shallow_clone().g_mul_(&k);
        }
    }
}
