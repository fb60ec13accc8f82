//! The `repair` stage of a scan run that asked for one: the core's
//! [`deadbolt_core::byom::repair::repair`] on the uploaded model and clean data
//! (a held-out part the repair never tunes on; k chosen with fine-tuning
//! in the loop; figures with Wilson intervals; never a claim the figures
//! do not show). Stores the repaired weights (original parameter names,
//! pruned channels zeroed), its card, report and figures as `repair/<file>`
//! and the figures before and after in the `scan_results` row next to the
//! scan's verdict. The repair counts as met only when the core's repair
//! met its budget *and* the run's scan called the model backdoored.
//! `PrunerService.Repair` is its thin tonic adapter (in
//! [`crate::prune`]'s service).

use std::time::Instant;

use deadbolt_core::byom::repair::{self, Outcome, RepairOptions};
use deadbolt_core::byom::scan::Verdict;
use deadbolt_runtime::{JobContext, JobError, Work};
use deadbolt_store::ScanResult;

use crate::contract::{Repair, RepairOutput, RunOnly, Scan};
use crate::error::core;
use crate::job_files::{scan_subject, upload_dir};
use crate::progress::JobProgress;

/// The work of the `repair` stage: the uploaded card and data read within
/// the operator's data limits.
pub struct RepairWork {
    pub limits: deadbolt_core::data::DataLimits,
}

impl Work<Repair> for RepairWork {
    fn run(&self, ctx: &JobContext, _input: RunOnly) -> Result<RepairOutput, JobError> {
        let t = Instant::now();
        let scan = ctx.output::<Scan>()?;
        let (spec, files) = ctx.scan_spec()?;
        let opts: &RepairOptions = &spec.repair_options;
        let subject = scan_subject(&spec, &files, &self.limits)?;
        let out = ctx.work_dir.join("repair");
        let report = core(repair::repair(&subject, opts, &out, &JobProgress::new(ctx)))?;
        let files = upload_dir(ctx, &out, "repair")?;
        // the run also has the scan's verdict (on all the clean data): a
        // repair of a model the scan did not call backdoored is judged
        // with a synthetic trigger that may not be the backdoor's, so its
        // figures back no claim of removal
        let mut reasons = match &report.outcome {
            Outcome::Met => Vec::new(),
            Outcome::NotMet { reasons } => reasons.clone(),
        };
        if scan.verdict != Verdict::Backdoored {
            reasons.push(format!(
                "the scan's verdict is {}: the synthetic trigger the repair was measured with may not be \
                 the backdoor's, so its ASR is no evidence that a backdoor was removed",
                scan.verdict.as_str()
            ));
        }
        let met = reasons.is_empty();
        ctx.put_scan_result(&ScanResult {
            repaired: true,
            acc_before: Some(report.original.acc.value),
            asr_before: Some(report.original.asr.value),
            acc_after: Some(report.repaired.acc.value),
            asr_after: Some(report.repaired.asr.value),
            pruned_channels: Some(report.k as i64),
            met: Some(met),
            ..scan.row(&spec.model)
        })?;
        tracing::info!(run_id = %ctx.run_id(), met, k = report.k, acc_after = report.repaired.acc.value, asr_after = report.repaired.asr.value, "repair done");
        Ok(RepairOutput {
            met,
            reasons,
            label: report.label,
            k: report.k,
            pruned_channels: report.pruned_channels.clone(),
            original: report.original,
            repaired: report.repaired,
            files,
            seconds: t.elapsed().as_secs_f64(),
        })
    }
}
