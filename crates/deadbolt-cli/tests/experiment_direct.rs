//! `deadbolt experiment` (services in-process, driven over gRPC) writes the
//! same files as the core's pipeline (`--direct`): the same file set, the
//! same figures byte for byte, and the same report apart from timings and
//! paths. The spec fine-tunes (`defense.fine_tune_epochs = 1`), so k is
//! chosen with the fine-tuning in the loop on both paths.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

fn files(dir: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            if rel.starts_with(".deadbolt") {
                continue;
            }
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(rel);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// The report without what legitimately differs (wall times, paths).
fn science(mut v: Value) -> Value {
    let o = v.as_object_mut().unwrap();
    for k in ["timings", "figures"] {
        o.remove(k);
    }
    for m in ["clean_model", "backdoored_model"] {
        let m = o[m].as_object_mut().unwrap();
        m.remove("checkpoint");
        m.remove("train_seconds");
    }
    let s = o["synthetic_trigger"].as_object_mut().unwrap();
    s.remove("trigger_file");
    s.remove("seconds");
    for t in ["pruning", "pruning_synthetic"] {
        for (_, r) in o[t].as_object_mut().unwrap().iter_mut() {
            let r = r.as_object_mut().unwrap();
            r.remove("checkpoint");
            r.remove("seconds");
        }
    }
    v
}

#[test]
fn services_write_the_same_files_as_the_core_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = tiny_spec_local(d, 1, 1200);
    // k chosen with the fine-tuning in the loop, on both paths
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(
        &spec,
        text.replace("[defense]\n", "[defense]\nfine_tune_epochs = 1\n"),
    )
    .unwrap();
    let run = |out: &str, direct: bool| {
        let mut c = Command::new(bin());
        c.args(["--quiet", "experiment"])
            .arg(&spec)
            .arg("--out")
            .arg(d.join(out));
        if direct {
            c.arg("--direct");
        }
        c.stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join(format!("{out}.log"))).unwrap())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (run("services", false), run("direct", true));
    for (name, child) in [("services", &mut a), ("direct", &mut b)] {
        assert!(
            child.wait().unwrap().success(),
            "{name}: {}",
            std::fs::read_to_string(d.join(format!("{name}.log"))).unwrap_or_default()
        );
    }
    let (sa, sb) = (d.join("services"), d.join("direct"));
    let fa = files(&sa);
    assert_eq!(fa, files(&sb));
    for f in fa
        .iter()
        .filter(|f| f.ends_with(".png") || f.ends_with(".safetensors"))
    {
        assert_eq!(
            std::fs::read(sa.join(f)).unwrap(),
            std::fs::read(sb.join(f)).unwrap(),
            "{f}"
        );
    }
    let read = |p: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("report.json")).unwrap()).unwrap()
    };
    let (ra, rb) = (read(&sa), read(&sb));
    for (c, r) in ra["pruning"].as_object().unwrap() {
        let search = &r["fine_tune_search"];
        let tried = search["candidates"].as_array().unwrap();
        assert!(!tried.is_empty(), "{c}: {search}");
        let choice = r["choice"].as_str().unwrap();
        assert!(choice.starts_with("fine-tuned"), "{c}: {choice}");
        // the chosen k is the last one tried when it met the target
        let k = r["chosen"]["k"].as_i64().unwrap();
        if choice == "fine-tuned-meets-target" {
            assert_eq!(tried.last().unwrap()["k"].as_i64(), Some(k), "{c}");
        }
        assert_eq!(r["fine_tuned"]["k"].as_i64(), Some(k), "{c}");
    }
    assert_eq!(science(ra), science(rb));
    assert_eq!(
        std::fs::read_to_string(sa.join("spec.toml")).unwrap(),
        std::fs::read_to_string(sb.join("spec.toml")).unwrap()
    );
}
