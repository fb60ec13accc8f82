//! What a run is, typed: its spec ([`RunSpec`]: an experiment or a scan of
//! a model a team brought) and its stages ([`StageKind`]) in the one order
//! they run in ([`RunSpec::stages`]).
//!
//! A run's spec is stored as JSON and decoded in exactly one place,
//! [`RunSpec::from_stored`]; [`RunSpec::to_stored`] writes it. The stored
//! form is tagged by kind (`{"experiment": {...}}`, `{"scan": {...}}`);
//! rows written before the tag existed (a bare experiment spec, or a scan
//! under `{"byom": {...}}`) still decode.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::byom::{RepairOptions, ScanOptions};
use crate::{Error, ExperimentSpec, Result};

/// A job's stage: the unit a stage service leases and runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageKind {
    /// Load the base data, hold out validation, poison (poisoner service).
    Data,
    /// Train the clean baseline (trainer service).
    TrainClean,
    /// Train on the poisoned split (trainer service).
    TrainBackdoored,
    /// Synthetic trigger, activation statistics, Grad-CAM (analyzer service).
    Analyze,
    /// Every criterion's sweep and pruned model, then the report (pruner).
    Prune,
    /// A model a team brought: scan it (analyzer service).
    Scan,
    /// ... and repair it (pruner service).
    Repair,
}

/// The stages of an experiment, in the order they run.
const EXPERIMENT: [StageKind; 5] = [
    StageKind::Data,
    StageKind::TrainClean,
    StageKind::TrainBackdoored,
    StageKind::Analyze,
    StageKind::Prune,
];
/// The stages of a scan that repairs, in order (a scan alone stops after
/// the first).
const SCAN: [StageKind; 2] = [StageKind::Scan, StageKind::Repair];

impl StageKind {
    /// Every kind.
    pub const ALL: [StageKind; 7] = [
        StageKind::Data,
        StageKind::TrainClean,
        StageKind::TrainBackdoored,
        StageKind::Analyze,
        StageKind::Prune,
        StageKind::Scan,
        StageKind::Repair,
    ];

    /// The kind of run this stage belongs to.
    pub fn run_kind(&self) -> RunKind {
        if SCAN.contains(self) {
            RunKind::Scan
        } else {
            RunKind::Experiment
        }
    }

    /// The job's `stage` column.
    pub fn as_str(&self) -> &'static str {
        match self {
            StageKind::Data => "data",
            StageKind::TrainClean => "train-clean",
            StageKind::TrainBackdoored => "train-backdoored",
            StageKind::Analyze => "analyze",
            StageKind::Prune => "prune",
            StageKind::Scan => "scan",
            StageKind::Repair => "repair",
        }
    }

    pub fn parse(s: &str) -> Option<StageKind> {
        StageKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The stages that must have succeeded before this one may run: the
    /// ones before it in its run kind's order.
    pub fn earlier(&self) -> &'static [StageKind] {
        let order = self.run_kind().order();
        let i = order.iter().position(|k| k == self).unwrap_or(0);
        &order[..i]
    }
}

impl std::fmt::Display for StageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for StageKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<StageKind> {
        StageKind::parse(s).ok_or_else(|| Error::invalid("stage", format!("unknown stage {s:?}")))
    }
}

/// What kind of run a spec describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    /// A planted-backdoor experiment (data, two trainings, analyze, prune).
    Experiment,
    /// A scan (and maybe a repair) of a model a team uploaded.
    Scan,
}

impl RunKind {
    /// Every stage a run of this kind may have, in order.
    pub fn order(&self) -> &'static [StageKind] {
        match self {
            RunKind::Experiment => &EXPERIMENT,
            RunKind::Scan => &SCAN,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            RunKind::Experiment => "experiment",
            RunKind::Scan => "scan",
        }
    }
}

impl std::fmt::Display for RunKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which split of an uploaded dataset a scan uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataSplit {
    Train,
    Test,
    #[default]
    All,
}

