//! Image classifiers as sequences of named stages with PyTorch-style
//! parameter names. A prunable layer is the output of a stage; a per-channel
//! mask on it zeroes channels for everything downstream.
//!
//! `features(x, layer)` runs the stages up to and including `layer` (masked),
//! `head(f, layer)` runs the rest, so `head(features(x, l), l) == forward(x)`.

mod badnet;
mod head;
mod preact;
mod resnet;

pub use badnet::BadNetCnn;
pub use head::{HeadOp, LinearHead};
pub use preact::PreActResNet18;
pub use resnet::ResNet18;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::spec::Arch;

/// A prunable layer: its name and channel count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub name: String,
    pub channels: i64,
}

/// The architecture-specific part of a model: an ordered list of stages.
pub trait Network: Send + std::fmt::Debug {
    /// Stage names in order; prunable layers are among them.
    fn stages(&self) -> &[&'static str];
    /// Runs stage `i` on its input.
    fn run_stage(&self, i: usize, x: &Tensor, train: bool) -> Tensor;
    /// Prunable layers (stage names whose output has channels on dim 1).
    fn prunable(&self) -> Vec<LayerInfo>;
    /// The layer pruned by default (the last conv feature map before the head).
    fn default_layer(&self) -> &'static str;
    /// Writes a channel mask of `layer` into the weights so that plain
    /// inference gives the same output as the masked model.
    fn bake_mask(&self, layer: &str, keep: &Tensor);
    /// The whole forward pass when no layer is masked, where the network
    /// has a faster order of the same exact operations than its stages.
    fn forward_unmasked(&self, _x: &Tensor, _train: bool) -> Option<Tensor> {
        None
    }
    /// The head after `layer` as a [`LinearHead`], where it has that form.
    fn linear_head(&self, _layer: &str) -> Option<LinearHead> {
        None
    }
    /// Whether each image's output (and its gradient) in training depends
    /// on that image alone (no batch statistics), so a batch may be split.
    fn batch_independent(&self) -> bool {
        false
    }
}

/// What a checkpoint says about its model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub arch: Arch,
    pub classes: i64,
    /// `(C, H, W)` of the inputs.
    pub input_shape: (i64, i64, i64),
}

