//! Grad-CAM on a prunable layer: `heat = ReLU(sum_c w_c A_c)` with
//! `w_c` = the spatial mean of `d logit_class / d A_c`, upsampled
//! (bilinear) to the input size and divided by its per-image maximum (so
//! values lie in [0, 1]; an all-zero map stays zero).
//!
//! Only the activations get gradients (`Tensor::run_backward` on them), so
//! the model's parameters and their `.grad` are untouched.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::Model;

/// Images per backward pass.
pub const GRADCAM_BATCH: i64 = 256;

/// Heatmaps and the classes they explain.
#[derive(Debug)]
pub struct GradCam {
    /// `[N, H, W]` in [0, 1], on the CPU.
    pub heat: Tensor,
    /// `[N]` explained class per image.
    pub classes: Tensor,
}

/// Grad-CAM of `layer` for `images` (`[N, C, H, W]`), explaining `classes`
/// (`[N]`) or, when `None`, the predicted class.
pub fn gradcam(
    model: &Model,
    layer: &str,
    images: &Tensor,
    classes: Option<&Tensor>,
) -> Result<GradCam> {
    model.layer(layer)?;
    let dims = images.size();
    if dims.len() != 4 {
        return Err(Error::invalid(
            "images",
            format!("Grad-CAM needs [N, C, H, W] images, got {dims:?}"),
        ));
    }
    let (n, h, w) = (dims[0], dims[2], dims[3]);
    if n == 0 {
        return Err(Error::EmptyDataset(format!(
            "no images for the Grad-CAM of layer {layer}"
        )));
    }
    if let Some(c) = classes {
        if c.size() != [n] {
            return Err(Error::invalid(
                "classes",
                format!("{n} images but classes of shape {:?}", c.size()),
            ));
        }
        let (lo, hi) = (c.min().int64_value(&[]), c.max().int64_value(&[]));
        if lo < 0 || hi >= model.info.classes {
            return Err(Error::invalid(
                "classes",
                format!(
                    "class out of range {lo}..={hi} ({} classes)",
                    model.info.classes
                ),
            ));
        }
    }
    let dev = model.device();
    let (mut heats, mut explained) = (Vec::new(), Vec::new());
    let mut s = 0;
    while s < n {
        let len = GRADCAM_BATCH.min(n - s);
        let x = images.narrow(0, s, len).to_device(dev);
        let feats = tch::no_grad(|| model.features_t(&x, layer, false))?;
        if feats.dim() != 4 {
            return Err(Error::invalid(
                "layer",
                format!(
                    "Grad-CAM needs a spatial layer; {layer} gives {:?}",
                    feats.size()
                ),
            ));
        }
        let a = feats.detach().set_requires_grad(true);
        let logits = model.head_t(&a, layer, false)?;
        let cls = match classes {
            Some(c) => c.narrow(0, s, len).to_device(dev).to_kind(Kind::Int64),
            None => logits.argmax(1, false),
        };
        let chosen = logits.gather(1, &cls.unsqueeze(1), false).sum(Kind::Float);
        let grads = Tensor::f_run_backward(&[chosen], &[&a], false, false)?;
        let weights = grads[0].mean_dim([2i64, 3].as_slice(), true, Kind::Float);
        let cam = tch::no_grad(|| {
            let cam = (weights * a.detach())
                .sum_dim_intlist(1, true, Kind::Float)
                .relu()
                .upsample_bilinear2d([h, w], false, None, None)
                .squeeze_dim(1);
            let max = cam.amax([1i64, 2].as_slice(), true);
            let safe = max.clamp_min(1e-12);
            (cam / safe).where_self(&max.gt(0.0), &Tensor::zeros([1], (Kind::Float, dev)))
        });
        heats.push(cam.to_device(Device::Cpu));
        explained.push(cls.to_device(Device::Cpu));
        s += len;
    }
    Ok(GradCam {
        heat: Tensor::cat(&heats, 0),
        classes: Tensor::cat(&explained, 0),
    })
}

/// Share of each heatmap's mass inside `(row, col, height, width)`; `None`
/// for an all-zero heatmap.
pub fn mass_in_region(heat: &Tensor, region: (i64, i64, i64, i64)) -> Result<Vec<Option<f64>>> {
    let (r, c, rh, rw) = region;
    let d = heat.size();
    if d.len() != 3 {
        return Err(Error::invalid(
            "heat",
            format!("expected [N, H, W], got {d:?}"),
        ));
    }
    if r < 0 || c < 0 || rh < 1 || rw < 1 || r + rh > d[1] || c + rw > d[2] {
        return Err(Error::invalid(
            "region",
            format!("region {region:?} does not fit a {}x{} heatmap", d[1], d[2]),
        ));
    }
    let total = heat.sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Double);
    let inside = heat.narrow(1, r, rh).narrow(2, c, rw).sum_dim_intlist(
        [1i64, 2].as_slice(),
        false,
        Kind::Double,
    );
    let t = Vec::<f64>::try_from(total.to_device(Device::Cpu))?;
    let i = Vec::<f64>::try_from(inside.to_device(Device::Cpu))?;
    Ok(t.iter()
        .zip(&i)
        .map(|(t, i)| if *t > 0.0 { Some(i / t) } else { None })
        .collect())
}

