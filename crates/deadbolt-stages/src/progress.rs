//! The core's [`Progress`] reporting as job progress (sent with the job's
//! heartbeats, streamed by the gateway as run events), and the job's
//! cancellation (run cancelled or lease lost) as the core's `cancelled()`.

use std::sync::Mutex;

use deadbolt_core::progress::Progress;
use deadbolt_runtime::JobContext;

pub struct JobProgress<'a> {
    ctx: &'a JobContext,
    phase: Mutex<(String, u64, u64)>,
}

impl<'a> JobProgress<'a> {
    pub fn new(ctx: &'a JobContext) -> Self {
        JobProgress {
            ctx,
            phase: Mutex::new((String::new(), 0, 0)),
        }
    }
}

impl Progress for JobProgress<'_> {
    fn start(&self, phase: &str, total: u64) {
        if let Ok(mut p) = self.phase.lock() {
            *p = (phase.to_string(), total, 0);
        }
        self.ctx.set_progress(0.0, phase);
    }
    fn inc(&self, n: u64) {
        if let Ok(mut p) = self.phase.lock() {
            p.2 += n;
            let f = if p.1 > 0 {
                p.2 as f64 / p.1 as f64
            } else {
                0.0
            };
            self.ctx.set_progress(f, &p.0);
        }
    }
    fn finish(&self, message: &str) {
        self.ctx.set_progress(1.0, message);
    }
    fn cancelled(&self) -> bool {
        self.ctx.is_cancelled()
    }
}
