//! libtorch's global random generator, used only under one lock.
//!
//! Weight initialisation draws from torch's process-wide generator. Two
//! jobs (or tests) seeding and drawing from it at the same time would
//! interleave their draws and lose reproducibility, so every draw from it
//! in this crate goes through [`seeded`], which seeds and draws while
//! holding a process-wide lock.

use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

static GLOBAL_RNG: Mutex<()> = Mutex::new(());

/// Runs `f` while no other [`seeded`] or [`locked`] call runs, without
/// seeding: for draws whose values do not matter (weights about to be
/// overwritten) but which must not disturb a seeded sequence elsewhere.
pub fn locked<T>(f: impl FnOnce() -> T) -> T {
    let _guard = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    f()
}

/// Runs `f` with torch's global generator seeded with `seed` and no other
/// [`seeded`] call running. `f` must not call [`seeded`] or [`locked`] itself.
pub fn seeded<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    // a panic under the lock leaves nothing half-done that matters here
    let _guard = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed as i64);
    f()
}

/// Uniform [0, 1) floats on the CPU, a function of `shape` and `seed` only.
pub fn uniform(shape: &[i64], seed: u64) -> Tensor {
    seeded(seed, || Tensor::rand(shape, (Kind::Float, Device::Cpu)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_draws_across_threads() {
        let draws: Vec<Tensor> = std::thread::scope(|s| {
            let h: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..20).map(|_| uniform(&[64], 7)).collect::<Vec<_>>()))
                .collect();
            h.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        for d in &draws[1..] {
            assert!(d.equal(&draws[0]));
        }
        assert!(!uniform(&[64], 8).equal(&draws[0]));
    }
}
