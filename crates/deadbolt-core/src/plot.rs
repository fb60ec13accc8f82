//! PNG figures with plotters: histograms of per-channel values, ACC/ASR
//! curves over the pruning count, image grids (Grad-CAM overlays, trigger
//! masks and patterns). Figures need a system font for their text; callers
//! treat a failed figure as a warning, not a failed run.

use plotters::prelude::*;
use std::path::Path;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::eval::CurvePoint;

fn perr<E: std::fmt::Display>(path: &Path, e: E) -> Error {
    Error::Other(format!("{}: cannot draw figure: {e}", path.display()))
}

fn ensure_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
    }
    Ok(())
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Equal-width bins over `[lo, hi]`: `(start, end, count)`.
pub fn bin(values: &[f64], lo: f64, hi: f64, bins: usize) -> Vec<(f64, f64, usize)> {
    let bins = bins.max(1);
    let width = if hi > lo {
        (hi - lo) / bins as f64
    } else {
        1.0
    };
    let mut counts = vec![0usize; bins];
    for v in values.iter().filter(|v| v.is_finite()) {
        let i = (((v - lo) / width).floor().max(0.0) as usize).min(bins - 1);
        counts[i] += 1;
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(i, c)| (lo + i as f64 * width, lo + (i + 1) as f64 * width, c))
        .collect()
}

/// A grid of histograms (2 columns), one panel per `(title, values)`, on a
/// shared x range.
pub fn histogram_panels(
    path: &Path,
    title: &str,
    x_label: &str,
    panels: &[(String, Vec<f64>)],
    bins: usize,
) -> Result<()> {
    ensure_parent(path)?;
    let all: Vec<f64> = panels
        .iter()
        .flat_map(|p| p.1.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).min(0.0);
    let mut hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !hi.is_finite() || hi <= lo {
        hi = lo + 1.0;
    }
    let cols = 2usize;
    let rows = panels.len().div_ceil(cols).max(1);
    let root = BitMapBackend::new(path, (1000, 40 + 320 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(path, e))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| perr(path, e))?;
    let areas = root.split_evenly((rows, cols));
    for (i, (name, values)) in panels.iter().enumerate() {
        let b = bin(values, lo, hi, bins);
        let ymax = b.iter().map(|x| x.2).max().unwrap_or(1).max(1) as f64 * 1.1;
        let mut chart = ChartBuilder::on(&areas[i])
            .caption(name, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(lo..hi, 0.0..ymax)
            .map_err(|e| perr(path, e))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc("channels")
            .draw()
            .map_err(|e| perr(path, e))?;
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(b.iter().map(|(x0, x1, c)| {
                Rectangle::new([(*x0, 0.0), (*x1, *c as f64)], color.mix(0.7).filled())
            }))
            .map_err(|e| perr(path, e))?;
    }
    root.present().map_err(|e| perr(path, e))?;
    Ok(())
}

/// ACC (top) and ASR (bottom) against the pruning count, one line per series.
pub fn pruning_curves(
    path: &Path,
    title: &str,
    series: &[(String, Vec<CurvePoint>)],
) -> Result<()> {
    ensure_parent(path)?;
    let kmax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.k))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let root = BitMapBackend::new(path, (1000, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(path, e))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| perr(path, e))?;
    let (top, bottom) = root.split_vertically(380);
    for (area, metric) in [(&top, "ACC"), (&bottom, "ASR")] {
        let mut chart = ChartBuilder::on(area)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..kmax, 0.0..1.02)
            .map_err(|e| perr(path, e))?;
        chart
            .configure_mesh()
            .x_desc("channels pruned (k)")
            .y_desc(metric)
            .draw()
            .map_err(|e| perr(path, e))?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let data: Vec<(f64, f64)> = pts
                .iter()
                .map(|p| (p.k as f64, if metric == "ACC" { p.acc } else { p.asr }))
                .collect();
            chart
                .draw_series(LineSeries::new(data, color.stroke_width(2)))
                .map_err(|e| perr(path, e))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(if metric == "ACC" {
                SeriesLabelPosition::LowerLeft
            } else {
                SeriesLabelPosition::UpperRight
            })
            .draw()
            .map_err(|e| perr(path, e))?;
    }
    root.present().map_err(|e| perr(path, e))?;
    Ok(())
}

