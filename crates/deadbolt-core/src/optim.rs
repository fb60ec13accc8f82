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
//!
//! [`TensorAdam`] is the one Adam for loose tensors that are not a model's
//! parameters (the reverse-engineered triggers of [`crate::defense::cleanse`]).

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
///
/// When the parameters are float32 on one device (every model here), the
/// optimizer lays them out back to back in one tensor, of which each
/// parameter becomes a view (the model's variables are the same tensors;
/// only where their values live changes), and their gradients and state
/// likewise once the first backward pass has made the gradients: a step
/// is then a handful of ops over all parameters at once instead of a
/// handful per parameter, the same arithmetic element by element.
pub struct Optimizer {
    kind: OptimizerKind,
    momentum: f64,
    weight_decay: f64,
    params: Vec<(String, Tensor)>,
    /// Per parameter: `[momentum_buffer]` (SGD) or `[exp_avg, exp_avg_sq]`
    /// (Adam); created on the first step (views of `flat.state` when flat).
    state: BTreeMap<String, Vec<Tensor>>,
    flat: Option<Flat>,
    /// Steps taken.
    pub step: i64,
}

/// The parameters, gradients and state back to back.
struct Flat {
    params: Tensor,
    /// Set on the first step whose parameters all have gradients.
    grads: Option<Tensor>,
    /// Set with `grads` (from the loaded state) or by the first update.
    state: Option<Vec<Tensor>>,
    /// `(offset, shape)` of each parameter, in `params` order.
    layout: Vec<(i64, Vec<i64>)>,
}

impl Flat {
    /// Lays out `tensors` (one per parameter) back to back and makes each
    /// one a view of the result.
    fn adopt(&self, tensors: &mut [Tensor]) -> Tensor {
        let flat = Tensor::cat(
            &tensors
                .iter()
                .map(|t| t.detach().flatten(0, -1))
                .collect::<Vec<_>>(),
            0,
        );
        for (t, view) in tensors.iter_mut().zip(self.views(&flat)) {
            t.set_data(&view);
        }
        flat
    }

    /// One view of `flat` per parameter.
    fn views(&self, flat: &Tensor) -> Vec<Tensor> {
        self.layout
            .iter()
            .map(|(offset, shape)| {
                let n = shape.iter().product::<i64>();
                flat.narrow(0, *offset, n).view(shape.as_slice())
            })
            .collect()
    }
}

impl std::fmt::Debug for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Optimizer")
            .field("kind", &self.kind)
            .field("params", &self.params.len())
            .field("flat", &self.flat.is_some())
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

/// What one update needs besides the tensors.
#[derive(Clone, Copy)]
struct Hyper {
    kind: OptimizerKind,
    momentum: f64,
    weight_decay: f64,
    step: i64,
    lr: f64,
}

impl Hyper {
    /// Updates `p` from its gradient `g` (weight decay is added to `g` in
    /// place: it is zeroed before the next backward) and its state, created
    /// when `None`. 0-d factors, so every update is one fused in-place op
    /// per tensor with no temporaries, as libtorch's own SGD.
    fn update(self, p: &mut Tensor, g: &mut Tensor, state: &mut Option<Vec<Tensor>>) -> Result<()> {
        let factor = |v: f64| Tensor::scalar_tensor(v, (Kind::Float, p.device()));
        if self.weight_decay != 0.0 {
            let _ = g.f_addcmul_(&*p, &factor(self.weight_decay))?;
        }
        match self.kind {
            OptimizerKind::Sgd => {
                let d = if self.momentum != 0.0 {
                    match state {
                        Some(s) => {
                            let _ = s[0].f_mul_scalar_(self.momentum)?.f_add_(&*g)?;
                            s[0].shallow_clone()
                        }
                        None => {
                            let b = g.copy();
                            *state = Some(vec![b.shallow_clone()]);
                            b
                        }
                    }
                } else {
                    g.shallow_clone()
                };
                let _ = p.f_addcmul_(&d, &factor(-self.lr))?;
            }
            OptimizerKind::Adam => {
                let s = state.get_or_insert_with(|| vec![g.zeros_like(), g.zeros_like()]);
                let _ = s[0].f_lerp_(&*g, 1.0 - BETA1)?;
                let _ = s[1]
                    .f_mul_scalar_(BETA2)?
                    .f_addcmul_(&*g, &(&*g * (1.0 - BETA2)))?;
                let c1 = 1.0 - BETA1.powi(self.step as i32);
                let c2 = 1.0 - BETA2.powi(self.step as i32);
                let denom = (s[1].sqrt() / c2.sqrt()) + EPS;
                let _ = p.f_addcmul_(&(&s[0] / denom), &factor(-self.lr / c1))?;
            }
        }
        Ok(())
    }
}

