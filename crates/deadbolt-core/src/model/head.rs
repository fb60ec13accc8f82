//! Heads that are linear in each channel of a prunable layer up to their
//! first linear map, which is what lets a pruning sweep update the head's
//! pre-activations channel by channel instead of re-running it per `k`.

use tch::Tensor;

/// The head after a prunable layer when it has the form
/// `logits = rest(W · vec(blocks(f)) + b)`, where `blocks` maps the layer's
/// activations `f` (`[N, C, ...]`) to per-channel blocks `[N, C, B]`, channel
/// by channel, and maps a zero channel to a zero block (max- or
/// average-pooling, flattening). `W`'s columns are ordered channel-major
/// (`c * B + b`), as PyTorch's `flatten(1)` orders them.
///
/// Masking channel `c` of `f` then zeroes block `c` and nothing else, so it
/// removes exactly the term `W[:, cB..(c+1)B] · blocks(f)[c]` from the
/// pre-activations `W · vec(blocks(f)) + b`.
#[derive(Debug)]
pub struct LinearHead {
    /// The per-channel map from the layer's activations to `[N, C, B]`.
    pub blocks: fn(&Tensor) -> Tensor,
    /// `[O, C * B]`.
    pub weight: Tensor,
    /// `[O]`.
    pub bias: Option<Tensor>,
    /// What follows the linear map, in order, up to the logits.
    pub rest: Vec<HeadOp>,
}

/// One operation after a head's first linear map.
#[derive(Debug)]
pub enum HeadOp {
    Relu,
    /// `x · weightᵀ + bias`.
    Linear {
        weight: Tensor,
        bias: Option<Tensor>,
    },
}

impl HeadOp {
    /// Another handle of the same op (the same weight tensors).
    pub fn shallow_clone(&self) -> HeadOp {
        match self {
            HeadOp::Relu => HeadOp::Relu,
            HeadOp::Linear { weight, bias } => HeadOp::Linear {
                weight: weight.shallow_clone(),
                bias: bias.as_ref().map(Tensor::shallow_clone),
            },
        }
    }
}

impl LinearHead {
    /// Logits from pre-activations `[N, O]` (the rest of the head).
    pub fn finish(&self, z: &Tensor) -> Tensor {
        self.rest.iter().fold(z.shallow_clone(), |x, op| match op {
            HeadOp::Relu => x.relu(),
            HeadOp::Linear { weight, bias } => x.linear(weight, bias.as_ref()),
        })
    }
}
