//! One status map, one retry rule (issue 19 §6), kept that way by reading
//! the sources (plain std, no parser):
//!
//! - outside [`ALLOWED`], no non-test code under `crates/*/src` builds a
//!   `tonic::Status` by hand (`Status::new(`, `Status::<code>(`,
//!   `Status::with_*(`): an error says its code ([`ServiceError`]) and
//!   `deadbolt_proto::status` makes the status;
//! - a function named `retryable` is defined only in deadbolt-proto
//!   (`deadbolt_proto::retry`).
//!
//! Test code is skipped cheaply: files under `tests/` are not read, and in
//! a source file an item under a `#[cfg(test)]` line is skipped up to the
//! `}` at its own indentation (rustfmt's layout); `//` comment lines too.
//!
//! [`ServiceError`]: deadbolt_proto::ServiceError

use std::path::{Path, PathBuf};

/// Where building a `Status` by hand is the point, each with its reason:
/// (file, the constructor called, why).
const ALLOWED: &[(&str, &str, &str)] = &[
    (
        "crates/deadbolt-proto/src/error.rs",
        "Status::new(",
        "the one error-to-status mapping (`status`) itself",
    ),
    (
        "crates/deadbolt-proto/src/validate.rs",
        "Status::with_error_details(",
        "the field-violation statuses (INVALID_ARGUMENT, RESOURCE_EXHAUSTED with a \
         google.rpc.BadRequest) that the mapping and request validation build",
    ),
];

/// The constructors of `tonic::Status` that make a status out of a code
/// and a message.
fn constructors() -> Vec<String> {
    let codes = [
        "cancelled",
        "unknown",
        "invalid_argument",
        "deadline_exceeded",
        "not_found",
        "already_exists",
        "permission_denied",
        "resource_exhausted",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "unimplemented",
        "internal",
        "unavailable",
        "data_loss",
        "unauthenticated",
        "new",
        "with_details",
        "with_metadata",
        "with_details_and_metadata",
        "with_error_details",
        "with_error_details_vec",
        "with_error_details_and_metadata",
        "with_error_details_vec_and_metadata",
    ];
    codes.iter().map(|c| format!("Status::{c}(")).collect()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every `crates/<crate>/src/**/*.rs`, as (path relative to the
/// workspace, text), sorted.
fn sources() -> Vec<(String, String)> {
    let root = root();
    let mut files = Vec::new();
    for c in std::fs::read_dir(root.join("crates"))
        .expect("crates/")
        .flatten()
    {
        rust_files(&c.path().join("src"), &mut files);
    }
    let mut out: Vec<(String, String)> = files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            (rel, text)
        })
        .collect();
    out.sort();
    assert!(
        out.iter()
            .any(|(p, _)| p == "crates/deadbolt-proto/src/error.rs"),
        "the scan finds the sources"
    );
    out
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The (1-based line number, line) of a source's non-test code: an item
/// under `#[cfg(test)]` is skipped to the `}` at its indentation (or its
/// own line when it ends with `;`), and so are `//` comment lines.
fn non_test_lines(text: &str) -> Vec<(usize, &str)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let t = line.trim();
        if t.starts_with("#[cfg(test)]") {
            let at = indent(line);
            i += 1;
            // further attributes of the same item
            while i < lines.len() && lines[i].trim().starts_with("#[") {
                i += 1;
            }
            let one_line = |l: &str| {
                l.trim_end().ends_with(';') || l.matches('{').count() == l.matches('}').count()
            };
            if i < lines.len() && !one_line(lines[i]) {
                // rustfmt closes the item with a `}` at its indentation (a
                // deeper `}` has more spaces before it)
                let close = format!("{}}}", " ".repeat(at));
                while i < lines.len() && !lines[i].starts_with(&close) {
                    i += 1;
                }
            }
            i += 1;
            continue;
        }
        if !t.starts_with("//") {
            out.push((i + 1, line));
        }
        i += 1;
    }
    out
}