/// A classifier: variables, the network, and its channel masks.
pub struct Model {
    pub vs: nn::VarStore,
    pub info: ModelInfo,
    net: Box<dyn Network>,
    masks: BTreeMap<String, Tensor>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("info", &self.info)
            .field("net", &self.net)
            .field("masked_layers", &self.masks.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Model {
    /// A freshly initialised model whose weights are a function of `seed`
    /// (and the device) only, whatever else runs in the process.
    pub fn seeded(info: ModelInfo, device: Device, seed: u64) -> Result<Model> {
        crate::rng::seeded(seed, || Model::build(info, device))
    }

    /// A freshly initialised model with unseeded weights: use
    /// [`Model::seeded`] for reproducible weights, this one where the
    /// weights are overwritten (loading).
    pub fn new(info: ModelInfo, device: Device) -> Result<Model> {
        crate::rng::locked(|| Model::build(info, device))
    }

    fn build(info: ModelInfo, device: Device) -> Result<Model> {
        let vs = nn::VarStore::new(device);
        let (c, h, w) = info.input_shape;
        if c < 1 || h < 1 || w < 1 || info.classes < 2 {
            return Err(Error::invalid(
                "model",
                format!(
                    "bad input shape {:?} / classes {}",
                    info.input_shape, info.classes
                ),
            ));
        }
        let net: Box<dyn Network> = match info.arch {
            Arch::BadnetCnn => Box::new(BadNetCnn::new(&vs.root(), c, h, w, info.classes)?),
            Arch::PreactResnet18 => Box::new(PreActResNet18::new(&vs.root(), c, info.classes)),
            Arch::Resnet18 => Box::new(ResNet18::new(&vs.root(), c, info.classes)),
        };
        Ok(Model {
            vs,
            info,
            net,
            masks: BTreeMap::new(),
        })
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// See [`Network::batch_independent`].
    pub fn batch_independent(&self) -> bool {
        self.net.batch_independent()
    }

    pub fn prunable_layers(&self) -> Vec<LayerInfo> {
        self.net.prunable()
    }

    pub fn default_layer(&self) -> &'static str {
        self.net.default_layer()
    }

    /// The layer's info, or an error listing the prunable layers.
    pub fn layer(&self, name: &str) -> Result<LayerInfo> {
        let layers = self.prunable_layers();
        layers
            .iter()
            .find(|l| l.name == name)
            .cloned()
            .ok_or_else(|| Error::UnknownLayer {
                layer: name.to_string(),
                available: layers
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    fn stage_index(&self, layer: &str) -> Result<usize> {
        self.layer(layer)?;
        Ok(self
            .net
            .stages()
            .iter()
            .position(|s| *s == layer)
            .expect("prunable layers are stages"))
    }

    fn run(&self, mut x: Tensor, from: usize, to: usize, train: bool) -> Tensor {
        let stages = self.net.stages();
        for (i, name) in stages.iter().enumerate().take(to).skip(from) {
            x = self.net.run_stage(i, &x, train);
            if let Some(m) = self.masks.get(*name) {
                x = x.g_mul(&m.view([1, -1, 1, 1]));
            }
        }
        x
    }

    /// Logits.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        if self.masks.is_empty() {
            if let Some(y) = self.net.forward_unmasked(x, train) {
                return y;
            }
        }
        self.run(x.shallow_clone(), 0, self.net.stages().len(), train)
    }

    /// Activations of `layer` (after its mask).
    pub fn features_t(&self, x: &Tensor, layer: &str, train: bool) -> Result<Tensor> {
        let i = self.stage_index(layer)?;
        Ok(self.run(x.shallow_clone(), 0, i + 1, train))
    }

    /// Logits from activations of `layer`.
    pub fn head_t(&self, features: &Tensor, layer: &str, train: bool) -> Result<Tensor> {
        let i = self.stage_index(layer)?;
        Ok(self.run(
            features.shallow_clone(),
            i + 1,
            self.net.stages().len(),
            train,
        ))
    }

    /// The head after `layer` as a [`LinearHead`] (eval mode), when the
    /// network gives one and no mask of a later stage would be skipped.
    pub fn linear_head(&self, layer: &str) -> Result<Option<LinearHead>> {
        let i = self.stage_index(layer)?;
        let later_mask = self.net.stages()[i + 1..]
            .iter()
            .any(|s| self.masks.contains_key(*s));
        Ok(if later_mask {
            None
        } else {
            self.net.linear_head(layer)
        })
    }

    /// Sets (or clears) the keep-mask of a layer: `[C]`, 1 keeps a channel, 0
    /// prunes it.
    pub fn set_mask(&mut self, layer: &str, keep: Option<Tensor>) -> Result<()> {
        let info = self.layer(layer)?;
        match keep {
            None => {
                self.masks.remove(layer);
            }
            Some(m) => {
                if m.size() != [info.channels] {
                    return Err(Error::invalid(
                        "mask",
                        format!(
                            "layer {layer} has {} channels, mask has shape {:?}",
                            info.channels,
                            m.size()
                        ),
                    ));
                }
                self.masks.insert(
                    layer.to_string(),
                    m.to_kind(Kind::Float).to_device(self.device()),
                );
            }
        }
        Ok(())
    }

    /// Keep-mask pruning the given channels of a layer.
    pub fn prune_channels(&mut self, layer: &str, channels: &[i64]) -> Result<()> {
        let info = self.layer(layer)?;
        if let Some(bad) = channels.iter().find(|&&c| c < 0 || c >= info.channels) {
            return Err(Error::invalid(
                "channels",
                format!(
                    "channel {bad} out of range for layer {layer} ({} channels)",
                    info.channels
                ),
            ));
        }
        let mut keep = Tensor::ones([info.channels], (Kind::Float, Device::Cpu));
        if !channels.is_empty() {
            let _ = keep.index_fill_(0, &Tensor::from_slice(channels), 0.0);
        }
        self.set_mask(layer, Some(keep))
    }

    pub fn mask(&self, layer: &str) -> Option<&Tensor> {
        self.masks.get(layer)
    }

    /// Writes every mask into the weights and clears the masks.
    pub fn bake_masks(&mut self) {
        let masks = std::mem::take(&mut self.masks);
        tch::no_grad(|| {
            for (layer, keep) in &masks {
                self.net.bake_mask(layer, keep);
            }
        });
    }

    /// Saves `<dir>/model.safetensors` (PyTorch names) and `<dir>/model.json`.
    /// Masks are baked into the saved weights. Written atomically.
    pub fn save(&self, dir: &Path, meta: &CheckpointMeta) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let weights = dir.join("model.safetensors");
        let tmp = dir.join("model.partial.safetensors");
        if self.masks.is_empty() {
            self.vs.save(&tmp)?;
        } else {
            // save a baked copy, leaving this model's masks in place
            let mut copy = Model::new(self.info.clone(), Device::Cpu)?;
            copy.vs.copy(&self.vs)?;
            for (l, m) in &self.masks {
                copy.set_mask(l, Some(m.to_device(Device::Cpu)))?;
            }
            copy.bake_masks();
            copy.vs.save(&tmp)?;
        }
        std::fs::rename(&tmp, &weights).map_err(|e| Error::io(&weights, e))?;
        let mut meta = meta.clone();
        meta.model = self.info.clone();
        let json = dir.join("model.json");
        crate::data::idx::write_atomic(
            &json,
            serde_json::to_string_pretty(&meta)
                .expect("meta serializes")
                .as_bytes(),
        )?;
        Ok(weights)
    }

    /// Loads a checkpoint: a folder with `model.safetensors` + `model.json`,
    /// or the `.safetensors` file itself (with `model.json` beside it).
    pub fn load(path: &Path, device: Device) -> Result<(Model, CheckpointMeta)> {
        let (weights, json) = checkpoint_paths(path);
        let text = std::fs::read(&json).map_err(|e| {
            Error::checkpoint(&json, format!("cannot read the sidecar model.json: {e}"))
        })?;
        let meta: CheckpointMeta = serde_json::from_slice(&text)
            .map_err(|e| Error::checkpoint(&json, format!("bad sidecar: {e}")))?;
        let mut model = Model::new(meta.model.clone(), device)?;
        model
            .vs
            .load(&weights)
            .map_err(|e| Error::checkpoint(&weights, e.to_string()))?;
        Ok((model, meta))
    }

    /// Loads weights exported from PyTorch (`torch.save` of a state_dict
    /// converted with `safetensors.torch.save_file`) into a model.
    pub fn load_weights(&mut self, weights: &Path) -> Result<()> {
        self.vs
            .load(weights)
            .map_err(|e| Error::checkpoint(weights, e.to_string()))
    }

    /// Parameter names in PyTorch style, sorted.
    pub fn parameter_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.vs.variables().into_keys().collect();
        v.sort();
        v
    }

    /// Copies the weights of another model of the same architecture.
    pub fn copy_from(&mut self, other: &Model) -> Result<()> {
        self.vs.copy(&other.vs)?;
        Ok(())
    }

    /// A deep copy (weights and masks) on a device.
    pub fn duplicate(&self, device: Device) -> Result<Model> {
        let mut m = Model::new(self.info.clone(), device)?;
        m.vs.copy(&self.vs)?;
        for (l, k) in &self.masks {
            m.set_mask(l, Some(k.shallow_clone()))?;
        }
        Ok(m)
    }
}

/// `(weights, sidecar)` paths for a checkpoint folder or weights file.
pub fn checkpoint_paths(path: &Path) -> (PathBuf, PathBuf) {
    if path.is_dir() {
        (path.join("model.safetensors"), path.join("model.json"))
    } else {
        (path.to_path_buf(), path.with_file_name("model.json"))
    }
}

/// The JSON sidecar of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub model: ModelInfo,
    /// Epochs completed.
    pub epoch: usize,
    #[serde(default)]
    pub metrics: serde_json::Value,
    /// The spec that produced it (TOML text), if any.
    #[serde(default)]
    pub spec: Option<String>,
    /// Channels pruned (baked into the weights), per layer.
    #[serde(default)]
    pub pruned: BTreeMap<String, Vec<i64>>,
}

impl CheckpointMeta {
    pub fn new(model: &ModelInfo) -> Self {
        CheckpointMeta {
            model: model.clone(),
            epoch: 0,
            metrics: serde_json::Value::Null,
            spec: None,
            pruned: BTreeMap::new(),
        }
    }
}

/// A seeded one-channel `badnet-cnn` on the CPU, for the crate's tests.
#[cfg(test)]
pub(crate) fn test_badnet(classes: i64, (h, w): (i64, i64), seed: u64) -> Model {
    Model::seeded(
        ModelInfo {
            arch: Arch::BadnetCnn,
            classes,
            input_shape: (1, h, w),
        },
        Device::Cpu,
        seed,
    )
    .expect("a valid toy model")
}

#[cfg(test)]
mod tests;
