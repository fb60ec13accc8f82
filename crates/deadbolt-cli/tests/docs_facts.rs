//! What the docs state that the code can check, cheaply (plain std: no
//! libtorch, no servers):
//!
//! - README.md is at most 200 lines and holds the two commands verbatim;
//! - every relative link of README.md and docs/*.md points at an existing
//!   file (and a `#fragment` into a Markdown file at one of its headings);
//! - the crate graph of docs/architecture.md (the fenced `crate-graph`
//!   block, one `a -> b` edge per line) equals the workspace-internal
//!   `[dependencies]` of every crates/*/Cargo.toml;
//! - the lease statement and the Postgres session limits the docs name are
//!   the ones in deadbolt-store.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// README.md and every docs/*.md.
fn doc_files() -> Vec<PathBuf> {
    let root = root();
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "docs/ holds no Markdown file");
    files.extend(docs);
    files
}

#[test]
fn readme_is_at_most_200_lines() {
    let text = read(&root().join("README.md"));
    let n = text.lines().count();
    assert!(
        n <= 200,
        "README.md has {n} lines; keep it at most 200 (move detail into docs/)"
    );
}

#[test]
fn readme_holds_the_two_commands() {
    let text = read(&root().join("README.md"));
    let block = "```sh\n\
# the main job: the whole pipeline on the real MNIST digits, no servers needed\n\
scripts/deadbolt experiment examples/mnist-badnets.toml --out runs/mnist-badnets\n\
\n\
# the whole test suite (what CI runs: .ci/run)\n\
scripts/test.sh\n\
```\n";
    assert!(
        text.contains(block),
        "README.md must hold the two commands verbatim:\n{block}"
    );
    // and they are what they say they are
    let root = root();
    for f in [
        "scripts/deadbolt",
        "scripts/test.sh",
        "examples/mnist-badnets.toml",
    ] {
        assert!(root.join(f).is_file(), "{f} is missing");
    }
    assert!(
        read(&root.join(".ci/run")).contains("scripts/test.sh"),
        ".ci/run does not run scripts/test.sh"
    );
}

/// The Markdown outside fenced code blocks, with inline code spans blanked
/// (a link inside code is not a link).
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            out.push('\n');
            continue;
        }
        if fenced {
            out.push('\n');
            continue;
        }
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
                out.push(' ');
            } else {
                out.push(if in_code { ' ' } else { c });
            }
        }
        out.push('\n');
    }
    out
}

/// The targets of `[text](target)` and `![alt](target)` links.
fn link_targets(text: &str) -> Vec<String> {
    let p = prose(text);
    let mut out = Vec::new();
    let mut rest = p.as_str();
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        let target = after[..end].trim();
        // `(path "title")`: the path only
        let target = target.split_whitespace().next().unwrap_or("");
        let target = target.trim_start_matches('<').trim_end_matches('>');
        if !target.is_empty() {
            out.push(target.to_string());
        }
        rest = &after[end..];
    }
    out
}

/// GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to
/// hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn relative_links_resolve() {
    let root = root();
    let mut checked = 0;
    let mut broken = Vec::new();
    for file in doc_files() {
        let text = read(&file);
        let dir = file.parent().unwrap();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, fragment) = match target.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            let shown = format!(
                "{}: {target}",
                file.strip_prefix(&root).unwrap_or(&file).display()
            );
            checked += 1;
            if !resolved.exists() {
                broken.push(format!("{shown} (no such file)"));
                continue;
            }
            if let Some(f) = fragment {
                if resolved.extension().is_some_and(|x| x == "md")
                    && !anchors(&read(&resolved)).contains(f)
                {
                    broken.push(format!("{shown} (no heading #{f})"));
                }
            }
        }
    }
    assert!(
        checked > 10,
        "only {checked} relative links found: is the parser right?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The edges of docs/architecture.md's ```crate-graph block.
fn documented_graph() -> BTreeSet<(String, String)> {
    let text = read(&root().join("docs/architecture.md"));
    let mut lines = text.lines();
    lines
        .by_ref()
        .find(|l| l.trim() == "```crate-graph")
        .expect("docs/architecture.md has a ```crate-graph block");
    let mut edges = BTreeSet::new();
    for line in lines {
        let line = line.trim();
        if line == "```" {
            return edges;
        }
        if line.is_empty() || line.starts_with("//") {
            continue;
        }
        let (a, b) = line
            .split_once("->")
            .unwrap_or_else(|| panic!("crate-graph line {line:?} is not `a -> b`"));
        edges.insert((a.trim().to_string(), b.trim().to_string()));
    }
    panic!("the crate-graph block of docs/architecture.md is not closed");
}

/// `(package, deadbolt dependency)` for every normal (not dev-, not build-)
/// dependency of every crates/*/Cargo.toml, read line by line: the
/// `[dependencies]` (or `[target.….dependencies]`) tables' keys, and
/// `[dependencies.<name>]` tables.
fn cargo_graph() -> BTreeSet<(String, String)> {
    let mut edges = BTreeSet::new();
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(root().join("crates"))
        .unwrap()
        .map(|e| e.unwrap().path().join("Cargo.toml"))
        .filter(|p| p.is_file())
        .collect();
    manifests.sort();
    assert!(
        manifests.len() >= 8,
        "found only {} crates",
        manifests.len()
    );
    for manifest in manifests {
        let text = read(&manifest);
        let mut table = String::new();
        let mut package: Option<String> = None;
        let mut deps = Vec::new();
        for raw in text.lines() {
            let line = raw.split('#').next().unwrap().trim();
            if line.is_empty() {
                continue;
            }
            if line.starts_with('[') {
                table = line
                    .trim_matches(|c| c == '[' || c == ']')
                    .trim()
                    .to_string();
                // [dependencies.deadbolt-x]
                if let Some(name) = table.strip_prefix("dependencies.") {
                    deps.push(name.trim_matches('"').to_string());
                }
                continue;
            }
            let key = line
                .split(['=', '.'])
                .next()
                .unwrap()
                .trim()
                .trim_matches('"')
                .to_string();
            if table == "package" && key == "name" {
                let v = line.split_once('=').unwrap().1.trim().trim_matches('"');
                package = Some(v.to_string());
            }
            let normal = table == "dependencies"
                || (table.starts_with("target.") && table.ends_with(".dependencies"));
            if normal {
                deps.push(key);
            }
        }
        let package =
            package.unwrap_or_else(|| panic!("{}: no [package] name", manifest.display()));
        for d in deps.into_iter().filter(|d| d.starts_with("deadbolt-")) {
            edges.insert((package.clone(), d));
        }
    }
    edges
}

#[test]
fn the_documented_crate_graph_is_the_cargo_graph() {
    let documented = documented_graph();
    let actual = cargo_graph();
    let fmt = |s: &BTreeSet<(String, String)>| {
        s.iter()
            .map(|(a, b)| format!("  {a} -> {b}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let missing: BTreeSet<_> = actual.difference(&documented).cloned().collect();
    let extra: BTreeSet<_> = documented.difference(&actual).cloned().collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/architecture.md's crate-graph block differs from crates/*/Cargo.toml\n\
         in Cargo.toml, not in the docs:\n{}\nin the docs, not in Cargo.toml:\n{}",
        fmt(&missing),
        fmt(&extra)
    );
}

#[test]
fn the_documented_lease_statement_and_session_limits_are_the_stores() {
    let root = root();
    let statement = "FOR NO KEY UPDATE SKIP LOCKED";
    let dialects = read(&root.join("crates/deadbolt-store/src/queries.rs"));
    assert!(
        dialects.contains(&format!("(\"skip_locked\", \"{statement}\", \"\")")),
        "the Postgres dialect's skip_locked is no longer {statement:?}: update docs/architecture.md"
    );
    let arch = read(&root.join("docs/architecture.md"));
    assert!(
        arch.contains(statement),
        "docs/architecture.md does not name {statement:?}"
    );
    for file in doc_files() {
        assert!(
            !read(&file).contains("FOR UPDATE SKIP LOCKED"),
            "{} says FOR UPDATE SKIP LOCKED; the lease statement is {statement}",
            file.display()
        );
    }

    // idle_in_transaction_session_timeout L/3, statement_timeout L/2,
    // lock_timeout L/4 (SessionLimits::for_lease)
    let liveness = read(&root.join("crates/deadbolt-store/src/liveness.rs"));
    for (field, setting, part) in [
        (
            "idle_in_transaction",
            "idle_in_transaction_session_timeout",
            3,
        ),
        ("statement", "statement_timeout", 2),
        ("lock", "lock_timeout", 4),
    ] {
        assert!(
            liveness.contains(&format!("{field}: part({part}),")),
            "SessionLimits::for_lease no longer sets {field} to L/{part}: update the docs"
        );
        let row = arch
            .lines()
            .find(|l| l.starts_with("  | `") && l.contains(&format!("`{setting}`")))
            .unwrap_or_else(|| panic!("docs/architecture.md has no table row for {setting}"));
        assert!(
            row.contains(&format!("L/{part}")),
            "docs/architecture.md's {setting} row does not say L/{part}: {row}"
        );
    }
}
