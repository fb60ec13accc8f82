//! Bring your own model: a model card (architecture, input shape, class
//! count, normalisation) and a PyTorch `state_dict` in safetensors.
//!
//! The card is TOML or JSON (by extension: `.json` is JSON, anything else
//! TOML):
//!
//! ```toml
//! arch = "badnet-cnn"          # or "preact-resnet18", "resnet18"
//! input_shape = [1, 28, 28]    # C, H, W
//! classes = 10
//! mean = [0.1307]              # per channel (or one value for all)
//! std = [0.3081]
//! # optional
//! class_names = ["zero", "one", ...]  # image-folder class order (else sorted)
//! layer = "conv2"                     # layer to analyse and prune
//! name = "vendor-mnist-v3"
//! ```
//!
//! The model sees `(x - mean) / std` of images `x` in [0, 1]. deadbolt works
//! on normalised images throughout (a trigger `x' = (1 - m) x + m p` is
//! stamped on normalised images with the normalised pattern, which is the
//! same image since normalisation is affine per channel), and shows them
//! denormalised.
//!
//! Weights load strictly ([`load_model`]): every parameter and buffer of the
//! architecture must be in the file with its shape, and the file must hold
//! nothing else (except BatchNorm's `num_batches_tracked`, kept and written
//! back); the error names every missing, unexpected and misshaped tensor.
//! [`save_state_dict`] writes a model back under the same names, dtypes and
//! extra tensors, so `model.load_state_dict(load_file(...))` takes it as is.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

use crate::data::DataLimits;
use crate::error::{Error, Result};
use crate::model::{Model, ModelInfo};
use crate::normalize::Normalizer;
use crate::spec::Arch;

/// What the card says about a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    pub arch: Arch,
    /// `[C, H, W]`.
    pub input_shape: [i64; 3],
    pub classes: i64,
    /// Per-channel mean subtracted from images in [0, 1] (one value = all channels).
    pub mean: Vec<f64>,
    /// Per-channel std the difference is divided by (one value = all channels).
    pub std: Vec<f64>,
    /// Class names in label order (image folders: the folder names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_names: Vec<String>,
    /// The layer to analyse and prune (default: the architecture's last
    /// conv feature map).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The largest card file read (a card is a few lines; 1000 class names
/// take some 20 KB).
pub const MAX_CARD_BYTES: u64 = 1 << 20;

