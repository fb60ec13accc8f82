//! Tiny experiment specs for tests (seconds on 2 cores).

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root exists")
}

/// The tiny spec (`specs/tiny.toml`: a small badnet-cnn on real MNIST
/// digits) with the absolute data path, `epochs` and `train_limit`, written
/// into `dir`.
pub fn tiny_spec(dir: &Path, epochs: usize, train_limit: usize) -> PathBuf {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/tiny.toml"))
            .expect("specs/tiny.toml")
            .replace(
                "kind = \"mnist\"",
                &format!(
                    "kind = \"mnist\"\npath = \"{}\"",
                    repo().join("data/mnist").display()
                ),
            )
            .replace("epochs = 1", &format!("epochs = {epochs}"))
            .replace(
                "train_limit = 1200",
                &format!("train_limit = {train_limit}"),
            );
    let p = dir.join(format!("spec-{epochs}-{train_limit}.toml"));
    std::fs::write(&p, text).expect("writing the tiny spec");
    p
}
