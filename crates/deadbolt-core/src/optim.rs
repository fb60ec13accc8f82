//! SGD with momentum and Adam, with the same update rules as
//! `torch.optim.SGD` (dampening 0, no Nesterov) and `torch.optim.Adam`
//! (L2 weight decay added to the gradient, no AMSGrad), whose state (the
//! momentum buffers, Adam's moments and step) is saved beside every epoch
//! checkpoint. A resumed training run therefore continues exactly where the
//! interrupted one stopped, instead of restarting the momentum from zero.
//!
//! The state is a safetensors file with PyTorch-style keys:
//! `momentum_buffer.<param>` (SGD), `exp_avg.<param>` and
//! `exp_avg_sq.<param>` (Adam), plus `step` and `epoch` (one-element
//! int64 tensors).

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::spec::{OptimizerKind, TrainingSpec};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// An optimizer over a model's trainable parameters, by PyTorch name.
pub struct Optimizer {
    kind: OptimizerKind,
    momentum: f64,
    weight_decay: f64,
    params: Vec<(String, Tensor)>,
    /// Per parameter: `[momentum_buffer]` (SGD) or `[exp_avg, exp_avg_sq]`
    /// (Adam); created on the first step.
    state: BTreeMap<String, Vec<Tensor>>,
    /// Steps taken.
    pub step: i64,
}

impl std::fmt::Debug for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Optimizer")
            .field("kind", &self.kind)
            .field("params", &self.params.len())
            .field("step", &self.step)
            .finish()
    }
}

fn slots(kind: OptimizerKind) -> &'static [&'static str] {
    match kind {
        OptimizerKind::Sgd => &["momentum_buffer"],
        OptimizerKind::Adam => &["exp_avg", "exp_avg_sq"],
    }
}

