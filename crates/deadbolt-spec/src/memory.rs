//! How much memory a run needs, estimated from its spec alone (no
//! libtorch), so a service can refuse a run that cannot fit before it is
//! queued (`Limits::max_job_memory_bytes` in deadbolt-runtime).
//!
//! Three parts, each driven by one spec field:
//! - **parameters** (`model.arch`): the weights of the two models a run
//!   compares (clean and backdoored), one set of gradients and the
//!   optimizer's state (SGD momentum: one buffer, Adam: two);
//! - **activations** (`training.batch_size`): every layer output a
//!   training step keeps for its backward pass, and their gradients, for
//!   one batch;
//! - **dataset** (`dataset.train_limit`, or `dataset.test_limit` when the
//!   test split is the larger): the training and test images as float
//!   tensors, clean and poisoned.
//!
//! Images are the dataset kind's ([`DatasetKind::input_shape`]: MNIST and
//! Fashion-MNIST 1x28x28, CIFAR-10 3x32x32) with 10 classes; a `train_limit` or
//! `test_limit` of 0 (all) counts as the kind's full split
//! ([`DatasetKind::train_images`]). An upper estimate of the peak of one
//! job, not a measurement: libtorch's allocator caches and the kernels'
//! workspaces come on top, and the operator's limit leaves room for them.

use crate::{Arch, DatasetKind, ExperimentSpec, OptimizerKind};

/// Bytes of one `f32`.
pub const FLOAT_BYTES: u64 = 4;

impl DatasetKind {
    /// `(C, H, W)` of the kind's images.
    pub fn input_shape(self) -> (i64, i64, i64) {
        match self {
            DatasetKind::Mnist | DatasetKind::FashionMnist => (1, 28, 28),
            DatasetKind::Cifar10 => (3, 32, 32),
        }
    }

    /// Classes of the kind's labels.
    pub fn classes(self) -> i64 {
        10
    }

    /// Images of the kind's full training split.
    pub fn train_images(self) -> u64 {
        match self {
            DatasetKind::Mnist | DatasetKind::FashionMnist => 60_000,
            DatasetKind::Cifar10 => 50_000,
        }
    }

    /// Images of the kind's full test split.
    pub fn test_images(self) -> u64 {
        10_000
    }
}

/// Side of a 3x3 (padding 1) or 7x7 (padding 3) convolution, or a 3x3
/// (padding 1) max-pool, of stride 2: `ceil(s / 2)`.
fn half(s: u64) -> u64 {
    s.div_ceil(2)
}

/// The BadNets CNN's spatial sides after conv5, pool2, conv5, pool2
/// (`None` when the image is smaller than 16x16, which the model refuses).
fn badnet_sides(h: u64, w: u64) -> Option<[(u64, u64); 4]> {
    let conv = |s: u64| s.checked_sub(4).filter(|s| *s >= 1);
    let (h1, w1) = (conv(h)?, conv(w)?);
    let (p1h, p1w) = (h1 / 2, w1 / 2);
    let (h2, w2) = (conv(p1h)?, conv(p1w)?);
    let (fh, fw) = (h2 / 2, w2 / 2);
    (fh >= 1 && fw >= 1).then_some([(h1, w1), (p1h, p1w), (h2, w2), (fh, fw)])
}

fn dims((c, h, w): (i64, i64, i64)) -> (u64, u64, u64) {
    let u = |v: i64| v.max(0) as u64;
    (u(c), u(h), u(w))
}

/// Planes of the four stages of both ResNet-18s.
const PLANES: [u64; 4] = [64, 128, 256, 512];

