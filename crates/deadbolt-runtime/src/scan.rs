//! A scan run's request and files: a model a team brought ("bring your
//! own model"), scanned (is it backdoored, toward which label, through
//! which channels?) and optionally repaired, on clean data the team
//! uploaded. The run's spec is a [`ScanSpec`] (`deadbolt_spec::run`); the
//! scan runs as the `scan` job on the analyzer service, the repair as the
//! `repair` job on the pruner service.
//!
//! The gateway checks all it can without libtorch ([`scan_spec`]): the
//! uploads exist under the caller's team, the options are tables of known
//! sections within the service's limits, and each table parses as the
//! scan or repair options (`deadbolt_spec::byom`) with every value in
//! range, so a bad option is INVALID_ARGUMENT at submit, naming it. The
//! spec stores the options typed, so the stages read them as checked.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use deadbolt_spec::byom::{RepairOptions, ScanOptions};
use deadbolt_spec::{DataSplit, ScanSpec};

use crate::policy::Limits;
use crate::uploads::{self, UploadKind};

/// Builds the spec of a submitted scan: `options_toml` may hold `layer`,
/// `split`, a `[scan]` and a `[repair]` table. Errors name the field
/// (`options_toml.<key>`).
pub fn scan_spec(
    team: &str,
    name: &str,
    model: &str,
    data: &str,
    repair: bool,
    options_toml: &str,
    limits: &Limits,
) -> Result<ScanSpec, (String, String)> {
    let field = |f: &str| format!("options_toml.{f}");
    let model = strip_upload(model).map_err(|m| ("model".to_string(), m))?;
    let data = strip_upload(data).map_err(|m| ("data".to_string(), m))?;
    let table: toml::Table =
        toml::from_str(options_toml).map_err(|e| ("options_toml".to_string(), e.to_string()))?;
    let mut tables = Tables::default();
    for (k, v) in table {
        match (k.as_str(), v) {
            ("layer", toml::Value::String(s)) => tables.layer = Some(s),
            ("split", toml::Value::String(s)) => {
                tables.split = s
                    .parse()
                    .map_err(|_| (field("split"), format!("{s:?}: train, test or all")))?;
            }
            ("scan", toml::Value::Table(t)) => tables.scan = to_json(&t),
            ("repair", toml::Value::Table(t)) => tables.repair = to_json(&t),
            ("layer" | "split", _) => return Err((field(&k), "must be a string".into())),
            ("scan" | "repair", _) => return Err((field(&k), "must be a table".into())),
            _ => {
                return Err((
                    field(&k),
                    "unknown option (layer, split, [scan], [repair])".into(),
                ))
            }
        }
    }
    tables.check_limits(limits)?;
    let (scan, repair_options) = tables.check_options()?;
    Ok(ScanSpec {
        name: if name.trim().is_empty() {
            model.clone()
        } else {
            name.trim().to_string()
        },
        model_location: uploads::location(team, UploadKind::Model, &model),
        data_location: uploads::location(team, UploadKind::Dataset, &data),
        model,
        data,
        split: tables.split,
        repair,
        layer: tables.layer,
        scan,
        repair_options,
    })
}

/// The options of a scan request as given, before they are typed (the
/// limits apply to the values a client set).
#[derive(Debug, Default)]
struct Tables {
    layer: Option<String>,
    split: DataSplit,
    scan: Value,
    repair: Value,
}

impl Tables {
    /// The `[scan]` and `[repair]` tables as the stages will read them:
    /// every key known, every value of its type and in range (a repair's
    /// `label` is checked against the class count by the job, which reads
    /// the card).
    fn check_options(&self) -> Result<(ScanOptions, RepairOptions), (String, String)> {
        let within = |section: &str, e: deadbolt_spec::Error| match e.field() {
            Some(f) => (format!("options_toml.{section}.{f}"), e.to_string()),
            None => (format!("options_toml.{section}"), e.to_string()),
        };
        let scan = parse_section::<ScanOptions>(&self.scan, "scan")?;
        scan.validate().map_err(|e| within("scan", e))?;
        let repair = parse_section::<RepairOptions>(&self.repair, "repair")?;
        repair.validate(i64::MAX).map_err(|e| within("repair", e))?;
        Ok((scan, repair))
    }