impl ModelCard {
    /// Reads and validates a card within the local CLI's
    /// [`DataLimits::default`]; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<ModelCard> {
        Self::from_file_with(path, &DataLimits::default())
    }

    /// Reads and validates a card, its `classes` and `input_shape` within
    /// `limits` (a card over [`MAX_CARD_BYTES`] is refused unread); errors
    /// name the file and the field.
    pub fn from_file_with(path: &Path, limits: &DataLimits) -> Result<ModelCard> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        if len > MAX_CARD_BYTES {
            return Err(Error::too_large(
                path.display().to_string(),
                "MAX_CARD_BYTES",
                format!("a model card of {len} bytes exceeds the limit of {MAX_CARD_BYTES}"),
            ));
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_CARD_BYTES), &mut text)
            .map_err(|e| Error::io(path, e))?;
        let json = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let card = if json {
            Self::from_json_str_with(&text, limits)
        } else {
            Self::from_toml_str_with(&text, limits)
        }
        .map_err(|e| match e {
            Error::Spec(m) => Error::Spec(format!("model card {}: {m}", path.display())),
            Error::Invalid { field, message } => Error::Invalid {
                field,
                message: format!("{} (model card {})", message, path.display()),
            },
            Error::TooLarge {
                what,
                limit,
                message,
            } => Error::TooLarge {
                what,
                limit,
                message: format!("{} (model card {})", message, path.display()),
            },
            other => other,
        })?;
        Ok(card)
    }

    pub fn from_toml_str(text: &str) -> Result<ModelCard> {
        Self::from_toml_str_with(text, &DataLimits::default())
    }

    pub fn from_toml_str_with(text: &str, limits: &DataLimits) -> Result<ModelCard> {
        let card: ModelCard = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .and_then(|s| text.get(s))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty());
            Error::Spec(match at {
                Some(k) => format!("{} (at `{k}`)", e.message().trim()),
                None => e.message().trim().to_string(),
            })
        })?;
        card.validate_with(limits)?;
        Ok(card)
    }

    pub fn from_json_str(text: &str) -> Result<ModelCard> {
        Self::from_json_str_with(text, &DataLimits::default())
    }

    pub fn from_json_str_with(text: &str, limits: &DataLimits) -> Result<ModelCard> {
        let card: ModelCard = serde_json::from_str(text).map_err(|e| Error::Spec(e.to_string()))?;
        card.validate_with(limits)?;
        Ok(card)
    }

    /// Checks the values within the local CLI's [`DataLimits::default`];
    /// the error's field is the card's key.
    pub fn validate(&self) -> Result<()> {
        self.validate_with(&DataLimits::default())
    }

    /// Checks the values, `classes` and `input_shape` within `limits`
    /// (before any model is built from them); the error's field is the
    /// card's key.
    pub fn validate_with(&self, limits: &DataLimits) -> Result<()> {
        let [c, h, w] = self.input_shape;
        if c < 1 || h < 1 || w < 1 {
            return Err(Error::invalid(
                "input_shape",
                format!("[C, H, W] must be positive, got {:?}", self.input_shape),
            ));
        }
        limits.check_image("input_shape", c as u64, h as u64, w as u64)?;
        if self.classes > 0 {
            limits.check_classes("classes", self.classes as u64)?;
        }
        if self.classes < 2 {
            return Err(Error::invalid(
                "classes",
                format!(
                    "a classifier needs at least 2 classes, got {}",
                    self.classes
                ),
            ));
        }
        for (key, v) in [("mean", &self.mean), ("std", &self.std)] {
            if v.len() != 1 && v.len() as i64 != c {
                return Err(Error::invalid(
                    key,
                    format!(
                        "{} values for {c} input channels (give one per channel, or one for all)",
                        v.len()
                    ),
                ));
            }
            for (i, x) in v.iter().enumerate() {
                if !x.is_finite() {
                    return Err(Error::invalid(
                        format!("{key}[{i}]"),
                        format!("{x} is not finite"),
                    ));
                }
            }
        }
        if let Some((i, s)) = self.std.iter().enumerate().find(|(_, s)| **s <= 0.0) {
            return Err(Error::invalid(
                format!("std[{i}]"),
                format!("a standard deviation must be > 0, got {s}"),
            ));
        }
        if !self.class_names.is_empty() {
            if self.class_names.len() as i64 != self.classes {
                return Err(Error::invalid(
                    "class_names",
                    format!(
                        "{} names for {} classes",
                        self.class_names.len(),
                        self.classes
                    ),
                ));
            }
            let mut seen = std::collections::HashSet::new();
            if let Some(d) = self.class_names.iter().find(|n| !seen.insert(n.as_str())) {
                return Err(Error::invalid(
                    "class_names",
                    format!("{d:?} appears twice"),
                ));
            }
        }
        if let Some(l) = &self.layer {
            if l.is_empty() {
                return Err(Error::invalid("layer", "empty layer name"));
            }
        }
        // architecture-specific limits
        if self.arch == Arch::BadnetCnn && (h < 16 || w < 16) {
            return Err(Error::invalid(
                "input_shape",
                format!("badnet-cnn needs images of at least 16x16, got {h}x{w}"),
            ));
        }
        Ok(())
    }

    pub fn model_info(&self) -> ModelInfo {
        let [c, h, w] = self.input_shape;
        ModelInfo {
            arch: self.arch,
            classes: self.classes,
            input_shape: (c, h, w),
        }
    }

    pub fn normalizer(&self) -> Normalizer {
        let c = self.input_shape[0] as usize;
        let full = |v: &[f64]| -> Vec<f64> {
            if v.len() == 1 {
                vec![v[0]; c]
            } else {
                v.to_vec()
            }
        };
        Normalizer {
            mean: full(&self.mean),
            std: full(&self.std),
        }
    }

    /// The name of a label (its class name, or the number).
    pub fn label_name(&self, label: i64) -> String {
        self.class_names
            .get(label as usize)
            .cloned()
            .unwrap_or_else(|| label.to_string())
    }

    /// The card as TOML text.
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("a card serializes")
    }
}

/// A model loaded from a state_dict, with what it needs to be written back
/// under the same names.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: Model,
    pub card: ModelCard,
    pub weights: PathBuf,
    /// Tensors of the file that are not variables of the model but belong
    /// to it (BatchNorm's `num_batches_tracked`), written back unchanged.
    pub extras: Vec<(String, Tensor)>,
    /// The dtype of every tensor in the file, by name.
    pub dtypes: BTreeMap<String, Kind>,
}