/// Mean share of heatmap mass inside a region over images with a non-zero map.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RegionMass {
    /// Mean share of the mass inside the region.
    pub mass_in_region: f64,
    /// The region's share of the image area (the value for a uniform map).
    pub area_share: f64,
    /// Images averaged (those with a non-zero heatmap).
    pub images: usize,
}

pub fn mean_mass_in_region(heat: &Tensor, region: (i64, i64, i64, i64)) -> Result<RegionMass> {
    let shares: Vec<f64> = mass_in_region(heat, region)?
        .into_iter()
        .flatten()
        .collect();
    let d = heat.size();
    Ok(RegionMass {
        mass_in_region: if shares.is_empty() {
            0.0
        } else {
            shares.iter().sum::<f64>() / shares.len() as f64
        },
        area_share: (region.2 * region.3) as f64 / (d[1] * d[2]) as f64,
        images: shares.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;
    use crate::progress::Silent;
    use crate::spec::TrainingSpec;

    #[test]
    fn heatmap_lands_on_the_region_the_answer_depends_on() {
        // four classes, each told apart only by a 6x6 checkerboard in its
        // own corner of otherwise noisy images: the Grad-CAM of the true
        // class must sit in that corner
        let (n, classes, side, size) = (384i64, 4i64, 6i64, 28i64);
        let x = crate::rng::uniform(&[n, 1, size, size], 101) * 0.4;
        let y = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(classes);
        let checker = (Tensor::arange(side, (Kind::Float, Device::Cpu)).view([side, 1])
            + Tensor::arange(side, (Kind::Float, Device::Cpu)).view([1, side]))
        .remainder(2)
        .view([1, side, side]);
        let corner = |class: i64| {
            let (r, c) = (class / 2 * (size - side), class % 2 * (size - side));
            (r, c)
        };
        for i in 0..n {
            let (r, c) = corner(i % classes);
            x.get(i)
                .narrow(1, r, side)
                .narrow(2, c, side)
                .copy_(&checker);
        }
        let d = Dataset::new(x, y, classes, "toy").unwrap();
        let mut m = crate::model::test_badnet(classes, (size, size), 11);
        let spec = TrainingSpec {
            epochs: 3,
            batch_size: 32,
            lr: 0.02,
            ..Default::default()
        };
        crate::train::train(
            &mut m,
            &d,
            &spec,
            0,
            crate::train::Start::fresh(),
            &Silent,
            |_, _, _| Ok(()),
        )
        .unwrap();
        let acc = crate::eval::evaluate(&m, &d, None).unwrap().acc;
        assert!(
            acc > 0.95,
            "the toy model did not learn its task: acc {acc}"
        );
        for class in 0..classes {
            let idx: Vec<i64> = (0..24).map(|i| classes * i + class).collect();
            let some = d.select_vec(&idx);
            let cam = gradcam(&m, "conv2", &some.images, Some(&some.labels)).unwrap();
            assert_eq!(cam.heat.size(), [24, size, size]);
            assert!(cam.heat.max().double_value(&[]) <= 1.0 + 1e-6);
            // the heatmap's mass by quadrant: the one holding the class's
            // checkerboard must get the most, and more than its 25% area
            let half = size / 2;
            let quadrant = |q: i64| (q / 2 * half, q % 2 * half, half, half);
            let masses: Vec<f64> = (0..4)
                .map(|q| {
                    mean_mass_in_region(&cam.heat, quadrant(q))
                        .unwrap()
                        .mass_in_region
                })
                .collect();
            let own = masses[class as usize];
            assert!(own > 0.3, "class {class}: {masses:?}");
            assert!(
                masses.iter().all(|&m| m <= own),
                "class {class}: {masses:?}"
            );
        }
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let m = crate::model::test_badnet(3, (16, 16), 0);
        let x = crate::rng::uniform(&[2, 1, 16, 16], 102);
        assert!(gradcam(&m, "nope", &x, None)
            .unwrap_err()
            .to_string()
            .contains("nope"));
        let bad = Tensor::from_slice(&[0i64, 7]);
        assert!(gradcam(&m, "conv2", &x, Some(&bad))
            .unwrap_err()
            .to_string()
            .contains("classes"));
        assert!(gradcam(&m, "conv2", &x.narrow(0, 0, 0), None).is_err());
        let h = Tensor::ones([1, 4, 4], (Kind::Float, Device::Cpu));
        assert!(mass_in_region(&h, (3, 3, 2, 2)).is_err());
        let share = mass_in_region(&h, (0, 0, 2, 2)).unwrap();
        assert_eq!(share, [Some(0.25)]);
    }
}