    /// The options that cost time or memory, within the service's
    /// limits: the reverse engineering's images per label and step
    /// (`cleanse.minibatch`) and per forward pass (`cleanse.max_batch`) are
    /// batches, bounded like `training.batch_size`; a `stats_images` of 0
    /// (all the uploaded images, a count not known at submit) counts as
    /// unbounded; the layer name is bounded like a run name.
    fn check_limits(&self, l: &Limits) -> Result<(), (String, String)> {
        if let Some(layer) = &self.layer {
            if layer.len() > l.max_name_len {
                return Err((
                    "options_toml.layer".into(),
                    format!(
                        "{} bytes is above this service's limit of {}",
                        layer.len(),
                        l.max_name_len
                    ),
                ));
            }
        }
        let (scan, repair) = (&self.scan, &self.repair);
        let checks: [(&Value, &str, &str, usize); 13] = [
            (scan, "scan", "cleanse.steps", l.max_synthetic_steps),
            (scan, "scan", "cleanse.images", l.max_synthetic_images),
            (scan, "scan", "cleanse.minibatch", l.max_batch_size),
            (scan, "scan", "cleanse.max_batch", l.max_batch_size),
            (scan, "scan", "stats_images", l.max_stats_images),
            (scan, "scan", "gradcam_images", l.max_stats_images),
            (repair, "repair", "cleanse.steps", l.max_synthetic_steps),
            (repair, "repair", "cleanse.images", l.max_synthetic_images),
            (repair, "repair", "cleanse.minibatch", l.max_batch_size),
            (repair, "repair", "cleanse.max_batch", l.max_batch_size),
            (repair, "repair", "stats_images", l.max_stats_images),
            (repair, "repair", "fine_tune_epochs", l.max_fine_tune_epochs),
            (repair, "repair", "fine_tune_batch", l.max_batch_size),
        ];
        for (table, section, path, max) in checks {
            let mut v = Some(table);
            for part in path.split('.') {
                v = v.and_then(|x| x.get(part));
            }
            let Some(v) = v else { continue };
            let f = format!("options_toml.{section}.{path}");
            match v.as_u64() {
                Some(0) if path == "stats_images" && max < usize::MAX => {
                    return Err((
                        f,
                        format!(
                            "0 (all the images) is above this service's limit of {max} \
                             (set stats_images)"
                        ),
                    ));
                }
                Some(n) if usize::try_from(n).is_ok_and(|n| n <= max) => {}
                Some(n) => {
                    return Err((f, format!("{n} is above this service's limit of {max}")));
                }
                None => return Err((f, format!("{v} is not a count"))),
            }
        }
        Ok(())
    }
}

