//! What a spec that arrives over the network may ask for.
//!
//! - **Limits**: operator-configured upper bounds on every cost field
//!   (epochs, batch size, fine-tune epochs, synthetic-trigger steps and
//!   images, statistics images, threads, training-set size) and on the
//!   lengths of names and lists; a spec over a bound is refused with
//!   INVALID_ARGUMENT naming the field and the bound. A count of 0 that
//!   means "all" (`dataset.train_limit`, `defense.stats_images`) counts as
//!   the all it asks for, never as unbounded.
//! - **Memory**: a run's memory is estimated from its spec
//!   ([`deadbolt_spec::memory`]) and refused over `max_job_memory_bytes`
//!   with RESOURCE_EXHAUSTED naming the field that drives it, before the
//!   run is queued.
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
    /// Bytes a team's uploads may hold in all (default 16 GiB); an upload
    /// over it is RESOURCE_EXHAUSTED naming this quota.
    pub max_upload_bytes_per_team: u64,
    /// Files a team's uploads may hold in all (default 100,000: an image
    /// folder is a file per image).
    pub max_uploads_per_team: u64,
    /// Bounds on the data a stage reads (a dataset, a scan's clean data
    /// and model card), checked before anything is allocated from a
    /// header, a card or a file (refused with RESOURCE_EXHAUSTED naming
    /// the file or field). Pixels (H x W) of one image: default 64 x 64 =
    /// 4096, so MNIST (28x28), CIFAR-10 (32x32) and small byom images
    /// pass while 512x512 uploads (badnet-cnn's `fc1` grows with the
    /// image: GiBs of weights) are refused.
    pub max_image_pixels: u64,
    /// Channels of one image (default 3: grey or RGB).
    pub max_image_channels: u64,
    /// Classes of a dataset or model card (default 100; a scan's trigger
    /// search runs once per class).
    pub max_classes: u64,
    /// Images of one dataset, all its files together (default 200,000;
    /// MNIST has 70,000). Also bounds an image folder's listing.
    pub max_dataset_images: u64,
    /// Decoded pixel bytes of one dataset (one per channel value; default
    /// 1 GiB, the float tensors are 4x this; MNIST is 55 MB).
    pub max_dataset_bytes: u64,
    /// Bytes of one data file as stored or once inflated from gzip;
    /// inflating stops here (default 256 MiB).
    pub max_inflated_bytes: u64,
    /// Most memory one run's job may need, by the estimate of
    /// `deadbolt_spec::memory` (parameters, activations at the batch size,
    /// the dataset's tensors). Default 8 GiB: the default MNIST run needs
    /// ~0.4 GiB, PreActResNet18 on CIFAR-10 at batch 128 ~3.4 GiB, at
    /// batch 4096 ~60 GiB. Over it, a submit is RESOURCE_EXHAUSTED naming
    /// the dominant field.
    pub max_job_memory_bytes: u64,
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
            max_upload_bytes_per_team: u64::MAX,
            max_uploads_per_team: u64::MAX,
            // the user's own files are still read within the local CLI's
            // data bounds (= deadbolt_core::data::DataLimits::default(),
            // which a deadbolt-stages test keeps equal): a gzip bomb or a
            // lying header is refused here too
            max_image_pixels: 256 * 256,
            max_image_channels: 4,
            max_classes: 1000,
            max_dataset_images: 2_000_000,
            max_dataset_bytes: 4 << 30,
            max_inflated_bytes: 4 << 30,
            max_job_memory_bytes: u64::MAX,
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
            max_upload_bytes_per_team: 16 << 30,
            max_uploads_per_team: 100_000,
            max_image_pixels: 64 * 64,
            max_image_channels: 3,
            max_classes: 100,
            max_dataset_images: 200_000,
            max_dataset_bytes: 1 << 30,
            max_inflated_bytes: 256 << 20,
            max_job_memory_bytes: 8 << 30,
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

/// Most entries of `dataset.sha256` (files pinned by checksum; MNIST has
/// 4 files, CIFAR-10 6).
pub const MAX_PINNED_FILES: usize = 16;