/// The hand-built statuses in a source: (line number, constructor).
fn status_sites(text: &str) -> Vec<(usize, String)> {
    let ctors = constructors();
    let mut out = Vec::new();
    for (n, line) in non_test_lines(text) {
        for c in &ctors {
            let mut from = 0;
            while let Some(k) = line[from..].find(c.as_str()) {
                let at = from + k;
                // `Status::x(`, not `JobStatus::x(` or `ServingStatus::x(`
                let before = line[..at].chars().next_back();
                if !before.is_some_and(|b| b.is_alphanumeric() || b == '_') {
                    out.push((n, c.clone()));
                }
                from = at + c.len();
            }
        }
    }
    out
}

/// The line numbers where a function named `retryable` is defined.
fn retryable_fns(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("//") {
            continue;
        }
        let mut from = 0;
        while let Some(k) = line[from..].find("fn retryable") {
            let at = from + k + "fn retryable".len();
            let before = line[..from + k].chars().next_back();
            let after = line[at..].chars().next();
            if !before.is_some_and(|b| b.is_alphanumeric() || b == '_')
                && !after.is_some_and(|a| a.is_alphanumeric() || a == '_')
            {
                out.push(i + 1);
            }
            from = at;
        }
    }
    out
}

#[test]
fn statuses_come_from_the_one_map() {
    let mut found = Vec::new();
    let mut used = vec![false; ALLOWED.len()];
    for (path, text) in sources() {
        for (line, ctor) in status_sites(&text) {
            match ALLOWED
                .iter()
                .position(|(p, c, _)| *p == path && *c == ctor)
            {
                Some(k) => used[k] = true,
                None => found.push(format!("{path}:{line}: {ctor}")),
            }
        }
    }
    assert!(
        found.is_empty(),
        "tonic::Status built by hand outside deadbolt-proto's mapping: give the \
         error a variant in its service's error enum (it says its code) and let \
         deadbolt_proto::status make the status, or add an entry with its reason \
         to ALLOWED in this test:\n{}",
        found.join("\n")
    );
    let stale: Vec<_> = ALLOWED
        .iter()
        .zip(&used)
        .filter(|(_, u)| !**u)
        .map(|((p, c, _), _)| format!("{p}: {c}"))
        .collect();
    assert!(
        stale.is_empty(),
        "allow-list entries that match nothing any more (remove them):\n{}",
        stale.join("\n")
    );
}

#[test]
fn one_retry_rule() {
    let mut defs = Vec::new();
    for (path, text) in sources() {
        for line in retryable_fns(&text) {
            defs.push(format!("{path}:{line}"));
        }
    }
    let (home, elsewhere): (Vec<_>, Vec<_>) = defs
        .into_iter()
        .partition(|d| d.starts_with("crates/deadbolt-proto/src/retry.rs:"));
    assert!(
        elsewhere.is_empty(),
        "a function named `retryable` outside deadbolt_proto::retry: ask the one \
         rule (deadbolt_proto::retryable) instead:\n{}",
        elsewhere.join("\n")
    );
    assert_eq!(
        home.len(),
        1,
        "deadbolt_proto::retry defines `retryable` once"
    );
}

/// The scanner itself: it finds what it must and skips test code.
#[test]
fn the_scan_sees_sites_and_skips_tests() {
    let src = r#"
use tonic::Status;
fn a() -> Status {
    Status::internal(format!("x {}", 1))
}
fn b() { let _ = JobStatus::new(1); let _ = Status::from(e); }
// Status::not_found("in a comment")
#[cfg(test)]
fn helper() -> Status {
    Status::unavailable("test only")
}
fn c() -> Status { tonic::Status::new(Code::Ok, "") }
#[cfg(test)]
mod tests {
    fn d() {
        if x {
            Status::aborted("test");
        }
    }
    fn retryable() {}
}
#[cfg(test)]
fn f() { g() }
fn e() { Status::with_details(c, m, d); }
"#;
    let sites: Vec<(usize, String)> = status_sites(src);
    assert_eq!(
        sites,
        [
            (4, "Status::internal(".to_string()),
            (12, "Status::new(".to_string()),
            (24, "Status::with_details(".to_string()),
        ]
    );
    assert_eq!(
        retryable_fns("pub fn retryable(code: Code) -> bool {\nfn retryable_x() {}\n// fn retryable(\n    fn retryable<T>() {}"),
        [1, 4]
    );
}