/// A section (`scan` or `repair`) of a scan run's options: the JSON table
/// as its options type. A key the type does not know is an error naming it
/// (`options_toml.<section>.<key>`), as is a value of the wrong type.
pub fn parse_section<T: serde::de::DeserializeOwned + Serialize>(
    table: &Value,
    section: &str,
) -> Result<T, (String, String)> {
    let table = if table.is_null() {
        Value::Object(Default::default())
    } else {
        table.clone()
    };
    let field = |f: &str| format!("options_toml.{section}{f}");
    // the first unknown key, as a dotted path
    fn unknown(given: &Value, known: &Value, path: &str) -> Option<String> {
        let (Value::Object(g), Value::Object(k)) = (given, known) else {
            return None;
        };
        g.iter().find_map(|(key, v)| {
            let p = format!("{path}.{key}");
            match k.get(key) {
                None => Some(p),
                Some(kv) => unknown(v, kv, &p),
            }
        })
    }
    let defaults = serde_json::from_value::<T>(Value::Object(Default::default()))
        .and_then(|d| serde_json::to_value(&d))
        .map_err(|e| (field(""), format!("[{section}]: {e}")))?;
    if let Some(u) = unknown(&table, &defaults, "") {
        return Err((field(&u), "unknown option".into()));
    }
    serde_json::from_value(table.clone()).map_err(|e| {
        // name the value serde refused: the first one that fails on its
        // own among the defaults
        fn leaves(v: &Value, path: String, out: &mut Vec<(String, Value)>) {
            match v {
                Value::Object(m) => m
                    .iter()
                    .for_each(|(k, v)| leaves(v, format!("{path}/{k}"), out)),
                other => out.push((path, other.clone())),
            }
        }
        let mut all = Vec::new();
        leaves(&table, String::new(), &mut all);
        let bad = all.into_iter().find(|(ptr, v)| {
            let mut probe = defaults.clone();
            match probe.pointer_mut(ptr) {
                Some(slot) => *slot = v.clone(),
                None => return false,
            }
            serde_json::from_value::<T>(probe).is_err()
        });
        match bad {
            Some((ptr, v)) => (field(&ptr.replace('/', ".")), format!("{v}: {e}")),
            None => (field(""), format!("[{section}]: {e}")),
        }
    })
}

fn to_json(t: &toml::Table) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// `upload:<name>` (or a bare name) to the name, checked.
fn strip_upload(s: &str) -> Result<String, String> {
    let name = s.trim();
    let name = name.strip_prefix(uploads::UPLOAD_SCHEME).unwrap_or(name);
    uploads::check_name(name)?;
    Ok(name.to_string())
}

/// Where a job finds a scan run's files once fetched.
#[derive(Debug, Clone)]
pub struct ScanFiles {
    /// The model's weights (`model.safetensors`).
    pub model: PathBuf,
    /// Its card (`card.toml` or `card.json`).
    pub card: PathBuf,
    /// The clean data folder.
    pub data: PathBuf,
}

