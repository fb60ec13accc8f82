//! WaNet (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor
//! Attack", ICLR 2021): a fixed, smooth, random warping field applied with
//! bilinear `grid_sample`. As in the authors' code: a `k` x `k` grid of
//! uniform [-1, 1] offsets, divided by its mean absolute value, upsampled
//! bicubically (align corners) to the image; the sampling grid is
//! `(identity + s * offsets / side) * grid_rescale`, clamped to [-1, 1].
//! The noise mode warps further images with the field plus uniform
//! per-pixel noise of `[-1, 1] / side`, keeping their labels.

use tch::{Device, Kind, Tensor};

use super::seeded_uniform;

/// A fixed warp for images of one size.
#[derive(Debug)]
pub struct Warp {
    /// The sampling grid `[1, H, W, 2]` (x = column, y = row, in [-1, 1]).
    pub grid: Tensor,
    /// Channels of the images it is built for.
    pub channels: i64,
}

impl Clone for Warp {
    fn clone(&self) -> Self {
        Warp {
            grid: self.grid.shallow_clone(),
            channels: self.channels,
        }
    }
}

impl Warp {
    /// The warp of `(c, h, w)` images: control grid `k` x `k` drawn from
    /// `seed`, strength `s`, scale `grid_rescale`.
    pub fn new((c, h, w): (i64, i64, i64), k: i64, s: f64, grid_rescale: f64, seed: u64) -> Warp {
        let opts = (Kind::Float, Device::Cpu);
        let ins = seeded_uniform(seed, &[1, 2, k, k]) * 2.0 - 1.0;
        let ins = &ins / ins.abs().mean(Kind::Float);
        // [1, 2, H, W] -> [1, H, W, 2]
        let offsets = ins
            .upsample_bicubic2d([h, w], true, None, None)
            .permute([0, 2, 3, 1]);
        let scale = Tensor::from_slice(&[(s / w as f64) as f32, (s / h as f64) as f32]);
        let grid = ((identity(h, w).unsqueeze(0) + offsets * scale.view([1, 1, 1, 2]))
            * grid_rescale)
            .clamp(-1.0, 1.0)
            .to_kind(opts.0)
            .contiguous();
        Warp { grid, channels: c }
    }

    /// The warped batch `[N, C, H, W]`.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let n = x.size()[0];
        let grid = self
            .grid
            .to_device(x.device())
            .expand([n, -1, -1, -1], true);
        sample(x, &grid)
    }

    /// The batch warped with the field plus per-pixel noise in
    /// `[-1, 1] / side` drawn from `seed` (the noise mode).
    pub fn apply_noisy(&self, x: &Tensor, seed: u64) -> Tensor {
        let s = self.grid.size();
        let (n, h, w) = (x.size()[0], s[1], s[2]);
        let noise = seeded_uniform(seed, &[n, h, w, 2]) * 2.0 - 1.0;
        let per_axis = Tensor::from_slice(&[1.0 / w as f32, 1.0 / h as f32]).view([1, 1, 1, 2]);
        let grid = (&self.grid + noise * per_axis).clamp(-1.0, 1.0);
        sample(x, &grid.to_device(x.device()))
    }

    pub fn to_device(&self, device: Device) -> Warp {
        Warp {
            grid: self.grid.to_device(device),
            channels: self.channels,
        }
    }
}

/// The identity sampling grid `[H, W, 2]`: `(x, y)` = (column, row) in
/// [-1, 1], corners on the corner pixels' centres (align corners).
fn identity(h: i64, w: i64) -> Tensor {
    let opts = (Kind::Float, Device::Cpu);
    let rows = Tensor::linspace(-1.0, 1.0, h, opts);
    let cols = Tensor::linspace(-1.0, 1.0, w, opts);
    let g = Tensor::meshgrid_indexing(&[rows, cols], "ij");
    Tensor::stack(&[&g[1], &g[0]], 2)
}

/// Bilinear `grid_sample` with zero padding and aligned corners (the
/// authors' call); the grid is clamped, so no zero is ever sampled.
fn sample(x: &Tensor, grid: &Tensor) -> Tensor {
    x.grid_sampler(&grid.to_kind(x.kind()), 0, 0, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_grid_reproduces_the_image() {
        let x = crate::rng::uniform(&[2, 3, 5, 7], 4);
        let id = Warp {
            grid: identity(5, 7).unsqueeze(0),
            channels: 3,
        };
        assert!(id.apply(&x).allclose(&x, 1e-5, 1e-5, false));
    }

    #[test]
    fn field_is_seeded_smooth_and_small() {
        let a = Warp::new((1, 28, 28), 4, 0.5, 1.0, 3);
        let b = Warp::new((1, 28, 28), 4, 0.5, 1.0, 3);
        let c = Warp::new((1, 28, 28), 4, 0.5, 1.0, 4);
        assert_eq!(a.grid.size(), [1, 28, 28, 2]);
        assert!(a.grid.equal(&b.grid));
        assert!(!a.grid.equal(&c.grid));
        let shift = (&a.grid - identity(28, 28).unsqueeze(0)).abs();
        let max = shift.max().double_value(&[]);
        // offsets are normalised to mean |.| = 1 (bicubic may overshoot a
        // little): s / side per unit, here 0.5 / 28
        assert!(max > 0.0 && max < 4.0 * 0.5 / 28.0, "{max}");
        assert!(a.grid.abs().max().double_value(&[]) <= 1.0);
    }

    #[test]
    fn warp_moves_pixels_keeps_range_and_noise_differs() {
        let w = Warp::new((1, 28, 28), 4, 4.0, 1.0, 0);
        let x = crate::rng::uniform(&[3, 1, 28, 28], 7);
        let y = w.apply(&x);
        assert_eq!(y.size(), x.size());
        assert!(y.min().double_value(&[]) >= 0.0 && y.max().double_value(&[]) <= 1.0);
        assert!(!y.allclose(&x, 1e-3, 1e-3, false));
        // the same images warp the same way; the noise mode differs, per seed
        assert!(w.apply(&x).equal(&y));
        let n1 = w.apply_noisy(&x, 1);
        assert!(n1.equal(&w.apply_noisy(&x, 1)));
        assert!(!n1.equal(&w.apply_noisy(&x, 2)));
        assert!(!n1.allclose(&y, 1e-4, 1e-4, false));
        assert!(n1.min().double_value(&[]) >= 0.0 && n1.max().double_value(&[]) <= 1.0);
    }
}
