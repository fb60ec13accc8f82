//! Per-channel input normalisation, `(x - mean) / std`, as a model card
//! declares it: images in [0, 1] to model inputs and back, and triggers
//! between image space and model inputs (normalisation is affine per
//! channel, so stamping commutes with it).

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::trigger::Trigger;

/// Per-channel `(x - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalizer {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl Normalizer {
    fn column(v: &[f64], device: Device) -> Tensor {
        Tensor::from_slice(&v.iter().map(|x| *x as f32).collect::<Vec<_>>())
            .view([-1, 1, 1])
            .to_device(device)
    }

    /// Images in [0, 1] (`[N, C, H, W]` or `[C, H, W]`) to model inputs.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let dev = x.device();
        (x - Self::column(&self.mean, dev)) / Self::column(&self.std, dev)
    }

    /// Model inputs back to images in [0, 1] (up to rounding).
    pub fn undo(&self, x: &Tensor) -> Tensor {
        let dev = x.device();
        x * Self::column(&self.std, dev) + Self::column(&self.mean, dev)
    }

    /// A trigger in image space (pattern in [0, 1]) as a trigger on model
    /// inputs: the same mask, the normalised pattern.
    pub fn trigger_to_model(&self, t: &Trigger) -> Trigger {
        Trigger {
            mask: t.mask.shallow_clone(),
            pattern: self.apply(&t.pattern),
        }
    }

    /// A trigger on model inputs back in image space.
    pub fn trigger_to_image(&self, t: &Trigger) -> Trigger {
        Trigger {
            mask: t.mask.shallow_clone(),
            pattern: self.undo(&t.pattern),
        }
    }

    pub fn is_identity(&self) -> bool {
        self.mean.iter().all(|m| *m == 0.0) && self.std.iter().all(|s| *s == 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizer_round_trips_and_commutes_with_stamping() {
        let n = Normalizer {
            mean: vec![0.5, 0.2, 0.1],
            std: vec![0.25, 0.5, 2.0],
        };
        let x = crate::rng::uniform(&[2, 3, 6, 6], 1);
        assert!(n.undo(&n.apply(&x)).allclose(&x, 1e-5, 1e-6, false));
        let t = Trigger {
            mask: crate::rng::uniform(&[1, 6, 6], 2),
            pattern: crate::rng::uniform(&[3, 6, 6], 3),
        };
        let a = n.apply(&t.apply(&x));
        let b = n.trigger_to_model(&t).apply(&n.apply(&x));
        assert!(a.allclose(&b, 1e-5, 1e-5, false));
    }
}
