//! The project's torch virtualenv (`scripts/setup.sh` makes it;
//! `scripts/env.sh` names it `DEADBOLT_VENV`) and `scripts/byom_torch.py`,
//! which trains, exports and evaluates models in PyTorch for the tests.

use std::path::PathBuf;
use std::process::Command;

use crate::specs::repo;

/// `byom_torch.py train` arguments of the tests' backdoor: a 4x4 random
/// binary patch at rows 3-6, columns 12-15 (not a corner: a trigger
/// deadbolt's own trigger code cannot make), relabelled to 3 at a 10% rate.
pub const RANDOM_PATCH_BACKDOOR: [&str; 12] = [
    "--rate",
    "0.1",
    "--trigger",
    "random",
    "--size",
    "4",
    "--row",
    "3",
    "--col",
    "12",
    "--target",
    "3",
];

/// The virtualenv's python.
pub fn python() -> PathBuf {
    let venv = std::env::var_os("DEADBOLT_VENV")
        .expect("DEADBOLT_VENV names the torch virtualenv: source scripts/env.sh");
    PathBuf::from(venv).join("bin/python")
}

/// Runs `scripts/byom_torch.py ARGS...`; its last stdout line as JSON
/// (`{}` when it prints none). Panics with its stderr when it fails.
pub fn byom_torch(args: &[&str]) -> serde_json::Value {
    let out = Command::new(python())
        .arg(repo().join("scripts/byom_torch.py"))
        .args(args)
        .output()
        .expect("run the torch virtualenv's python (scripts/setup.sh makes it)");
    assert!(
        out.status.success(),
        "byom_torch.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("{}")).expect("byom_torch.py prints JSON")
}