impl DataSplit {
    pub fn as_str(&self) -> &'static str {
        match self {
            DataSplit::Train => "train",
            DataSplit::Test => "test",
            DataSplit::All => "all",
        }
    }
}

impl std::str::FromStr for DataSplit {
    type Err = Error;
    fn from_str(s: &str) -> Result<DataSplit> {
        match s {
            "train" => Ok(DataSplit::Train),
            "test" => Ok(DataSplit::Test),
            "all" => Ok(DataSplit::All),
            _ => Err(Error::invalid(
                "split",
                format!("{s:?}: train, test or all"),
            )),
        }
    }
}

/// A scan (and maybe a repair) of a model a team brought.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScanSpec {
    /// The run's name (the model's upload name unless given).
    pub name: String,
    /// The model's upload name (model.safetensors + card.toml or card.json).
    pub model: String,
    /// The clean data's upload name (MNIST IDX files or CIFAR-10 batches).
    pub data: String,
    /// `object:` locations of the two uploads under the run's team (set by
    /// the gateway, never by a client).
    pub model_location: String,
    pub data_location: String,
    /// Which split of the data to use.
    #[serde(default)]
    pub split: DataSplit,
    /// Scan only, or scan and then repair.
    pub repair: bool,
    /// The layer to examine and prune (default: the card's, else the
    /// architecture's).
    #[serde(default)]
    pub layer: Option<String>,
    /// The `[scan]` options.
    #[serde(default, deserialize_with = "null_as_default")]
    pub scan: ScanOptions,
    /// The `[repair]` options.
    #[serde(default, deserialize_with = "null_as_default")]
    pub repair_options: RepairOptions,
}

/// A `null` (an options table never given, in rows written before the
/// options were typed) reads as the defaults.
fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A run's spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum RunSpec {
    Experiment(ExperimentSpec),
    Scan(ScanSpec),
}

/// The key of a scan's spec in rows written before the spec was tagged.
const LEGACY_SCAN_KEY: &str = "byom";

impl RunSpec {
    pub fn kind(&self) -> RunKind {
        match self {
            RunSpec::Experiment(_) => RunKind::Experiment,
            RunSpec::Scan(_) => RunKind::Scan,
        }
    }

    /// The run's name.
    pub fn name(&self) -> &str {
        match self {
            RunSpec::Experiment(s) => &s.name,
            RunSpec::Scan(s) => &s.name,
        }
    }