fn is_float(k: Kind) -> bool {
    matches!(k, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}

fn list(names: &[String], max: usize) -> String {
    let mut s = names
        .iter()
        .take(max)
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > max {
        s.push_str(&format!(" and {} more", names.len() - max));
    }
    s
}

/// Reads a safetensors file into named tensors (on the CPU).
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.is_file() {
        return Err(Error::checkpoint(path, "no such file"));
    }
    Tensor::read_safetensors(path)
        .map_err(|e| Error::checkpoint(path, format!("not a readable safetensors state_dict: {e}")))
}

/// Loads a state_dict into a fresh model of the card's architecture,
/// strictly (see the module docs), the card within the local CLI's
/// [`DataLimits::default`].
pub fn load_model(weights: &Path, card: &ModelCard, device: Device) -> Result<LoadedModel> {
    load_model_with(weights, card, device, &DataLimits::default())
}

/// [`load_model`] with the card's `classes` and `input_shape` checked
/// against `limits` before the model is built.
pub fn load_model_with(
    weights: &Path,
    card: &ModelCard,
    device: Device,
    limits: &DataLimits,
) -> Result<LoadedModel> {
    card.validate_with(limits)?;
    let named = read_state_dict(weights)?;
    let mut model = Model::new(card.model_info(), device)?;
    let vars = model.vs.variables();
    let arch = card.arch.as_str();
    let file: HashMap<&str, &Tensor> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut missing: Vec<String> = vars
        .keys()
        .filter(|n| !file.contains_key(n.as_str()))
        .cloned()
        .collect();
    missing.sort();
    let mut unexpected = Vec::new();
    let mut extras = Vec::new();
    for (n, t) in &named {
        if vars.contains_key(n) {
            continue;
        }
        let bn_counter = n
            .strip_suffix(".num_batches_tracked")
            .is_some_and(|p| vars.contains_key(&format!("{p}.running_mean")));
        if bn_counter {
            extras.push((n.clone(), t.shallow_clone()));
        } else {
            unexpected.push(n.clone());
        }
    }
    unexpected.sort();
    let mut misshaped = Vec::new();
    let mut not_float = Vec::new();
    let mut sorted: Vec<(&String, &Tensor)> = vars.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for (n, v) in &sorted {
        if let Some(t) = file.get(n.as_str()) {
            if t.size() != v.size() {
                misshaped.push(format!(
                    "{n} is {:?} in the file, {arch} with {} classes and input {:?} expects {:?}",
                    t.size(),
                    card.classes,
                    card.input_shape,
                    v.size()
                ));
            } else if !is_float(t.kind()) {
                not_float.push(format!("{n} has dtype {:?}", t.kind()));
            }
        }
    }
    if !(missing.is_empty()
        && unexpected.is_empty()
        && misshaped.is_empty()
        && not_float.is_empty())
    {
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!(
                "{} missing tensor(s): {}",
                missing.len(),
                list(&missing, 8)
            ));
        }
        if !unexpected.is_empty() {
            parts.push(format!(
                "{} unexpected tensor(s): {}",
                unexpected.len(),
                list(&unexpected, 8)
            ));
        }
        if !misshaped.is_empty() {
            parts.push(format!(
                "{} misshaped tensor(s): {}",
                misshaped.len(),
                list(&misshaped, 4)
            ));
        }
        if !not_float.is_empty() {
            parts.push(format!("not floating point: {}", list(&not_float, 4)));
        }
        let hint = if !missing.is_empty() && !unexpected.is_empty() {
            format!(" (is this a {arch} state_dict? check the card's `arch`)")
        } else if !misshaped.is_empty() {
            " (check the card's `classes` and `input_shape`)".to_string()
        } else {
            String::new()
        };
        return Err(Error::checkpoint(
            weights,
            format!(
                "does not match the card's architecture {arch}: {}{hint}",
                parts.join("; ")
            ),
        ));
    }
    let dtypes = named
        .iter()
        .map(|(n, t)| (n.clone(), t.kind()))
        .collect::<BTreeMap<_, _>>();
    tch::no_grad(|| -> Result<()> {
        for (n, v) in &vars {
            let t = file[n.as_str()];
            let mut v = v.shallow_clone();
            v.f_copy_(&t.to_kind(v.kind()).to_device(v.device()))?;
        }
        Ok(())
    })?;
    for (n, t) in model.vs.variables() {
        if !bool::try_from(t.isfinite().all()).unwrap_or(false) {
            return Err(Error::checkpoint(
                weights,
                format!("tensor {n} holds NaN or infinite values"),
            ));
        }
    }
    model.info = card.model_info();
    Ok(LoadedModel {
        model,
        card: card.clone(),
        weights: weights.to_path_buf(),
        extras,
        dtypes,
    })
}

