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

/// The real MNIST digits (data/mnist). A folder a spec or a service's
/// config names is read as given, never filled by the run, so the first
/// call writes them there with the `deadbolt` binary (`data fetch-mnist`,
/// idempotent) when they are missing: the binary beside the test's (the
/// integration tests of deadbolt-cli run from `target/<profile>/deps`), or
/// `$DEADBOLT_BIN`. Without one the folder is left as it is.
pub fn mnist_dir() -> PathBuf {
    static FETCH: std::sync::Once = std::sync::Once::new();
    let dir = repo().join("data/mnist");
    FETCH.call_once(|| {
        let files = [
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ];
        if files.iter().all(|f| dir.join(f).is_file()) {
            return;
        }
        let beside = std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.parent()?.join("deadbolt")));
        let bin = std::env::var_os("DEADBOLT_BIN")
            .map(PathBuf::from)
            .or(beside)
            .filter(|b| b.is_file());
        if let Some(bin) = bin {
            let ok = std::process::Command::new(&bin)
                .args(["data", "fetch-mnist", "--out"])
                .arg(&dir)
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "{} data fetch-mnist --out {} failed",
                bin.display(),
                dir.display()
            );
        }
    });
    dir
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
