//! What a spec that arrives over the network may ask for.
//!
//! - **Limits**: operator-configured upper bounds on every cost field
//!   (epochs, batch size, fine-tune epochs, synthetic-trigger steps and
//!   images, statistics images, threads, training-set size) and on the
//!   lengths of names; a spec over a bound is refused with
//!   INVALID_ARGUMENT naming the field and the bound.
//! - **No server paths**: a remote spec never names a file of the server.
//!   `dataset.path` must be the *name* of a dataset the operator configured
//!   (`[datasets.<name>] root = ...`, under `data_root` when that is set);
//!   the gateway replaces it by the configured root before the spec is
//!   stored. Trigger images (`pattern = { image = ... }`) are refused. The
//!   answer never depends on whether a path exists on the server. The
//!   embedded `deadbolt experiment` (the user's own files) allows local
//!   paths (`allow_local_paths`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use deadbolt_proto::validate::Violations;
use deadbolt_spec::ExperimentSpec;
use serde::{Deserialize, Serialize};
use tonic::Status;

/// Upper bounds on what one run may cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_epochs: usize,
    pub max_batch_size: usize,
    pub max_fine_tune_epochs: usize,
    pub max_synthetic_steps: usize,
    pub max_synthetic_images: usize,
    pub max_stats_images: usize,
    pub max_threads: usize,
    /// Largest training split a run may use (`dataset.train_limit`; 0, all
    /// of it, counts as this bound being asked for).
    pub max_train_images: usize,
    /// Longest run name and client request id, in bytes.
    pub max_name_len: usize,
    /// Runs (queued or running) a team may have at once.
    pub max_runs_in_flight: i64,
    /// Largest file a client may upload, in bytes.
    pub max_upload_bytes: u64,
}

impl Limits {
    /// No bounds (the embedded `deadbolt experiment`: the user's machine).
    pub fn unbounded() -> Limits {
        Limits {
            max_epochs: usize::MAX,
            max_batch_size: usize::MAX,
            max_fine_tune_epochs: usize::MAX,
            max_synthetic_steps: usize::MAX,
            max_synthetic_images: usize::MAX,
            max_stats_images: usize::MAX,
            max_threads: usize::MAX,
            max_train_images: usize::MAX,
            max_name_len: usize::MAX,
            max_runs_in_flight: i64::MAX,
            max_upload_bytes: u64::MAX,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_epochs: 200,
            max_batch_size: 4096,
            max_fine_tune_epochs: 50,
            max_synthetic_steps: 5000,
            max_synthetic_images: 5000,
            max_stats_images: 20_000,
            max_threads: 64,
            max_train_images: 1_000_000,
            max_name_len: 128,
            max_runs_in_flight: 32,
            max_upload_bytes: 256 << 20,
        }
    }
}

/// A dataset the operator offers to remote specs by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetEntry {
    /// Its folder on the servers.
    pub root: PathBuf,
    /// Expected sha256 of its files (file name -> hex), checked by the
    /// data stage before every read.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sha256: BTreeMap<String, String>,
}

/// Checks `spec` against `limits` (INVALID_ARGUMENT naming each field over
/// its bound, e.g. `spec.training.epochs`).
pub fn check_limits(spec: &ExperimentSpec, limits: &Limits) -> Result<(), Status> {
    let mut v = Violations::new();
    let mut at_most = |field: &str, value: usize, bound: usize| {
        if value > bound {
            v.add(
                format!("spec.{field}"),
                format!("{value} is above this service's limit of {bound}"),
            );
        }
    };
    at_most("name", spec.name.len(), limits.max_name_len);
    at_most("training.epochs", spec.training.epochs, limits.max_epochs);
    at_most(
        "training.batch_size",
        spec.training.batch_size,
        limits.max_batch_size,
    );
    at_most(
        "training.threads",
        spec.training.threads,
        limits.max_threads,
    );
    at_most(
        "defense.fine_tune_epochs",
        spec.defense.fine_tune_epochs,
        limits.max_fine_tune_epochs,
    );
    at_most(
        "defense.synthetic.steps",
        spec.defense.synthetic.steps,
        limits.max_synthetic_steps,
    );
    at_most(
        "defense.synthetic.images",
        spec.defense.synthetic.images,
        limits.max_synthetic_images,
    );
    at_most(
        "defense.stats_images",
        spec.defense.stats_images,
        limits.max_stats_images,
    );
    let train = match spec.dataset.train_limit {
        0 => usize::MAX,
        n => n,
    };
    if train > limits.max_train_images {
        v.add(
            "spec.dataset.train_limit",
            format!(
                "{} is above this service's limit of {} training images (set train_limit)",
                if train == usize::MAX {
                    "all images (0)".to_string()
                } else {
                    train.to_string()
                },
                limits.max_train_images
            ),
        );
    }
    v.check()
}