/// An RGB image: `(width, height, row-major RGB bytes)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl Rgb {
    /// From a `[C, H, W]` (C = 1 or 3) or `[H, W]` tensor in [0, 1].
    pub fn from_tensor(t: &Tensor) -> Result<Rgb> {
        let t = match t.dim() {
            2 => t.unsqueeze(0),
            3 => t.shallow_clone(),
            d => {
                return Err(Error::invalid(
                    "image",
                    format!("expected [C, H, W] or [H, W], got {d} dimensions"),
                ))
            }
        };
        let s = t.size();
        let t = match s[0] {
            1 => t.expand([3, s[1], s[2]], false),
            3 => t,
            c => {
                return Err(Error::invalid(
                    "image",
                    format!("{c} channels (expected 1 or 3)"),
                ))
            }
        };
        let bytes = (t
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .clamp(0.0, 1.0)
            * 255.0)
            .round()
            .to_kind(Kind::Uint8)
            .permute([1, 2, 0])
            .contiguous();
        Ok(Rgb {
            width: s[2] as u32,
            height: s[1] as u32,
            data: Vec::<u8>::try_from(bytes.flatten(0, -1))?,
        })
    }

    /// A heatmap `[H, W]` in [0, 1] in the jet colormap.
    pub fn heat(h: &Tensor) -> Result<Rgb> {
        let s = h.size();
        if s.len() != 2 {
            return Err(Error::invalid(
                "heat",
                format!("expected [H, W], got {s:?}"),
            ));
        }
        let v = Vec::<f32>::try_from(
            h.to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .contiguous()
                .flatten(0, -1),
        )?;
        Ok(Rgb {
            width: s[1] as u32,
            height: s[0] as u32,
            data: v.iter().flat_map(|x| jet(*x as f64)).collect(),
        })
    }

    /// `alpha * other + (1 - alpha) * self` (same size).
    pub fn blend(&self, other: &Rgb, alpha: f64) -> Rgb {
        Rgb {
            width: self.width,
            height: self.height,
            data: self
                .data
                .iter()
                .zip(&other.data)
                .map(|(a, b)| {
                    ((1.0 - alpha) * *a as f64 + alpha * *b as f64)
                        .round()
                        .clamp(0.0, 255.0) as u8
                })
                .collect(),
        }
    }

    pub fn save_png(&self, path: &Path, scale: u32) -> Result<()> {
        ensure_parent(path)?;
        let img = image::RgbImage::from_raw(self.width, self.height, self.data.clone())
            .ok_or_else(|| Error::invalid("image", "buffer size does not match its dimensions"))?;
        let s = scale.max(1);
        let img = image::imageops::resize(
            &img,
            self.width * s,
            self.height * s,
            image::imageops::FilterType::Nearest,
        );
        img.save(path).map_err(|e| perr(path, e))
    }
}

/// The jet colormap.
pub fn jet(v: f64) -> [u8; 3] {
    let v = v.clamp(0.0, 1.0);
    let f = |x: f64| ((1.5 - (4.0 * v - x).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    [f(3.0), f(2.0), f(1.0)]
}

/// A grid of images with a label per row; `cells[row][col]`.
pub fn image_grid(
    path: &Path,
    title: &str,
    row_labels: &[String],
    cells: &[Vec<Rgb>],
    scale: u32,
) -> Result<()> {
    ensure_parent(path)?;
    let scale = scale.max(1);
    let cw = cells.iter().flatten().map(|c| c.width).max().unwrap_or(1) * scale;
    let ch = cells.iter().flatten().map(|c| c.height).max().unwrap_or(1) * scale;
    let cols = cells.iter().map(|r| r.len()).max().unwrap_or(1) as u32;
    let (label_w, pad, head) = (260u32, 6u32, 40u32);
    let w = label_w + cols * (cw + pad) + pad;
    let h = head + cells.len() as u32 * (ch + pad) + pad;
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(path, e))?;
    root.draw_text(title, &("sans-serif", 20).into_text_style(&root), (10, 10))
        .map_err(|e| perr(path, e))?;
    for (r, row) in cells.iter().enumerate() {
        let y0 = head + r as u32 * (ch + pad);
        if let Some(l) = row_labels.get(r) {
            root.draw_text(
                l,
                &("sans-serif", 15).into_text_style(&root),
                (8, (y0 + ch / 2) as i32 - 8),
            )
            .map_err(|e| perr(path, e))?;
        }
        for (c, img) in row.iter().enumerate() {
            let x0 = label_w + c as u32 * (cw + pad);
            for y in 0..img.height * scale {
                for x in 0..img.width * scale {
                    let i = (((y / scale) * img.width + x / scale) * 3) as usize;
                    let px = RGBColor(img.data[i], img.data[i + 1], img.data[i + 2]);
                    root.draw_pixel(((x0 + x) as i32, (y0 + y) as i32), &px)
                        .map_err(|e| perr(path, e))?;
                }
            }
        }
    }
    root.present().map_err(|e| perr(path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.png");
        histogram_panels(
            &p,
            "t",
            "linf",
            &[("a".into(), vec![0.0, 1.0, 2.0]), ("b".into(), vec![])],
            10,
        )
        .unwrap();
        assert!(p.is_file());
        let p = dir.path().join("c.png");
        let pt = |k, acc, asr| CurvePoint {
            k,
            acc,
            asr,
            ra: 0.0,
        };
        pruning_curves(
            &p,
            "t",
            &[("linf".into(), vec![pt(0, 0.9, 1.0), pt(1, 0.9, 0.1)])],
        )
        .unwrap();
        assert!(p.is_file());
        let img = Rgb::from_tensor(&crate::rng::uniform(&[1, 5, 4], 101)).unwrap();
        assert_eq!((img.width, img.height, img.data.len()), (4, 5, 60));
        let heat = Rgb::heat(&crate::rng::uniform(&[5, 4], 102)).unwrap();
        let p = dir.path().join("g.png");
        image_grid(
            &p,
            "t",
            &["row".into()],
            &[vec![img.blend(&heat, 0.5), heat]],
            3,
        )
        .unwrap();
        assert!(p.is_file());
        img.save_png(&dir.path().join("i.png"), 2).unwrap();
        assert!(Rgb::from_tensor(&crate::rng::uniform(&[2, 5, 4], 103)).is_err());
        assert_eq!(jet(0.0), [0, 0, 128]);
        assert_eq!(
            bin(&[0.0, 0.5, 1.0], 0.0, 1.0, 2)
                .iter()
                .map(|b| b.2)
                .collect::<Vec<_>>(),
            [1, 2]
        );
    }
}
