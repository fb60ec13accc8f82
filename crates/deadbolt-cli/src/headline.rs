//! The headline figures of an experiment's report, as `deadbolt
//! experiment` and `deadbolt report` print them: read from report.json's
//! fields, so that a binary built without libtorch (which lacks the core's
//! `Report`) prints the same lines.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use deadbolt_spec::Criterion;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct Headline {
    clean_model: ModelFigures,
    backdoored_model: ModelFigures,
    /// In the report's order (the criteria's).
    pruning: BTreeMap<Criterion, Pruning>,
}

#[derive(Debug, Deserialize)]
struct ModelFigures {
    acc: f64,
    asr: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct Pruning {
    chosen: Point,
    der: f64,
}

#[derive(Debug, Deserialize)]
struct Point {
    k: usize,
    acc: f64,
    asr: f64,
}

impl Headline {
    /// From the text of a report.json.
    #[cfg_attr(feature = "torch", allow(dead_code))]
    pub fn from_json(text: &str) -> Result<Headline> {
        serde_json::from_str(text).context("report.json")
    }

    /// From a report in memory (through a JSON value, which keeps every
    /// float as it is).
    #[cfg(feature = "torch")]
    pub fn of(report: &deadbolt_core::pipeline::report::Report) -> Result<Headline> {
        let value = serde_json::to_value(report).context("report")?;
        serde_json::from_value(value).context("report")
    }

    /// The figures on stdout: both models, then one line per criterion.
    pub fn print(&self) {
        let pct = |v: Option<f64>| {
            v.map(|v| format!("{:.2}%", 100.0 * v))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "clean model: acc {}; backdoored model: acc {} asr {}",
            pct(Some(self.clean_model.acc)),
            pct(Some(self.backdoored_model.acc)),
            pct(self.backdoored_model.asr)
        );
        for (c, p) in &self.pruning {
            println!(
                "  {:<13} k {:>3}  acc {:>7}  asr {:>7}  der {:.3}",
                c.as_str(),
                p.chosen.k,
                pct(Some(p.chosen.acc)),
                pct(Some(p.chosen.asr)),
                p.der
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_headline_is_read_from_report_json_in_the_criteria_order() {
        let text = r#"{
            "name": "x",
            "clean_model": {"acc": 0.99, "asr": null, "ra": null, "checkpoint": "clean/model.safetensors"},
            "backdoored_model": {"acc": 0.98, "asr": 0.995, "ra": 0.004},
            "pruning": {
                "fine-pruning": {"chosen": {"k": 21, "acc": 0.945, "asr": 0.3, "ra": 0.6}, "der": 0.7},
                "linf": {"chosen": {"k": 4, "acc": 0.971, "asr": 0.016, "ra": 0.9}, "der": 0.98}
            }
        }"#;
        let h = Headline::from_json(text).unwrap();
        assert_eq!(h.clean_model.asr, None);
        assert_eq!(h.backdoored_model.asr, Some(0.995));
        let order: Vec<_> = h.pruning.keys().map(|c| c.as_str()).collect();
        assert_eq!(order, ["linf", "fine-pruning"]);
        assert_eq!(h.pruning[&Criterion::Linf].chosen.k, 4);
        assert!(Headline::from_json(r#"{"clean_model": {}}"#).is_err());
    }
}