/// Replaces a remote spec's dataset name by the configured root (with its
/// checksums), and `upload:<name>` (dataset or trigger image) by the
/// object-storage location of `team`'s upload; refuses anything else that
/// would name a server file. Returns the uploads the spec uses, which the
/// caller checks exist (a missing one answers like an unknown name).
pub fn resolve_remote_paths(
    spec: &mut ExperimentSpec,
    datasets: &BTreeMap<String, DatasetEntry>,
    data_root: Option<&std::path::Path>,
    team: &str,
) -> Result<Vec<crate::uploads::UploadUse>, Status> {
    use crate::uploads::{self, UploadKind, UploadUse};
    let mut used = Vec::new();
    let mut v = Violations::new();
    let names = || {
        let n: Vec<&str> = datasets.keys().map(String::as_str).collect();
        if n.is_empty() {
            "none is configured".to_string()
        } else {
            format!("one of: {}", n.join(", "))
        }
    };
    let upload = |field: &'static str, text: &str, kind: UploadKind, v: &mut Violations| {
        let name = text.strip_prefix(uploads::UPLOAD_SCHEME)?;
        match uploads::check_name(name) {
            Ok(()) => Some(UploadUse {
                field,
                name: name.to_string(),
                kind,
                location: uploads::location(team, kind, name),
            }),
            Err(e) => {
                v.add(field, e);
                None
            }
        }
    };
    if let Some(p) = spec.dataset.path.clone() {
        let name = p.to_string_lossy().to_string();
        let field = "spec.dataset.path";
        if name.starts_with(uploads::UPLOAD_SCHEME) {
            if let Some(u) = upload(field, &name, UploadKind::Dataset, &mut v) {
                spec.dataset.path = Some(u.location.clone().into());
                used.push(u);
            }
        } else {
            match datasets.get(&name) {
                Some(entry) => {
                    let inside = data_root.is_none_or(|r| entry.root.starts_with(r));
                    if inside {
                        spec.dataset.path = Some(entry.root.clone());
                        spec.dataset.sha256 = entry.sha256.clone();
                    } else {
                        tracing::error!(dataset = %name, "configured dataset root is outside data_root");
                        v.add(
                            "spec.dataset.path",
                            format!("dataset {name:?} is not available"),
                        );
                    }
                }
                None => {
                    v.add(
                        "spec.dataset.path",
                        format!(
                            "remote specs name a dataset this service offers ({}) or an upload \
                         (upload:<name>), never a path",
                            names()
                        ),
                    );
                }
            }
        }
    }
    if let Some(p) = uploads::trigger_image_mut(spec) {
        let field = "spec.attack.trigger.pattern";
        let text = p.to_string_lossy().to_string();
        if text.starts_with(uploads::UPLOAD_SCHEME) {
            if let Some(u) = upload(field, &text, UploadKind::TriggerImage, &mut v) {
                *p = u.location.clone().into();
                used.push(u);
            }
        } else {
            v.add(
                field,
                "remote specs cannot name an image file on the server; upload it \
                 (deadbolt upload trigger) and name it upload:<name>, or use a built-in pattern",
            );
        }
    }
    v.check()?;
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> ExperimentSpec {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn names_uploads_and_paths_resolve_per_team() {
        let mut datasets = BTreeMap::new();
        datasets.insert(
            "mnist".to_string(),
            DatasetEntry {
                root: "/srv/data/mnist".into(),
                sha256: [("t10k-labels-idx1-ubyte".to_string(), "ab".repeat(32))].into(),
            },
        );
        let root = Some(std::path::Path::new("/srv/data"));

        // a configured name: its root and its pinned checksums
        let mut s = spec("[dataset]\nkind = \"mnist\"\npath = \"mnist\"\n");
        assert!(resolve_remote_paths(&mut s, &datasets, root, "team-a")
            .unwrap()
            .is_empty());
        assert_eq!(
            s.dataset.path.unwrap(),
            std::path::Path::new("/srv/data/mnist")
        );
        assert_eq!(s.dataset.sha256.len(), 1);

        // uploads: the team's object prefix, returned for the existence check
        let mut s = spec(
            "[dataset]\nkind = \"mnist\"\npath = \"upload:digits\"\n[attack]\ntarget = 0\nrate = 0.1\n[attack.trigger]\nkind = \"patch\"\nsize = 3\npattern = { image = \"upload:mark\" }\n",
        );
        let used = resolve_remote_paths(&mut s, &datasets, root, "team-a").unwrap();
        assert_eq!(used.len(), 2);
        assert_eq!(
            s.dataset.path.unwrap().to_str().unwrap(),
            "object:teams/team-a/datasets/digits"
        );

        // a path, a hostile upload name, an object location, a server image:
        // refused, each naming its field
        for (text, field) in [
            ("[dataset]\nkind = \"mnist\"\npath = \"/etc\"\n", "spec.dataset.path"),
            ("[dataset]\nkind = \"mnist\"\npath = \"upload:../x\"\n", "spec.dataset.path"),
            (
                "[dataset]\nkind = \"mnist\"\npath = \"object:teams/team-b/datasets/x\"\n",
                "spec.dataset.path",
            ),
            (
                "[dataset]\nkind = \"mnist\"\n[attack]\ntarget = 0\nrate = 0.1\n[attack.trigger]\nkind = \"patch\"\nsize = 3\npattern = { image = \"/etc/x.png\" }\n",
                "spec.attack.trigger.pattern",
            ),
        ] {
            let mut s = spec(text);
            let e = resolve_remote_paths(&mut s, &datasets, root, "team-a").unwrap_err();
            let fields: Vec<String> = deadbolt_proto::validate::field_violations(&e)
                .into_iter()
                .map(|(f, _)| f)
                .collect();
            assert!(fields.contains(&field.to_string()), "{text}: {e:?}");
        }
    }
}