/// A cost over the service's bound: RESOURCE_EXHAUSTED naming the field,
/// through the one error-to-status mapping.
struct OverBudget {
    field: String,
    message: String,
}

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl deadbolt_proto::ServiceError for OverBudget {
    fn code(&self) -> tonic::Code {
        tonic::Code::ResourceExhausted
    }
    fn field(&self) -> Option<String> {
        Some(self.field.clone())
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Checks `spec` against `limits`: INVALID_ARGUMENT naming each field over
/// its bound (e.g. `spec.training.epochs`), then RESOURCE_EXHAUSTED naming
/// the dominant field when the run's estimated memory is over
/// `max_job_memory_bytes`. The images are taken as the dataset kind's
/// (MNIST 1x28x28, CIFAR-10 3x32x32, 10 classes), so a patch trigger that
/// does not fit them is refused here too.
pub fn check_limits(spec: &ExperimentSpec, limits: &Limits) -> Result<(), Status> {
    let mut v = Violations::new();
    let kind = spec.dataset.kind;
    if let Some(a) = &spec.attack {
        let (_, h, w) = kind.input_shape();
        if let Err(e) = a.validate_for(h, w, kind.classes()) {
            let at = e.field().unwrap_or("attack").to_string();
            v.add(format!("spec.{at}"), e.to_string());
        }
    }
    let pinned = &spec.dataset.sha256;
    if pinned.len() > MAX_PINNED_FILES {
        v.add(
            "spec.dataset.sha256",
            format!("{} files pinned; at most {MAX_PINNED_FILES}", pinned.len()),
        );
    } else if let Some((file, _)) = pinned
        .iter()
        .find(|(f, h)| f.len() > limits.max_name_len || h.len() > limits.max_name_len)
    {
        let file: String = file.chars().take(32).collect();
        v.add(
            "spec.dataset.sha256",
            format!(
                "{file:?}: names and checksums are at most {} bytes",
                limits.max_name_len
            ),
        );
    }
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
        "defense.layer",
        spec.defense.layer.as_ref().map_or(0, String::len),
        limits.max_name_len,
    );
    let train = match spec.dataset.train_limit {
        0 => usize::MAX,
        n => n,
    };
    // 0 statistics images is the whole validation split: the share
    // `validation_fraction` of the training images (of all of them, when
    // train_limit is 0 too, which counts as unbounded)
    let stats = match spec.defense.stats_images {
        0 if train == usize::MAX => usize::MAX,
        0 => (train as f64 * spec.dataset.validation_fraction).ceil() as usize,
        n => n,
    };
    if stats > limits.max_stats_images {
        v.add(
            "spec.defense.stats_images",
            format!(
                "{} is above this service's limit of {} (set stats_images)",
                match (spec.defense.stats_images, stats) {
                    (0, usize::MAX) => "0 (the whole validation split of all images)".to_string(),
                    (0, n) => format!("0 (the whole validation split, {n} images)"),
                    (n, _) => n.to_string(),
                },
                limits.max_stats_images
            ),
        );
    }
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
    v.check()?;
    let estimate = spec.memory_estimate();
    if estimate.total() > limits.max_job_memory_bytes {
        let (field, part) = estimate.dominant();
        return Err(deadbolt_proto::status(&OverBudget {
            field: format!("spec.{field}"),
            message: format!(
                "the run needs about {} ({} of it for `{field}`: parameters {}, activations {}, \
                 dataset {}), above this service's limit of {} per job",
                gib(estimate.total()),
                gib(part),
                gib(estimate.parameters),
                gib(estimate.activations),
                gib(estimate.dataset),
                gib(limits.max_job_memory_bytes)
            ),
        }));
    }
    Ok(())
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

    /// The fields of a refusal, and its code.
    fn refused(r: Result<(), Status>) -> (tonic::Code, Vec<String>) {
        let e = r.unwrap_err();
        let fields = deadbolt_proto::validate::field_violations(&e)
            .into_iter()
            .map(|(f, _)| f)
            .collect();
        (e.code(), fields)
    }

    const MNIST: &str = "[dataset]\nkind = \"mnist\"\ntrain_limit = 60000\n";

    #[test]
    fn lists_are_bounded_at_submit() {
        use deadbolt_proto::v1::submit_experiment_request::Spec;
        // 10,000 criteria, and a duplicate: refused as the request arrives
        for criteria in [vec!["\"l1\""; 10_000].join(", "), "\"l1\", \"l1\"".into()] {
            let text = format!("{MNIST}[defense]\ncriteria = [{criteria}]\n");
            let e = crate::convert::spec_from_submit(Some(&Spec::SpecToml(text))).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            let fields = deadbolt_proto::validate::field_violations(&e);
            assert_eq!(fields[0].0, "spec.defense.criteria", "{e:?}");
        }
        // pinned files and the layer name
        let mut s = spec(MNIST);
        s.dataset.sha256 = (0..=MAX_PINNED_FILES)
            .map(|i| (format!("f{i}"), "ab".repeat(32)))
            .collect();
        s.defense.layer = Some("l".repeat(1000));
        let (code, fields) = refused(check_limits(&s, &Limits::default()));
        assert_eq!(code, tonic::Code::InvalidArgument);
        assert_eq!(fields, ["spec.dataset.sha256", "spec.defense.layer"]);
        // the pinned files' bound is no operator's choice
        let (_, fields) = refused(check_limits(&s, &Limits::unbounded()));
        assert_eq!(fields, ["spec.dataset.sha256"]);
    }

    #[test]
    fn zero_stats_images_counts_as_the_whole_validation_split() {
        let l = Limits::default();
        // 0 with 60,000 training images: 6,000 validation images, allowed
        let mut s = spec(MNIST);
        s.defense.stats_images = 0;
        check_limits(&s, &l).unwrap();
        // ... not with 500,000 (50,000 > 20,000), nor with all of them
        s.dataset.train_limit = 500_000;
        let (_, fields) = refused(check_limits(&s, &l));
        assert_eq!(fields, ["spec.defense.stats_images"]);
        s.dataset.train_limit = 0;
        let (_, fields) = refused(check_limits(&s, &l));
        assert_eq!(
            fields,
            ["spec.defense.stats_images", "spec.dataset.train_limit"]
        );
        check_limits(&s, &Limits::unbounded()).unwrap();
    }

    #[test]
    fn a_trigger_outside_the_image_is_refused_at_submit() {
        let attack = |position: &str| {
            spec(&format!(
                "{MNIST}[attack]\nrate = 0.1\ntarget = 0\n[attack.trigger]\nkind = \"patch\"\nsize = 3\nposition = {position}\n"
            ))
        };
        check_limits(&attack("{ row = 25, col = 25 }"), &Limits::default()).unwrap();
        for position in [
            "{ row = 26, col = 0 }",
            "{ row = 0, col = 1000000 }",
            "{ row = 9223372036854775807, col = 9223372036854775807 }",
        ] {
            let (code, fields) = refused(check_limits(&attack(position), &Limits::default()));
            assert_eq!(code, tonic::Code::InvalidArgument);
            assert_eq!(fields, ["spec.attack.trigger.position"], "{position}");
        }
    }

    #[test]
    fn a_run_that_cannot_fit_is_resource_exhausted_naming_its_field() {
        let l = Limits::default();
        // the default MNIST run fits, with room to spare
        let s = spec(MNIST);
        assert!(s.memory_estimate().total() < l.max_job_memory_bytes / 8);
        check_limits(&s, &l).unwrap();
        // PreActResNet18 on CIFAR-10 at batch 128 fits too
        let mut s = spec("[dataset]\nkind = \"cifar10\"\ntrain_limit = 50000\n[model]\narch = \"preact-resnet18\"\n[training]\nbatch_size = 128\n");
        check_limits(&s, &l).unwrap();
        // at the largest batch the limits allow it does not
        s.training.batch_size = l.max_batch_size;
        let (code, fields) = refused(check_limits(&s, &l));
        assert_eq!(code, tonic::Code::ResourceExhausted);
        assert_eq!(fields, ["spec.training.batch_size"]);
        // nor with as many training images as max_train_images allows
        s.training.batch_size = 128;
        s.dataset.train_limit = l.max_train_images;
        let (code, fields) = refused(check_limits(&s, &l));
        assert_eq!(code, tonic::Code::ResourceExhausted);
        assert_eq!(fields, ["spec.dataset.train_limit"]);
        // an operator's lower limit refuses the default MNIST run
        let small = Limits {
            max_job_memory_bytes: 64 << 20,
            ..Limits::default()
        };
        let (code, fields) = refused(check_limits(&spec(MNIST), &small));
        assert_eq!(code, tonic::Code::ResourceExhausted);
        assert_eq!(fields, ["spec.dataset.train_limit"]);
        check_limits(&s, &Limits::unbounded()).unwrap();
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