impl ScanFiles {
    /// The files of the model folder `dir` (as uploaded): the one
    /// `.safetensors` file and the card.
    pub fn find(model_dir: &Path, data: PathBuf) -> Result<ScanFiles, String> {
        let mut weights = Vec::new();
        let mut cards = Vec::new();
        let entries = std::fs::read_dir(model_dir)
            .map_err(|e| format!("model upload {}: {e}", model_dir.display()))?;
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if name.ends_with(".safetensors") {
                weights.push(p);
            } else if name.ends_with(".toml") || name.ends_with(".json") {
                cards.push(p);
            }
        }
        match (weights.as_slice(), cards.as_slice()) {
            ([w], [c]) => Ok(ScanFiles {
                model: w.clone(),
                card: c.clone(),
                data,
            }),
            _ => Err(format!(
                "a model upload holds one .safetensors file and one card (.toml or .json); this one holds {} and {}",
                weights.len(),
                cards.len()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn kinds_and_round_trip() {
        let s = scan_spec(
            "team-a",
            "",
            "upload:vendor-net",
            "digits",
            true,
            "layer = \"conv2\"\n[repair]\nfine_tune_epochs = 2\n[scan.cleanse]\nsteps = 50\n",
            &limits(),
        )
        .unwrap();
        assert_eq!(s.name, "vendor-net");
        assert_eq!(s.model_location, "object:teams/team-a/models/vendor-net");
        assert_eq!(s.data_location, "object:teams/team-a/datasets/digits");
        assert_eq!(s.layer.as_deref(), Some("conv2"));
        assert_eq!(s.repair_options.fine_tune_epochs, 2);
        assert_eq!(s.scan.cleanse.steps, 50);
        assert_eq!(s.split, DataSplit::All);
        let run = deadbolt_spec::RunSpec::Scan(s.clone());
        assert_eq!(
            deadbolt_spec::RunSpec::from_stored(&run.to_stored()).unwrap(),
            run
        );
    }

    #[test]
    fn bad_requests_name_their_field() {
        let l = limits();
        let e = |model: &str, opts: &str| {
            scan_spec("t", "", model, "d", false, opts, &l)
                .unwrap_err()
                .0
        };
        assert_eq!(e("../x", ""), "model");
        assert_eq!(e("m", "colour = 1"), "options_toml.colour");
        assert_eq!(e("m", "split = \"val\""), "options_toml.split");
        assert_eq!(e("m", "scan = 3"), "options_toml.scan");
        assert_eq!(e("m", "[scan"), "options_toml");
        let big = l.max_fine_tune_epochs + 1;
        assert_eq!(
            e("m", &format!("[repair]\nfine_tune_epochs = {big}")),
            "options_toml.repair.fine_tune_epochs"
        );
        let big = l.max_synthetic_steps + 1;
        assert_eq!(
            e("m", &format!("[scan.cleanse]\nsteps = {big}")),
            "options_toml.scan.cleanse.steps"
        );
        assert_eq!(
            e("m", "[repair]\nfine_tune_batch = -1"),
            "options_toml.repair.fine_tune_batch"
        );
        // the reverse engineering's batches, 0 = all statistics images,
        // the layer name
        let big = l.max_batch_size + 1;
        for (opts, field) in [
            (
                format!("[scan.cleanse]\nminibatch = {big}"),
                "options_toml.scan.cleanse.minibatch",
            ),
            (
                format!("[repair.cleanse]\nmax_batch = {}", i64::MAX),
                "options_toml.repair.cleanse.max_batch",
            ),
            (
                "[scan]\nstats_images = 0".to_string(),
                "options_toml.scan.stats_images",
            ),
            (
                "[repair]\nstats_images = 0".to_string(),
                "options_toml.repair.stats_images",
            ),
            (
                format!("layer = \"{}\"", "x".repeat(l.max_name_len + 1)),
                "options_toml.layer",
            ),
        ] {
            assert_eq!(e("m", &opts), field, "{opts}");
        }
        // unbounded (the user's own machine): 0 is all the images
        scan_spec(
            "t",
            "",
            "m",
            "d",
            true,
            "[scan]\nstats_images = 0\n[scan.cleanse]\nminibatch = 100000",
            &Limits::unbounded(),
        )
        .unwrap();
        // checked as the stages read them: unknown keys, types, ranges
        for (opts, field) in [
            ("[scan]\nstats_imagez = 3", "options_toml.scan.stats_imagez"),
            (
                "[scan.cleanse]\nlr = \"fast\"",
                "options_toml.scan.cleanse.lr",
            ),
            (
                "[scan.cleanse]\nlambda = -1.0",
                "options_toml.scan.cleanse.lambda",
            ),
            ("[scan]\nclp_u = 0.0", "options_toml.scan.clp_u"),
            (
                "[repair]\ntarget_asr = 1.5",
                "options_toml.repair.target_asr",
            ),
            (
                "[repair]\ncriterion = \"l7\"",
                "options_toml.repair.criterion",
            ),
            ("[repair]\nverify = \"yes\"", "options_toml.repair.verify"),
            ("[repair]\nholdout = 1.0", "options_toml.repair.holdout"),
            (
                "[repair.cleanse]\nsteps = 0",
                "options_toml.repair.cleanse.steps",
            ),
        ] {
            assert_eq!(e("m", opts), field, "{opts}");
        }
        scan_spec(
            "t",
            "",
            "m",
            "d",
            true,
            "[repair]\ncriterion = \"l2\"\nlabel = 3\nverify = false\n[scan]\nclp_u = 2.5\n",
            &l,
        )
        .unwrap();
    }
}
