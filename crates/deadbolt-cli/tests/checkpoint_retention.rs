//! A long run's stored checkpoints stay at `keep_epochs` (default 2): the
//! embedded `deadbolt experiment` trains 10 epochs, and the artifact store
//! holds the model objects of 2 epochs per model, not 10.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn count(dir: &Path, tag: &str, hits: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            count(&p, tag, hits);
        } else if p.ends_with("model.safetensors") {
            let s = p.display().to_string();
            if s.contains(&format!("/{tag}/epoch-")) {
                hits.push(s);
            }
        }
    }
}

#[test]
fn ten_epochs_keep_two_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = tiny_spec_local(d, 10, 300);
    let out = d.join("out");
    let o = Command::new(bin())
        .args(["--quiet", "experiment"])
        .arg(&spec)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let store = out.join(".deadbolt/artifacts");
    for tag in ["clean", "backdoored"] {
        let mut hits = Vec::new();
        count(&store, tag, &mut hits);
        hits.sort();
        assert_eq!(hits.len(), 2, "{tag}: {hits:#?}");
        assert!(hits[0].contains("/epoch-10/") || hits[1].contains("/epoch-10/"));
        assert!(hits.iter().any(|h| h.contains("/epoch-9/")), "{hits:#?}");
    }
}