/// Writes `model` (its masks baked into the weights) as a safetensors
/// state_dict with the parameter names, dtypes and extra tensors of the
/// file it was loaded from. Written atomically.
pub fn save_state_dict(
    model: &Model,
    extras: &[(String, Tensor)],
    dtypes: &BTreeMap<String, Kind>,
    path: &Path,
) -> Result<()> {
    let mut baked = model.duplicate(Device::Cpu)?;
    baked.bake_masks();
    let mut named: Vec<(String, Tensor)> = baked
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| {
            let kind = dtypes.get(&n).copied().unwrap_or(Kind::Float);
            (n, t.detach().to_kind(kind).contiguous())
        })
        .collect();
    named.extend(extras.iter().map(|(n, t)| (n.clone(), t.shallow_clone())));
    named.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = path.with_extension("partial.safetensors");
    Tensor::write_safetensors(&named, &tmp).map_err(|e| Error::checkpoint(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The card beside a model file: `<stem>.card.{toml,json}`, then
/// `card.{toml,json}` in its folder.
pub fn find_card(weights: &Path) -> Option<PathBuf> {
    let dir = weights.parent().unwrap_or(Path::new("."));
    let stem = weights.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    [
        format!("{stem}.card.toml"),
        format!("{stem}.card.json"),
        "card.toml".to_string(),
        "card.json".to_string(),
    ]
    .into_iter()
    .map(|n| dir.join(n))
    .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CARD: &str = r#"
arch = "badnet-cnn"
input_shape = [1, 28, 28]
classes = 10
mean = [0.1307]
std = [0.3081]
"#;

    #[test]
    fn card_parses_and_validates() {
        let c = ModelCard::from_toml_str(CARD).unwrap();
        assert_eq!(c.model_info().input_shape, (1, 28, 28));
        let e = ModelCard::from_toml_str(&CARD.replace("0.3081", "-0.3"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("std[0]") && e.contains("-0.3"), "{e}");
        let e = ModelCard::from_toml_str(&CARD.replace("classes = 10", "classes = 1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("classes"), "{e}");
        let e = ModelCard::from_toml_str(&CARD.replace("mean = [0.1307]", "mean = [0.1, 0.2]"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mean"), "{e}");
        let e = ModelCard::from_toml_str(&CARD.replace("badnet-cnn", "vgg"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("vgg"), "{e}");
        let e = ModelCard::from_toml_str(&format!("{CARD}\ncolour = 1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
        let e = ModelCard::from_toml_str(&CARD.replace("std = [0.3081]\n", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("std"), "{e}");
        let j = r#"{"arch":"resnet18","input_shape":[3,32,32],"classes":10,
                    "mean":[0.4914,0.4822,0.4465],"std":[0.247,0.243,0.261]}"#;
        let c = ModelCard::from_json_str(j).unwrap();
        assert_eq!(c.arch, Arch::Resnet18);
        let e = ModelCard::from_json_str(&j.replace("0.243", "0"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("std[1]"), "{e}");
    }

    #[test]
    fn card_sizes_are_bounded_before_a_model_is_built() {
        let too_large = |e: Error, field: &str, limit: &str| match &e {
            Error::TooLarge { what, limit: l, .. } if what == field && *l == limit => {}
            _ => panic!("expected {field} over {limit}: {e}"),
        };
        let e = ModelCard::from_toml_str(&CARD.replace("classes = 10", "classes = 4000000"))
            .unwrap_err();
        too_large(e, "classes", "max_classes");
        let e =
            ModelCard::from_toml_str(&CARD.replace("[1, 28, 28]", "[1, 4096, 4096]")).unwrap_err();
        too_large(e, "input_shape", "max_image_pixels");
        let e = ModelCard::from_toml_str(&CARD.replace("[1, 28, 28]", "[64, 28, 28]")).unwrap_err();
        too_large(e, "input_shape", "max_channels");
        // a service's tighter limits, from the file and at load
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("card.toml");
        std::fs::write(&p, CARD.replace("[1, 28, 28]", "[1, 128, 128]")).unwrap();
        let card = ModelCard::from_file(&p).unwrap();
        let service = DataLimits {
            max_image_pixels: 64 * 64,
            ..DataLimits::default()
        };
        let e = ModelCard::from_file_with(&p, &service).unwrap_err();
        assert!(e.to_string().contains("card.toml"), "{e}");
        too_large(e, "input_shape", "max_image_pixels");
        let e =
            load_model_with(&dir.path().join("none"), &card, Device::Cpu, &service).unwrap_err();
        too_large(e, "input_shape", "max_image_pixels");
        // a card file of megabytes is not read
        std::fs::write(&p, format!("{CARD}\n#{}", "x".repeat(2 << 20))).unwrap();
        let e = ModelCard::from_file(&p).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    }

    #[test]
    fn strict_loading_names_every_problem() {
        let dir = tempfile::tempdir().unwrap();
        let card = ModelCard::from_toml_str(CARD).unwrap();
        let m = Model::seeded(card.model_info(), Device::Cpu, 3).unwrap();
        let p = dir.path().join("m.safetensors");
        m.vs.save(&p).unwrap();
        let l = load_model(&p, &card, Device::Cpu).unwrap();
        let x = crate::rng::uniform(&[2, 1, 28, 28], 4);
        assert!(l.model.forward_t(&x, false).equal(&m.forward_t(&x, false)));
        // misshaped: wrong class count
        let mut c5 = card.clone();
        c5.classes = 5;
        let e = load_model(&p, &c5, Device::Cpu).unwrap_err().to_string();
        assert!(
            e.contains("m.safetensors") && e.contains("fc2.weight") && e.contains("classes"),
            "{e}"
        );
        // missing and unexpected
        let mut named: Vec<(String, Tensor)> =
            m.vs.variables()
                .into_iter()
                .filter(|(n, _)| n != "fc1.bias")
                .collect();
        named.push((
            "extra.weight".into(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        ));
        let q = dir.path().join("q.safetensors");
        Tensor::write_safetensors(&named, &q).unwrap();
        let e = load_model(&q, &card, Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("fc1.bias") && e.contains("extra.weight"), "{e}");
        let e = load_model(&dir.path().join("none.safetensors"), &card, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.safetensors"), "{e}");
        std::fs::write(dir.path().join("bad.safetensors"), b"garbage").unwrap();
        let e = load_model(&dir.path().join("bad.safetensors"), &card, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.safetensors"), "{e}");
    }

    #[test]
    fn saved_state_dict_keeps_names_extras_and_baked_masks() {
        let dir = tempfile::tempdir().unwrap();
        let card = ModelCard::from_toml_str(
            &CARD
                .replace("badnet-cnn", "resnet18")
                .replace("[1, 28, 28]", "[1, 20, 20]"),
        )
        .unwrap();
        let m = Model::seeded(card.model_info(), Device::Cpu, 5).unwrap();
        let mut named: Vec<(String, Tensor)> = m.vs.variables().into_iter().collect();
        named.push((
            "bn1.num_batches_tracked".into(),
            Tensor::from_slice(&[7i64]).view([]),
        ));
        let p = dir.path().join("r.safetensors");
        Tensor::write_safetensors(&named, &p).unwrap();
        let mut l = load_model(&p, &card, Device::Cpu).unwrap();
        assert_eq!(l.extras.len(), 1);
        l.model.prune_channels("layer3", &[1, 5]).unwrap();
        let x = crate::rng::uniform(&[2, 1, 20, 20], 6);
        let want = tch::no_grad(|| l.model.forward_t(&x, false));
        let out = dir.path().join("out/r.safetensors");
        save_state_dict(&l.model, &l.extras, &l.dtypes, &out).unwrap();
        let back = load_model(&out, &card, Device::Cpu).unwrap();
        let got = tch::no_grad(|| back.model.forward_t(&x, false));
        assert!(got.allclose(&want, 1e-5, 1e-5, false));
        let names: Vec<String> = read_state_dict(&out)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(names.contains(&"bn1.num_batches_tracked".to_string()));
        assert!(names.contains(&"layer2.0.downsample.1.running_var".to_string()));
        assert_eq!(names.len(), named.len());
    }
}
