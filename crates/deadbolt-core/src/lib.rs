//! deadbolt-core: the science of deadbolt, on libtorch (tch). No networking.

pub mod error;
pub mod spec;

pub use error::{Error, Result};
