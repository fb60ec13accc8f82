//! The crate graph is a fan, not a chain (read from `cargo metadata`):
//! spec <- proto <- store <- runtime <- {stages, gateway} <- cli, and
//! core <- stages. No stage or service crate depends on another, and the
//! crates that need no libtorch do not link it.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// The host triple (metadata for other platforms would need their crates).
fn host() -> String {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", &host()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_crate_graph_is_a_fan() {
    let m = metadata();
    let members: BTreeSet<String> = m["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    // package id -> name, and each workspace crate's normal deadbolt deps
    let name_of: BTreeMap<String, String> = m["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_string(),
                p["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut all_deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for node in m["resolve"]["nodes"].as_array().unwrap() {
        let id = node["id"].as_str().unwrap();
        let normal: Vec<String> = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].is_null() || k["kind"] == "build")
            })
            .map(|d| d["pkg"].as_str().unwrap().to_string())
            .collect();
        all_deps.insert(id.to_string(), normal.clone());
        if members.contains(id) {
            deps.insert(
                name_of[id].clone(),
                normal
                    .iter()
                    .map(|d| name_of[d].clone())
                    .filter(|n| n.starts_with("deadbolt-"))
                    .collect(),
            );
        }
    }
    let allowed: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("deadbolt-spec", &[][..]),
        ("deadbolt-proto", &["deadbolt-spec"][..]),
        ("deadbolt-store", &["deadbolt-spec", "deadbolt-proto"][..]),
        (
            "deadbolt-runtime",
            &["deadbolt-spec", "deadbolt-proto", "deadbolt-store"][..],
        ),
        ("deadbolt-core", &["deadbolt-spec"][..]),
        (
            "deadbolt-stages",
            &[
                "deadbolt-spec",
                "deadbolt-proto",
                "deadbolt-store",
                "deadbolt-runtime",
                "deadbolt-core",
            ][..],
        ),
        (
            "deadbolt-gateway",
            &[
                "deadbolt-spec",
                "deadbolt-proto",
                "deadbolt-store",
                "deadbolt-runtime",
            ][..],
        ),
        (
            "deadbolt-test-support",
            &["deadbolt-spec", "deadbolt-proto", "deadbolt-store"][..],
        ),
    ]);
    for (krate, ds) in &deps {
        if krate == "deadbolt-cli" {
            continue;
        }
        let ok = allowed
            .get(krate.as_str())
            .unwrap_or_else(|| panic!("{krate} is not in the crate graph; add it on purpose"));
        for d in ds {
            assert!(
                ok.contains(&d.as_str()),
                "{krate} must not depend on {d} (allowed: {ok:?})"
            );
        }
    }
    // the stage and service crates are the stages crate and the gateway:
    // neither depends on the other
    assert!(!deps["deadbolt-gateway"].contains("deadbolt-stages"));
    assert!(!deps["deadbolt-stages"].contains("deadbolt-gateway"));

    // no libtorch below the stages
    let id_of: BTreeMap<&String, &String> = name_of.iter().map(|(i, n)| (n, i)).collect();
    for krate in [
        "deadbolt-spec",
        "deadbolt-proto",
        "deadbolt-store",
        "deadbolt-runtime",
        "deadbolt-gateway",
    ] {
        let mut seen = BTreeSet::new();
        let mut todo = vec![id_of[&krate.to_string()].clone()];
        while let Some(id) = todo.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            let n = &name_of[&id];
            assert!(
                n != "tch" && n != "torch-sys" && n != "deadbolt-core",
                "{krate} links libtorch through {n}"
            );
            todo.extend(all_deps.get(&id).cloned().unwrap_or_default());
        }
    }
}