impl Optimizer {
    pub fn new(model: &Model, spec: &TrainingSpec) -> Optimizer {
        let vars: BTreeMap<String, Tensor> = model.vs.variables().into_iter().collect();
        Optimizer {
            kind: spec.optimizer,
            momentum: spec.momentum,
            weight_decay: spec.weight_decay,
            params: vars
                .into_iter()
                .filter(|(_, t)| t.requires_grad())
                .collect(),
            state: BTreeMap::new(),
            step: 0,
        }
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// One update with learning rate `lr` from the parameters' gradients.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.step += 1;
        let (kind, momentum, wd, step) = (self.kind, self.momentum, self.weight_decay, self.step);
        let Some(dev) = self.params.first().map(|(_, p)| p.device()) else {
            return Ok(());
        };
        // 0-d factors, so every update is one fused in-place op per tensor
        // (addcmul_) with no temporaries: the step costs ~4 small kernels
        // per parameter, as libtorch's own SGD
        let factor = |v: f64| Tensor::scalar_tensor(v, (Kind::Float, dev));
        let (wd_t, neg_lr) = (factor(wd), factor(-lr));
        tch::no_grad(|| -> Result<()> {
            for (name, p) in &mut self.params {
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                if wd != 0.0 {
                    // in place: the gradient is zeroed before the next backward
                    let _ = g.f_addcmul_(&*p, &wd_t)?;
                }
                match kind {
                    OptimizerKind::Sgd => {
                        let d = if momentum != 0.0 {
                            match self.state.get_mut(name.as_str()) {
                                Some(s) => {
                                    let _ = s[0].f_mul_scalar_(momentum)?.f_add_(&g)?;
                                    s[0].shallow_clone()
                                }
                                None => {
                                    let b = g.copy();
                                    self.state.insert(name.clone(), vec![b.shallow_clone()]);
                                    b
                                }
                            }
                        } else {
                            g
                        };
                        let _ = p.f_addcmul_(&d, &neg_lr)?;
                    }
                    OptimizerKind::Adam => {
                        let s = self
                            .state
                            .entry(name.clone())
                            .or_insert_with(|| vec![g.zeros_like(), g.zeros_like()]);
                        let _ = s[0].f_lerp_(&g, 1.0 - BETA1)?;
                        let _ = s[1]
                            .f_mul_scalar_(BETA2)?
                            .f_addcmul_(&g, &(&g * (1.0 - BETA2)))?;
                        let c1 = 1.0 - BETA1.powi(step as i32);
                        let c2 = 1.0 - BETA2.powi(step as i32);
                        let denom = (s[1].sqrt() / c2.sqrt()) + EPS;
                        let _ = p.f_addcmul_(&(&s[0] / denom), &factor(-lr / c1))?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Writes the state after `epoch` completed epochs to `path`
    /// atomically.
    pub fn save(&self, path: &Path, epoch: usize) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = vec![
            ("step".into(), Tensor::from_slice(&[self.step])),
            ("epoch".into(), Tensor::from_slice(&[epoch as i64])),
        ];
        for (name, s) in &self.state {
            for (slot, t) in slots(self.kind).iter().zip(s) {
                tensors.push((format!("{slot}.{name}"), t.to_device(Device::Cpu)));
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let tmp = path.with_extension("partial");
        Tensor::write_safetensors(&tensors, &tmp)
            .map_err(|e| Error::checkpoint(&tmp, e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// Loads a state saved after `epoch` epochs by [`Optimizer::save`];
    /// an error names the file when it is unreadable, was saved after
    /// another epoch, or does not fit the model.
    pub fn load(&mut self, path: &Path, epoch: usize) -> Result<()> {
        let bad = |m: String| Error::checkpoint(path, m);
        let read: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| bad(e.to_string()))?
            .into_iter()
            .collect();
        let scalar = |k: &str| -> Result<i64> {
            read.get(k)
                .filter(|t| t.numel() == 1 && t.kind() == Kind::Int64)
                .map(|t| t.int64_value(&[0]))
                .ok_or_else(|| bad(format!("no `{k}` entry")))
        };
        let saved_epoch = scalar("epoch")?;
        if saved_epoch != epoch as i64 {
            return Err(bad(format!(
                "optimizer state is from epoch {saved_epoch}, the weights from epoch {epoch}"
            )));
        }
        let step = scalar("step")?;
        let mut state = BTreeMap::new();
        for (name, p) in &self.params {
            let mut s = Vec::new();
            for slot in slots(self.kind) {
                if let Some(t) = read.get(&format!("{slot}.{name}")) {
                    if t.size() != p.size() {
                        return Err(bad(format!(
                            "{slot}.{name} has shape {:?}, the parameter {:?}",
                            t.size(),
                            p.size()
                        )));
                    }
                    s.push(t.to_kind(p.kind()).to_device(p.device()));
                }
            }
            match s.len() {
                0 => {}
                n if n == slots(self.kind).len() => {
                    state.insert(name.clone(), s);
                }
                _ => return Err(bad(format!("incomplete state for {name}"))),
            }
        }
        let known = 2 + state.len() * slots(self.kind).len();
        if known != read.len() {
            return Err(bad(format!(
                "{} entries do not belong to a {:?} optimizer of this model",
                read.len() - known,
                self.kind
            )));
        }
        self.state = state;
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        crate::model::test_badnet(3, (16, 16), 4)
    }

    fn lr(kind: OptimizerKind) -> f64 {
        match kind {
            OptimizerKind::Sgd => 0.05,
            OptimizerKind::Adam => 1e-3,
        }
    }

    fn steps(m: &Model, opt: &mut Optimizer, n: usize, x: &Tensor, y: &Tensor) {
        for _ in 0..n {
            opt.zero_grad();
            m.forward_t(x, true).cross_entropy_for_logits(y).backward();
            opt.step(lr(opt.kind)).unwrap();
        }
    }

    /// The same updates as tch's (libtorch's C++) SGD and Adam.
    #[test]
    fn matches_libtorch_optimizers() {
        use tch::nn::OptimizerConfig;
        let x = crate::rng::uniform(&[8, 1, 16, 16], 1);
        let y = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0, 1]);
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adam] {
            let spec = TrainingSpec {
                optimizer: kind,
                momentum: 0.9,
                weight_decay: 5e-4,
                ..Default::default()
            };
            let (a, b) = (model(), model());
            let mut ours = Optimizer::new(&a, &spec);
            steps(&a, &mut ours, 5, &x, &y);
            let mut theirs = match kind {
                OptimizerKind::Sgd => tch::nn::Sgd {
                    momentum: 0.9,
                    dampening: 0.0,
                    wd: 5e-4,
                    nesterov: false,
                }
                .build(&b.vs, lr(kind))
                .unwrap(),
                OptimizerKind::Adam => tch::nn::Adam {
                    wd: 5e-4,
                    ..Default::default()
                }
                .build(&b.vs, lr(kind))
                .unwrap(),
            };
            for _ in 0..5 {
                theirs.backward_step(&b.forward_t(&x, true).cross_entropy_for_logits(&y));
            }
            // the same arithmetic in another order: float rounding only
            let (va, vb) = (a.vs.variables(), b.vs.variables());
            for (k, t) in &va {
                let d = (t - &vb[k]).abs().max().double_value(&[]);
                assert!(d < 1e-5, "{kind:?} {k}: {d}");
            }
        }
    }

    /// Saving after some steps and continuing in a fresh optimizer gives
    /// exactly the weights of an uninterrupted run.
    #[test]
    fn save_and_load_continue_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let x = crate::rng::uniform(&[8, 1, 16, 16], 2);
        let y = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0, 1]);
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adam] {
            let spec = TrainingSpec {
                optimizer: kind,
                momentum: 0.9,
                ..Default::default()
            };
            let straight = model();
            let mut o = Optimizer::new(&straight, &spec);
            steps(&straight, &mut o, 6, &x, &y);

            let first = model();
            let mut o = Optimizer::new(&first, &spec);
            steps(&first, &mut o, 3, &x, &y);
            let path = dir.path().join("optimizer.safetensors");
            o.save(&path, 1).unwrap();
            // a fresh model given the interrupted run's weights
            let mut resumed = model();
            resumed.copy_from(&first).unwrap();
            let mut o = Optimizer::new(&resumed, &spec);
            assert!(o
                .load(&path, 2)
                .unwrap_err()
                .to_string()
                .contains("epoch 1"));
            o.load(&path, 1).unwrap();
            assert_eq!(o.step, 3);
            steps(&resumed, &mut o, 3, &x, &y);
            let (va, vb) = (straight.vs.variables(), resumed.vs.variables());
            for (k, t) in &va {
                assert!(t.equal(&vb[k]), "{kind:?} {k} differs after resuming");
            }
            // the state of the other optimizer kind does not fit
            let other = TrainingSpec {
                optimizer: match kind {
                    OptimizerKind::Sgd => OptimizerKind::Adam,
                    OptimizerKind::Adam => OptimizerKind::Sgd,
                },
                ..spec.clone()
            };
            let mut o = Optimizer::new(&resumed, &other);
            let e = o.load(&path, 1).unwrap_err().to_string();
            assert!(e.contains("optimizer.safetensors"), "{e}");
        }
        let garbage = dir.path().join("bad.safetensors");
        std::fs::write(&garbage, b"nope").unwrap();
        let m = model();
        let e = Optimizer::new(&m, &TrainingSpec::default())
            .load(&garbage, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.safetensors"), "{e}");
    }
}
