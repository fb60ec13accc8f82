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
/// digits) as a remote client sends it: `dataset.path = "mnist"`, the name
/// of the dataset that [`crate::serve::config`] offers; with `epochs` and
/// `train_limit`, written into `dir`.
pub fn tiny_spec(dir: &Path, epochs: usize, train_limit: usize) -> PathBuf {
    write_tiny(dir, epochs, train_limit, "mnist", "remote")
}

/// The tiny spec with the absolute path of the MNIST folder, for the local
/// commands (`deadbolt experiment`, `--direct`) and runs created straight
/// in the store.
pub fn tiny_spec_local(dir: &Path, epochs: usize, train_limit: usize) -> PathBuf {
    let data = mnist_dir().display().to_string();
    write_tiny(dir, epochs, train_limit, &data, "local")
}

/// The real MNIST digits fetched by scripts/setup.sh (data/mnist).
pub fn mnist_dir() -> PathBuf {
    repo().join("data/mnist")
}

fn write_tiny(dir: &Path, epochs: usize, train_limit: usize, path: &str, tag: &str) -> PathBuf {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/tiny.toml"))
            .expect("specs/tiny.toml")
            .replace(
                "kind = \"mnist\"",
                &format!("kind = \"mnist\"\npath = \"{path}\""),
            )
            .replace("epochs = 1", &format!("epochs = {epochs}"))
            .replace(
                "train_limit = 1200",
                &format!("train_limit = {train_limit}"),
            );
    let p = dir.join(format!("spec-{tag}-{epochs}-{train_limit}.toml"));
    std::fs::write(&p, text).expect("writing the tiny spec");
    p
}