impl Optimizer {
    /// An optimizer over the model's trainable parameters, which it lays
    /// out back to back (see the type's docs).
    pub fn new(model: &Model, spec: &TrainingSpec) -> Optimizer {
        let vars: BTreeMap<String, Tensor> = model.vs.variables().into_iter().collect();
        let params: Vec<(String, Tensor)> = vars
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        let flat = params.first().and_then(|(_, first)| {
            let dev = first.device();
            if !params
                .iter()
                .all(|(_, p)| p.kind() == Kind::Float && p.device() == dev)
            {
                return None;
            }
            let mut offset = 0;
            let layout = params
                .iter()
                .map(|(_, p)| {
                    let at = offset;
                    offset += p.numel() as i64;
                    (at, p.size())
                })
                .collect();
            let mut flat = Flat {
                params: Tensor::new(),
                grads: None,
                state: None,
                layout,
            };
            let mut tensors: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
            flat.params = tch::no_grad(|| flat.adopt(&mut tensors));
            Some(flat)
        });
        Optimizer {
            kind: spec.optimizer,
            momentum: spec.momentum,
            weight_decay: spec.weight_decay,
            params,
            state: BTreeMap::new(),
            flat,
            step: 0,
        }
    }

    pub fn zero_grad(&mut self) {
        if let Some(Flat { grads: Some(g), .. }) = &mut self.flat {
            let _ = g.zero_();
            return;
        }
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// Makes the gradients (and any loaded state) flat on the first step
    /// where every parameter has a gradient; whether the step can be flat.
    fn flat_ready(&mut self) -> bool {
        let Some(flat) = &mut self.flat else {
            return false;
        };
        if flat.grads.is_some() {
            return true;
        }
        let mut grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
        if !grads.iter().all(Tensor::defined) {
            return false;
        }
        let n_slots = slots(self.kind).len();
        let have = self
            .params
            .iter()
            .filter(|(name, _)| self.state.contains_key(name))
            .count();
        if have != 0 && have != self.params.len() {
            // a state for some parameters only: stay per parameter
            self.flat = None;
            return false;
        }
        flat.grads = Some(flat.adopt(&mut grads));
        if have != 0 {
            let state = (0..n_slots)
                .map(|i| {
                    let mut per: Vec<Tensor> = self
                        .params
                        .iter()
                        .map(|(name, _)| self.state[name][i].shallow_clone())
                        .collect();
                    flat.adopt(&mut per)
                })
                .collect();
            flat.state = Some(state);
        }
        true
    }

    /// One update with learning rate `lr` from the parameters' gradients.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.step += 1;
        let hyper = Hyper {
            kind: self.kind,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
            step: self.step,
            lr,
        };
        tch::no_grad(|| -> Result<()> {
            if self.flat_ready() {
                let flat = self.flat.as_mut().expect("flat is ready");
                let had_state = flat.state.is_some();
                let mut grads = flat.grads.as_ref().expect("flat is ready").shallow_clone();
                hyper.update(&mut flat.params, &mut grads, &mut flat.state)?;
                if !had_state {
                    if let Some(state) = &flat.state {
                        let per_slot: Vec<Vec<Tensor>> =
                            state.iter().map(|s| flat.views(s)).collect();
                        for (i, (name, _)) in self.params.iter().enumerate() {
                            let views = per_slot.iter().map(|v| v[i].shallow_clone()).collect();
                            self.state.insert(name.clone(), views);
                        }
                    }
                }
                return Ok(());
            }
            for (name, p) in &mut self.params {
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut state = self.state.remove(name.as_str());
                hyper.update(p, &mut g, &mut state)?;
                if let Some(s) = state {
                    self.state.insert(name.clone(), s);
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
        if let Some(flat) = &mut self.flat {
            // laid out again from the loaded state on the next step
            flat.grads = None;
            flat.state = None;
        }
        Ok(())
    }
}

/// Adam on one loose tensor (no weight decay, no saved state), the textbook
/// update with bias-corrected moments:
/// `p -= lr * m_hat / (sqrt(v_hat) + eps)`, the same betas and eps as
/// [`Optimizer`]'s Adam, written as separate tensor ops rather than
/// [`Optimizer`]'s fused in-place ones (the two may round differently).
/// The reverse-engineered triggers and their figures depend on these exact
/// ops in this order: keep them (`tensor_adam_is_the_written_out_update`).
pub struct TensorAdam {
    m: Tensor,
    v: Tensor,
    t: i32,
}

impl TensorAdam {
    /// Zero moments shaped like `like`.
    pub fn new(like: &Tensor) -> Self {
        TensorAdam {
            m: like.zeros_like(),
            v: like.zeros_like(),
            t: 0,
        }
    }

    /// One Adam step of `param` (in place) from `grad`.
    pub fn step(&mut self, param: &mut Tensor, grad: &Tensor, lr: f64) {
        let (b1, b2, eps) = (BETA1, BETA2, EPS);
        self.t += 1;
        self.m = &self.m * b1 + grad * (1.0 - b1);
        self.v = &self.v * b2 + grad.square() * (1.0 - b2);
        let mh = &self.m / (1.0 - b1.powi(self.t));
        let vh = &self.v / (1.0 - b2.powi(self.t));
        let upd = mh / (vh.sqrt() + eps) * lr;
        let _ = param.g_sub_(&upd);
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

    /// `TensorAdam` is, bit for bit, the update written out as the
    /// reverse-engineering engines had it inline (their figures rest on it).
    #[test]
    fn tensor_adam_is_the_written_out_update() {
        let mut p = crate::rng::uniform(&[3, 1, 4, 4], 11);
        let mut q = p.copy();
        let mut adam = TensorAdam::new(&p);
        let (mut m, mut v) = (q.zeros_like(), q.zeros_like());
        let (b1, b2, eps, lr) = (0.9f64, 0.999f64, 1e-8f64, 0.1);
        for t in 1..=25 {
            let g = crate::rng::uniform(&[3, 1, 4, 4], 100 + t as u64) - 0.5;
            adam.step(&mut p, &g, lr);
            m = &m * b1 + &g * (1.0 - b1);
            v = &v * b2 + g.square() * (1.0 - b2);
            let mh = &m / (1.0 - b1.powi(t));
            let vh = &v / (1.0 - b2.powi(t));
            let _ = q.g_sub_(&(mh / (vh.sqrt() + eps) * lr));
            assert!(p.equal(&q), "step {t}");
        }
        // the first step moves every coordinate by lr against its gradient's sign
        let mut r = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        TensorAdam::new(&r).step(&mut r, &Tensor::from_slice(&[0.3f32, -2.0]), 0.5);
        let moved = Vec::<f32>::try_from(&r).unwrap();
        assert!(
            (moved[0] + 0.5).abs() < 1e-6 && (moved[1] - 0.5).abs() < 1e-6,
            "{moved:?}"
        );
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