/// Trainable parameters of `arch` on `(C, H, W)` images and `classes`
/// labels, as deadbolt-core builds it (`None`: the architecture cannot
/// take such images). Saturates rather than overflows.
pub fn parameter_count(arch: Arch, shape: (i64, i64, i64), classes: i64) -> Option<u64> {
    let (c, h, w) = dims(shape);
    let k = classes.max(0) as u64;
    let linear = |i: u64, o: u64| i.saturating_mul(o).saturating_add(o);
    Some(match arch {
        Arch::BadnetCnn => {
            // conv(C->16, 5), conv(16->32, 5), fc(32*fh*fw -> 512), fc(512 -> classes)
            let [.., (fh, fw)] = badnet_sides(h, w)?;
            let fc1_in = 32u64.saturating_mul(fh).saturating_mul(fw);
            (c * 16 * 25 + 16)
                .saturating_add(16 * 32 * 25 + 32)
                .saturating_add(linear(fc1_in, 512))
                .saturating_add(linear(512, k))
        }
        Arch::PreactResnet18 => {
            // conv1 3x3 (no bias); blocks: bn1, conv1, bn2, conv2, shortcut
            let mut n = c * 64 * 9;
            let mut inp = 64;
            for (i, &p) in PLANES.iter().enumerate() {
                let stride = if i == 0 { 1 } else { 2 };
                let shortcut = if stride != 1 || inp != p { inp * p } else { 0 };
                n += 2 * inp + inp * p * 9 + 2 * p + p * p * 9 + shortcut;
                n += 2 * p + p * p * 9 + 2 * p + p * p * 9;
                inp = p;
            }
            n.saturating_add(linear(512, k))
        }
        Arch::Resnet18 => {
            // conv1 7x7 (no bias) + bn1; blocks: conv1, bn1, conv2, bn2,
            // downsample (1x1 conv + bn)
            let mut n = c * 64 * 49 + 2 * 64;
            let mut inp = 64;
            for (i, &p) in PLANES.iter().enumerate() {
                let stride = if i == 0 { 1 } else { 2 };
                let down = if stride != 1 || inp != p {
                    inp * p + 2 * p
                } else {
                    0
                };
                n += inp * p * 9 + 2 * p + p * p * 9 + 2 * p + down;
                n += p * p * 9 + 2 * p + p * p * 9 + 2 * p;
                inp = p;
            }
            n.saturating_add(linear(512, k))
        }
    })
}

/// Floats of the layer outputs one image leaves for the backward pass of
/// `arch` (input, every convolution, normalisation, activation, pool and
/// sum). Saturates rather than overflows.
pub fn activations_per_image(arch: Arch, shape: (i64, i64, i64), classes: i64) -> u64 {
    let (c, h, w) = dims(shape);
    let k = classes.max(0) as u64;
    let input = c.saturating_mul(h).saturating_mul(w);
    let map = |p: u64, sh: u64, sw: u64| p.saturating_mul(sh).saturating_mul(sw);
    match arch {
        Arch::BadnetCnn => {
            let Some([(h1, w1), (p1h, p1w), (h2, w2), (fh, fw)]) = badnet_sides(h, w) else {
                return input;
            };
            input
                .saturating_add(map(16, h1, w1))
                .saturating_add(map(16, p1h, p1w))
                .saturating_add(map(32, h2, w2))
                .saturating_add(map(32, fh, fw))
                .saturating_add(512 + k)
        }
        Arch::PreactResnet18 | Arch::Resnet18 => {
            // preact: conv1 keeps the side; resnet18: conv1 (stride 2,
            // then BN and ReLU) and a max-pool of stride 2 halve it twice
            let (mut sh, mut sw, mut n) = match arch {
                Arch::PreactResnet18 => (h, w, input.saturating_add(map(64, h, w))),
                _ => {
                    let (ch, cw) = (half(h), half(w));
                    let (ph, pw) = (half(ch), half(cw));
                    let stem = map(64, ch, cw).saturating_mul(3);
                    (
                        ph,
                        pw,
                        input.saturating_add(stem).saturating_add(map(64, ph, pw)),
                    )
                }
            };
            for (i, &p) in PLANES.iter().enumerate() {
                if i > 0 {
                    (sh, sw) = (half(sh), half(sw));
                }
                // seven maps per block (two convolutions, two
                // normalisations, two activations, the sum), two more for
                // the first block's shortcut
                let blocks = map(p, sh, sw).saturating_mul(if i > 0 { 16 } else { 14 });
                n = n.saturating_add(blocks);
            }
            n.saturating_add(512 + k)
        }
    }
}

/// The estimate of one run, by part, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Weights of two models, gradients, optimizer state (`model.arch`).
    pub parameters: u64,
    /// One training batch's activations and their gradients
    /// (`training.batch_size`).
    pub activations: u64,
    /// Training and test images, clean and poisoned.
    pub dataset: u64,
    /// The field of the larger of the two splits (`dataset.train_limit`
    /// or `dataset.test_limit`).
    pub dataset_field: &'static str,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.parameters
            .saturating_add(self.activations)
            .saturating_add(self.dataset)
    }

    /// The spec field (dotted key) that drives the largest part, and that part.
    pub fn dominant(&self) -> (&'static str, u64) {
        [
            ("model.arch", self.parameters),
            ("training.batch_size", self.activations),
            (self.dataset_field, self.dataset),
        ]
        .into_iter()
        .max_by_key(|(_, v)| *v)
        .expect("three parts")
    }
}

