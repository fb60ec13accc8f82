//! SIG (Barni, Kallas, Tondi, "A new backdoor attack in CNNs by training
//! set corruption without label poisoning", ICIP 2019): a horizontal
//! sinusoid `v(i, j) = delta * sin(2 pi j f / m)` (`j` the column, `m` the
//! width) added to the image and clipped to [0, 1]. The same signal, at
//! the training amplitude on the poisoned target-class images and at the
//! test amplitude on the images the attack is measured on.

use tch::{Device, Kind, Tensor};

/// The two signals of a SIG attack, `[C, H, W]` each.
#[derive(Debug)]
pub struct Signal {
    /// Added to the poisoned training images.
    pub train: Tensor,
    /// Added to the triggered test images.
    pub test: Tensor,
}

impl Clone for Signal {
    fn clone(&self) -> Self {
        Signal {
            train: self.train.shallow_clone(),
            test: self.test.shallow_clone(),
        }
    }
}

impl Signal {
    /// The signals for images of `(c, h, w)`, `frequency` periods across a
    /// row, amplitudes `delta` (training) and `test_delta` (test).
    pub fn new((c, h, w): (i64, i64, i64), delta: f64, test_delta: f64, frequency: f64) -> Signal {
        let j = Tensor::arange(w, (Kind::Double, Device::Cpu));
        let wave = (j * (2.0 * std::f64::consts::PI * frequency / w as f64)).sin();
        let row = |amplitude: f64| {
            (&wave * amplitude)
                .to_kind(Kind::Float)
                .view([1, 1, w])
                .expand([c, h, w], true)
                .contiguous()
        };
        Signal {
            train: row(delta),
            test: row(test_delta),
        }
    }

    /// `clip(x + signal, 0, 1)` on a batch `[N, C, H, W]`.
    pub fn add(x: &Tensor, signal: &Tensor) -> Tensor {
        (x + signal.to_device(x.device())).clamp(0.0, 1.0)
    }

    pub fn to_device(&self, device: Device) -> Signal {
        Signal {
            train: self.train.to_device(device),
            test: self.test.to_device(device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_is_the_papers_sinusoid_constant_down_columns() {
        let s = Signal::new((1, 28, 28), 20.0 / 255.0, 40.0 / 255.0, 6.0);
        assert_eq!(s.train.size(), [1, 28, 28]);
        for j in [0i64, 1, 5, 13, 27] {
            let want = 20.0 / 255.0 * (2.0 * std::f64::consts::PI * j as f64 * 6.0 / 28.0).sin();
            for i in [0i64, 9, 27] {
                let got = s.train.double_value(&[0, i, j]);
                assert!((got - want).abs() < 1e-6, "({i}, {j}): {got} vs {want}");
            }
        }
        let ratio = s.test.abs().max().double_value(&[]) / s.train.abs().max().double_value(&[]);
        assert!((ratio - 2.0).abs() < 1e-5, "{ratio}");
        // three channels carry the same signal
        let rgb = Signal::new((3, 32, 32), 0.1, 0.1, 6.0);
        assert!(rgb.train.get(0).equal(&rgb.train.get(2)));
    }

    #[test]
    fn add_clips_to_the_pixel_range() {
        let s = Signal::new((1, 4, 8), 0.5, 0.5, 2.0);
        let x = Tensor::cat(
            &[
                Tensor::ones([1, 1, 4, 8], (Kind::Float, Device::Cpu)),
                Tensor::zeros([1, 1, 4, 8], (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        let y = Signal::add(&x, &s.train);
        assert_eq!(y.size(), [2, 1, 4, 8]);
        assert!(y.min().double_value(&[]) >= 0.0 && y.max().double_value(&[]) <= 1.0);
        // column 1 (sin > 0) darkens nothing on a white image, brightens a black one
        assert_eq!(y.double_value(&[0, 0, 0, 1]), 1.0);
        assert!((y.double_value(&[1, 0, 0, 1]) - 0.5).abs() < 1e-6);
    }
}
