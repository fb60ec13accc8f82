//! The crate graph is a fan, not a chain (read from `cargo metadata`):
//! spec <- proto <- store <- runtime <- {stages, gateway} <- cli, and
//! core <- stages. No stage or service crate depends on another, and the
//! crates that need no libtorch do not link it: not the gateway (its image
//! has no libtorch) nor anything under it, and not the `deadbolt` binary
//! built without its `torch` feature.

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

/// `cargo metadata` of the workspace; `extra`: feature flags, resolved for
/// deadbolt-cli (the current package).
fn metadata(extra: &[&str]) -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", &host()])
        .args(extra)
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

/// The crates that link libtorch, or that pull it in by design.
const LIBTORCH: [&str; 4] = ["tch", "torch-sys", "deadbolt-core", "deadbolt-stages"];

/// The resolved graph: package id -> name, and each package's normal and
/// build dependencies (ids), as resolved with the features asked for.
struct Graph {
    name_of: BTreeMap<String, String>,
    deps: BTreeMap<String, Vec<String>>,
}

impl Graph {
    fn read(m: &Value) -> Graph {
        let name_of = m["packages"]
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
        let deps = m["resolve"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|node| {
                let normal = node["deps"]
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
                (node["id"].as_str().unwrap().to_string(), normal)
            })
            .collect();
        Graph { name_of, deps }
    }

    /// The id of the (one) package named `name`.
    fn id(&self, name: &str) -> &str {
        let ids: Vec<&String> = self
            .name_of
            .iter()
            .filter(|(_, n)| *n == name)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(ids.len(), 1, "{name}: {ids:?}");
        ids[0]
    }

    /// A chain of package names from `root` to a crate of [`LIBTORCH`],
    /// if `root` reaches one through normal or build dependencies.
    fn libtorch_path(&self, root: &str) -> Option<Vec<String>> {
        let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
        let mut todo = std::collections::VecDeque::from([self.id(root)]);
        let mut seen = BTreeSet::from([self.id(root)]);
        while let Some(id) = todo.pop_front() {
            if LIBTORCH.contains(&self.name_of[id].as_str()) {
                let mut chain = vec![self.name_of[id].clone()];
                let mut at = id;
                while let Some(p) = parent.get(at) {
                    chain.push(self.name_of[*p].clone());
                    at = p;
                }
                chain.reverse();
                return Some(chain);
            }
            for d in self.deps.get(id).into_iter().flatten() {
                if seen.insert(d) {
                    parent.insert(d, id);
                    todo.push_back(d);
                }
            }
        }
        None
    }
}

#[test]
fn the_crate_graph_is_a_fan() {
    let m = metadata(&[]);
    let g = Graph::read(&m);
    // each workspace crate's normal deadbolt deps
    let deps: BTreeMap<String, BTreeSet<String>> = m["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let id = v.as_str().unwrap();
            let ds = g.deps[id]
                .iter()
                .map(|d| g.name_of[d].clone())
                .filter(|n| n.starts_with("deadbolt-"))
                .collect();
            (g.name_of[id].clone(), ds)
        })
        .collect();
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

    // no libtorch below the stages, nor in the gateway
    for krate in [
        "deadbolt-spec",
        "deadbolt-proto",
        "deadbolt-store",
        "deadbolt-runtime",
        "deadbolt-gateway",
    ] {
        if let Some(chain) = g.libtorch_path(krate) {
            panic!("{krate} links libtorch: {}", chain.join(" -> "));
        }
    }
}

#[test]
fn the_cli_without_default_features_links_no_libtorch() {
    let g = Graph::read(&metadata(&["--no-default-features"]));
    if let Some(chain) = g.libtorch_path("deadbolt-cli") {
        panic!(
            "deadbolt-cli --no-default-features links libtorch: {}",
            chain.join(" -> ")
        );
    }
    // the same question of the default build finds libtorch (the `torch`
    // feature): the check above looks where libtorch would be
    let g = Graph::read(&metadata(&[]));
    let chain = g
        .libtorch_path("deadbolt-cli")
        .expect("deadbolt-cli links libtorch through its default `torch` feature");
    assert_eq!(chain[0], "deadbolt-cli");
}

/// A graph of named packages (id = name), for the check's own test.
fn fixture(edges: &[(&str, &[&str])]) -> Graph {
    let mut name_of = BTreeMap::new();
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (from, to) in edges {
        for n in std::iter::once(from).chain(to.iter()) {
            name_of.insert(n.to_string(), n.to_string());
        }
        deps.entry(from.to_string())
            .or_default()
            .extend(to.iter().map(|t| t.to_string()));
    }
    Graph { name_of, deps }
}

#[test]
fn the_libtorch_check_finds_tch_added_under_the_gateway() {
    let clean: [(&str, &[&str]); 4] = [
        ("deadbolt-gateway", &["deadbolt-runtime", "tonic"]),
        ("deadbolt-runtime", &["deadbolt-store", "tonic"]),
        ("deadbolt-store", &["sqlx"]),
        ("deadbolt-stages", &["deadbolt-runtime", "tch"]),
    ];
    assert_eq!(fixture(&clean).libtorch_path("deadbolt-gateway"), None);
    // tch straight in the gateway, or two levels down, or the core
    for (edge, chain) in [
        (
            ("deadbolt-gateway", &["tch"][..]),
            &["deadbolt-gateway", "tch"][..],
        ),
        (
            ("deadbolt-store", &["torch-sys"][..]),
            &[
                "deadbolt-gateway",
                "deadbolt-runtime",
                "deadbolt-store",
                "torch-sys",
            ][..],
        ),
        (
            ("deadbolt-runtime", &["deadbolt-core"][..]),
            &["deadbolt-gateway", "deadbolt-runtime", "deadbolt-core"][..],
        ),
    ] {
        let mut edges = clean.to_vec();
        edges.push(edge);
        assert_eq!(
            fixture(&edges).libtorch_path("deadbolt-gateway"),
            Some(chain.iter().map(|s| s.to_string()).collect())
        );
    }
}
