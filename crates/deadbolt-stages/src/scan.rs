//! The `scan` stage of a scan run (bring your own model): opens the model
//! and clean data the team uploaded (fetched and sha256-checked), runs the
//! core's [`deadbolt_core::byom::scan::scan`] (triggers reverse-engineered for
//! every label, anomaly index, activation statistics, CLP, Grad-CAM, a
//! verdict with its reasons), stores every file it wrote as `scan/<file>`
//! and the verdict in the `scan_results` table. `AnalyzerService.Scan` is
//! its thin tonic adapter (in [`crate::analyze`]'s service).

use std::time::Instant;

use deadbolt_core::byom::scan::{self, ScanOptions};
use deadbolt_runtime::{JobContext, JobError, Work};

use crate::contract::{RunOnly, Scan, ScanOutput};
use crate::error::core;
use crate::job_files::{scan_subject, upload_dir};
use crate::progress::JobProgress;

/// The work of the `scan` stage: the uploaded card and data read within
/// the operator's data limits.
pub struct ScanWork {
    pub limits: deadbolt_core::data::DataLimits,
}

impl Work<Scan> for ScanWork {
    fn run(&self, ctx: &JobContext, _input: RunOnly) -> Result<ScanOutput, JobError> {
        let t = Instant::now();
        let (spec, files) = ctx.scan_spec()?;
        let opts: &ScanOptions = &spec.scan;
        let subject = scan_subject(&spec, &files, &self.limits)?;
        let out = ctx.work_dir.join("scan");
        let report = core(scan::scan(&subject, opts, &out, &JobProgress::new(ctx)))?;
        let files = upload_dir(ctx, &out, "scan")?;
        let label = report.analysed_label;
        let anomaly_index = report
            .reverse
            .anomaly_index
            .get(label.max(0) as usize)
            .copied()
            .unwrap_or(f64::NAN);
        tracing::info!(run_id = %ctx.run_id(), verdict = report.verdict.as_str(), label, anomaly_index, "scan done");
        let output = ScanOutput {
            verdict: report.verdict,
            reasons: report.reasons.clone(),
            suspect_label: label,
            anomaly_index,
            flagged_labels: report.suspect_labels.clone(),
            clean_acc: report.clean_accuracy,
            outlier_channels: report.activations.outlier_channels.clone(),
            files,
            seconds: t.elapsed().as_secs_f64(),
        };
        ctx.put_scan_result(&output.row(&spec.model))?;
        Ok(output)
    }
}