impl ExperimentSpec {
    /// What this run will hold in memory (see the module's docs).
    pub fn memory_estimate(&self) -> MemoryEstimate {
        let kind = self.dataset.kind;
        let shape = kind.input_shape();
        let classes = kind.classes();
        let arch = self.model.arch;
        // an architecture that cannot take the images fails at once; its
        // parameters count as none here
        let params = parameter_count(arch, shape, classes).unwrap_or(0);
        let optimizer_buffers = match self.training.optimizer {
            OptimizerKind::Sgd if self.training.momentum > 0.0 => 1,
            OptimizerKind::Sgd => 0,
            OptimizerKind::Adam => 2,
        };
        // two models' weights, one set of gradients, the optimizer state
        let parameters = params
            .saturating_mul(3 + optimizer_buffers)
            .saturating_mul(FLOAT_BYTES);
        // the forward maps and their gradients
        let activations = activations_per_image(arch, shape, classes)
            .saturating_mul(self.training.batch_size as u64)
            .saturating_mul(2 * FLOAT_BYTES);
        let count = |limit: usize, all: u64| if limit == 0 { all } else { limit as u64 };
        let train = count(self.dataset.train_limit, kind.train_images());
        let test = count(self.dataset.test_limit, kind.test_images());
        let images = train.saturating_add(test);
        let (c, h, w) = dims(shape);
        // clean and poisoned copies
        let dataset = images
            .saturating_mul(c * h * w)
            .saturating_mul(2 * FLOAT_BYTES);
        MemoryEstimate {
            parameters,
            activations,
            dataset,
            dataset_field: if test > train {
                "dataset.test_limit"
            } else {
                "dataset.train_limit"
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_models() {
        // badnet-cnn on MNIST: fc1 takes 32x4x4 features
        assert_eq!(
            parameter_count(Arch::BadnetCnn, (1, 28, 28), 10),
            Some(416 + 12_832 + 262_656 + 5_130)
        );
        // on CIFAR-10 its fc1 takes 32x5x5
        assert_eq!(
            parameter_count(Arch::BadnetCnn, (3, 32, 32), 10),
            Some(1_216 + 12_832 + 410_112 + 5_130)
        );
        // torchvision's resnet18 with 10 classes, and BackdoorBench's
        // PreActResNet18 (both well known)
        assert_eq!(
            parameter_count(Arch::Resnet18, (3, 32, 32), 10),
            Some(11_181_642)
        );
        assert_eq!(
            parameter_count(Arch::PreactResnet18, (3, 32, 32), 10),
            Some(11_171_146)
        );
        assert_eq!(parameter_count(Arch::BadnetCnn, (1, 8, 8), 10), None);
        // a huge image saturates, never overflows
        assert!(parameter_count(Arch::BadnetCnn, (3, i64::MAX, i64::MAX), i64::MAX).is_some());
        assert!(activations_per_image(Arch::Resnet18, (3, i64::MAX, i64::MAX), 10) > 0);
    }

    #[test]
    fn the_default_mnist_spec_is_small_and_big_ones_name_their_field() {
        let spec = ExperimentSpec::from_toml_str("[dataset]\nkind = \"mnist\"\n").unwrap();
        let e = spec.memory_estimate();
        assert!(e.total() < 1 << 30, "{e:?}");
        // the dataset dominates the default MNIST run (70,000 images)
        assert_eq!(e.dominant().0, "dataset.train_limit");
        let mut big = spec.clone();
        big.model.arch = Arch::PreactResnet18;
        big.dataset.kind = DatasetKind::Cifar10;
        big.training.batch_size = 4096;
        let e = big.memory_estimate();
        assert!(e.total() > 8 << 30, "{e:?}");
        assert_eq!(e.dominant().0, "training.batch_size");
        big.training.batch_size = usize::MAX;
        assert_eq!(big.memory_estimate().total(), u64::MAX);
        // a huge test split is named as such
        let mut big = spec.clone();
        big.dataset.test_limit = usize::MAX;
        assert_eq!(big.memory_estimate().dominant().0, "dataset.test_limit");
    }
}