    /// The stages this run runs, in order: the one statement of the
    /// pipeline's order (the driver walks it; a stage may run once those
    /// before it in its kind's order succeeded, [`StageKind::earlier`]).
    pub fn stages(&self) -> &'static [StageKind] {
        match self {
            RunSpec::Experiment(_) => &EXPERIMENT,
            RunSpec::Scan(s) if s.repair => &SCAN,
            RunSpec::Scan(_) => &SCAN[..1],
        }
    }

    pub fn experiment(&self) -> Option<&ExperimentSpec> {
        match self {
            RunSpec::Experiment(s) => Some(s),
            RunSpec::Scan(_) => None,
        }
    }

    pub fn scan(&self) -> Option<&ScanSpec> {
        match self {
            RunSpec::Scan(s) => Some(s),
            RunSpec::Experiment(_) => None,
        }
    }

    /// The stored form (see the module docs).
    pub fn to_stored(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Decodes a stored spec: the one place a run's stored spec becomes
    /// typed. The error says what is wrong with it.
    pub fn from_stored(v: &Value) -> Result<RunSpec> {
        let bad = |e: serde_json::Error| Error::Spec(format!("stored run spec: {e}"));
        match v {
            Value::Object(m) if m.len() == 1 && m.contains_key(LEGACY_SCAN_KEY) => {
                serde_json::from_value(m[LEGACY_SCAN_KEY].clone())
                    .map(RunSpec::Scan)
                    .map_err(bad)
            }
            Value::Object(m)
                if m.len() == 1
                    && (m.contains_key(RunKind::Experiment.as_str())
                        || m.contains_key(RunKind::Scan.as_str())) =>
            {
                serde_json::from_value(v.clone()).map_err(bad)
            }
            // an experiment spec stored bare, before the tag
            Value::Object(_) => serde_json::from_value(v.clone())
                .map(RunSpec::Experiment)
                .map_err(bad),
            other => Err(Error::Spec(format!(
                "stored run spec: expected an object, got {other}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(repair: bool) -> ScanSpec {
        ScanSpec {
            name: "n".into(),
            model: "m".into(),
            data: "d".into(),
            model_location: "object:teams/t/models/m".into(),
            data_location: "object:teams/t/datasets/d".into(),
            split: DataSplit::Test,
            repair,
            layer: Some("conv2".into()),
            scan: ScanOptions::default(),
            repair_options: RepairOptions {
                fine_tune_epochs: 2,
                ..RepairOptions::default()
            },
        }
    }

    fn experiment() -> ExperimentSpec {
        ExperimentSpec::from_toml_str("name = \"e\"\n[dataset]\nkind = \"mnist\"\n")
            .expect("a minimal spec")
    }

    #[test]
    fn stages_name_their_jobs_and_order() {
        for k in StageKind::ALL {
            assert_eq!(StageKind::parse(k.as_str()), Some(k));
            assert_eq!(k.as_str().parse::<StageKind>().unwrap(), k);
        }
        assert!(StageKind::Data.earlier().is_empty());
        assert_eq!(
            StageKind::Analyze.earlier(),
            &[
                StageKind::Data,
                StageKind::TrainClean,
                StageKind::TrainBackdoored
            ]
        );
        assert_eq!(StageKind::parse("nope"), None);
        assert!(StageKind::Scan.earlier().is_empty());
        assert_eq!(StageKind::Repair.earlier(), &[StageKind::Scan]);
        assert_eq!(StageKind::Prune.earlier().len(), 4);
        // every stage a run runs may run once those before it succeeded
        for spec in [
            RunSpec::Experiment(experiment()),
            RunSpec::Scan(scan(true)),
            RunSpec::Scan(scan(false)),
        ] {
            for (i, s) in spec.stages().iter().enumerate() {
                assert_eq!(s.run_kind(), spec.kind());
                assert_eq!(s.earlier(), &spec.stages()[..i]);
            }
        }
        assert_eq!(RunSpec::Scan(scan(false)).stages(), &[StageKind::Scan]);
    }

    #[test]
    fn stored_specs_round_trip_tagged() {
        for spec in [RunSpec::Experiment(experiment()), RunSpec::Scan(scan(true))] {
            let v = spec.to_stored();
            assert!(v.get(spec.kind().as_str()).is_some(), "{v}");
            assert_eq!(RunSpec::from_stored(&v).unwrap(), spec);
        }
    }

    #[test]
    fn rows_from_before_the_tag_still_decode() {
        let e = experiment();
        let bare = serde_json::to_value(&e).unwrap();
        assert_eq!(RunSpec::from_stored(&bare).unwrap(), RunSpec::Experiment(e));
        // a scan under "byom" with its options as untyped tables, a null one
        // and a split string
        let old = serde_json::json!({"byom": {
            "name": "n", "model": "m", "data": "d",
            "model_location": "object:teams/t/models/m",
            "data_location": "object:teams/t/datasets/d",
            "split": "test", "repair": true, "layer": "conv2",
            "scan": null,
            "repair_options": {"fine_tune_epochs": 2},
        }});
        assert_eq!(
            RunSpec::from_stored(&old).unwrap(),
            RunSpec::Scan(scan(true))
        );
    }

    #[test]
    fn bad_stored_specs_say_what_is_wrong() {
        for v in [
            serde_json::json!(3),
            serde_json::json!({"scan": {"name": 1}}),
            serde_json::json!({"byom": {}}),
            serde_json::json!({"experiment": {}, "scan": {}}),
        ] {
            let e = RunSpec::from_stored(&v).unwrap_err().to_string();
            assert!(e.starts_with("invalid spec: stored run spec"), "{v}: {e}");
        }
    }
}
