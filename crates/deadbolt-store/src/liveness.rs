//! No worker holds a job by holding a lock: a transaction never outlives
//! the lease it writes under.
//!
//! A fenced write locks its job's row (`FOR SHARE` on Postgres) and
//! checks the lease in the same transaction as the write, so a lease cannot
//! change hands between the check and the commit. The price: while that
//! transaction is open, leasers (`FOR NO KEY UPDATE SKIP LOCKED`) skip the
//! row. A worker paused between its lock and its COMMIT (SIGSTOP, a GC-like
//! stall, a stuck NFS read, a half-open TCP connection) would keep the row
//! locked, and its expired lease would never be taken over.
//!
//! The design: **the database ends the paused transaction, and the
//! ordinary leaser takes the job over.** Every pooled Postgres session is
//! opened with timeouts derived from the lease `L` ([`SessionLimits::for_lease`]):
//!
//! | setting | value | why |
//! |---|---|---|
//! | `idle_in_transaction_session_timeout` | `L/3` | a paused or vanished client is idle inside its transaction: the server terminates the session and its locks go with it. `L/3` is below the heartbeat-to-expiry window (heartbeats come every `L/6` or more often), so the lock is gone before, or shortly after, the lease expires. |
//! | `statement_timeout` | `L/2` | a statement that runs (or waits) longer than half a lease cannot keep a transaction open past the lease either; every statement of the queue takes milliseconds. |
//! | `lock_timeout` | `L/4` | a write waiting on a lock (the event-order advisory lock, a job's row) fails with a clear lock error well before the statement timeout. |
//!
//! So a job whose holder stalls inside a fenced write is re-leased within
//! `max(lease expiry, stall + L/3)` plus one idle poll, that is within one
//! lease period of the stall, by the same `SKIP LOCKED` statement that
//! leases every job (no second, waiting lease path; no session killing
//! from the application, which would need `pg_signal_backend`). The stalled
//! worker cannot write after it resumes: its transaction and session are
//! gone (the COMMIT fails), and every later write it makes checks the
//! lease, which another worker now holds ([`crate::StoreError::LeaseLost`]).
//!
//! Migrations run on a separate connection without these limits: they take
//! an advisory lock that another process starting at the same moment may
//! hold for the whole migration.
//!
//! SQLite (the embedded store) runs every service in one process, so a
//! paused process pauses every waiter with it; its write transactions are
//! single statements or a few statements with no work in between, and
//! `busy_timeout` is `L/2` so that a writer waiting on another never waits
//! past a lease.
//!
//! [`Failpoints`] let a test stop a fenced write between its lock and its
//! COMMIT deterministically: in process with a hook
//! ([`Failpoints::on_fenced_commit`]), or in a `deadbolt serve` process with
//! the environment variable `DEADBOLT_FAILPOINT=stop-before-commit:<write>`
//! (`<write>`: `record_artifact`, `append_event`, `record_metric`, ...; or
//! `*`), which stops the whole process (SIGSTOP to itself) the first time
//! such a write is about to commit, as a GC pause would. With
//! `DEADBOLT_FAILPOINT_ONCE=<file>` as well, only the first process of a
//! cluster to get there stops: it creates the file (exclusively); the
//! others find it and go on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use crate::records::Fence;

/// The lease the limits assume when none is given (the services' default).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Per-session timeouts of the metadata store's pooled connections (see the
/// module docs for why each is what it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Postgres `idle_in_transaction_session_timeout`.
    pub idle_in_transaction: Duration,
    /// Postgres `statement_timeout`.
    pub statement: Duration,
    /// Postgres `lock_timeout`.
    pub lock: Duration,
    /// SQLite `busy_timeout`.
    pub busy: Duration,
}

impl SessionLimits {
    /// The limits for workers holding leases of length `lease`.
    pub fn for_lease(lease: Duration) -> SessionLimits {
        // never zero: 0 turns each Postgres timeout off
        let part = |d: u32| (lease / d).max(Duration::from_millis(10));
        SessionLimits {
            idle_in_transaction: part(3),
            statement: part(2),
            lock: part(4),
            busy: part(2),
        }
    }

    /// The Postgres startup settings (`-c name=value`), in milliseconds.
    pub(crate) fn pg_settings(&self) -> [(&'static str, String); 3] {
        let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
        [
            (
                "idle_in_transaction_session_timeout",
                ms(self.idle_in_transaction),
            ),
            ("statement_timeout", ms(self.statement)),
            ("lock_timeout", ms(self.lock)),
        ]
    }
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits::for_lease(DEFAULT_LEASE)
    }
}

/// Called between a fenced write's lease check and its COMMIT with the
/// write's name and fence.
pub type FencedCommitHook =
    Arc<dyn Fn(&'static str, Fence) -> BoxFuture<'static, ()> + Send + Sync>;

/// Test hooks of a store (see the module docs). Cheap to clone; shared by
/// the clones of a store.
#[derive(Clone, Default)]
pub struct Failpoints {
    fenced_commit: Arc<Mutex<Option<FencedCommitHook>>>,
}

impl std::fmt::Debug for Failpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self
            .fenced_commit
            .lock()
            .map(|h| h.is_some())
            .unwrap_or(false);
        f.debug_struct("Failpoints")
            .field("fenced_commit", &set)
            .finish()
    }
}

/// The environment variable of process-level failpoints.
pub const FAILPOINT_ENV: &str = "DEADBOLT_FAILPOINT";

/// A file that makes a process-level failpoint fire in one process only.
pub const FAILPOINT_ONCE_ENV: &str = "DEADBOLT_FAILPOINT_ONCE";

impl Failpoints {
    /// The failpoints named by [`FAILPOINT_ENV`] (none when it is unset).
    pub fn from_env() -> Failpoints {
        let fp = Failpoints::default();
        let Ok(spec) = std::env::var(FAILPOINT_ENV) else {
            return fp;
        };
        match spec.strip_prefix("stop-before-commit:") {
            Some(write) => {
                let write = write.to_string();
                tracing::warn!(failpoint = %spec, "test failpoint armed");
                let fired = Arc::new(AtomicBool::new(false));
                let once = std::env::var_os(FAILPOINT_ONCE_ENV).map(std::path::PathBuf::from);
                fp.on_fenced_commit(Arc::new(move |name, fence| {
                    let first_here =
                        (write == "*" || write == name) && !fired.swap(true, Ordering::SeqCst);
                    // first in the cluster too, when the once-file is given
                    let first = first_here
                        && once.as_ref().is_none_or(|f| {
                            std::fs::OpenOptions::new()
                                .write(true)
                                .create_new(true)
                                .open(f)
                                .is_ok()
                        });
                    if first {
                        tracing::warn!(
                            write = name, job_id = %fence.job_id,
                            "failpoint: stopping this process before a fenced commit"
                        );
                        stop_this_process();
                    }
                    Box::pin(async {})
                }));
            }
            None => tracing::error!(failpoint = %spec, "unknown failpoint ignored"),
        }
        fp
    }

    /// Runs `hook` before the COMMIT of every fenced write (replacing any
    /// earlier hook).
    pub fn on_fenced_commit(&self, hook: FencedCommitHook) {
        if let Ok(mut h) = self.fenced_commit.lock() {
            *h = Some(hook);
        }
    }

    /// Removes the fenced-commit hook.
    pub fn clear(&self) {
        if let Ok(mut h) = self.fenced_commit.lock() {
            *h = None;
        }
    }

    pub(crate) async fn before_fenced_commit(&self, write: &'static str, fence: Option<&Fence>) {
        let Some(fence) = fence else {
            return;
        };
        let hook = self.fenced_commit.lock().ok().and_then(|h| h.clone());
        if let Some(hook) = hook {
            hook(write, *fence).await;
        }
    }
}

/// SIGSTOP to this process: every thread stops, as in a GC pause, until
/// someone sends SIGCONT.
fn stop_this_process() {
    // SAFETY: raise has no preconditions; SIGSTOP cannot be caught.
    unsafe {
        libc::raise(libc::SIGSTOP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_lease_and_stay_below_it() {
        let l = SessionLimits::for_lease(Duration::from_secs(30));
        assert_eq!(l.idle_in_transaction, Duration::from_secs(10));
        assert_eq!(l.statement, Duration::from_secs(15));
        assert_eq!(l.lock, Duration::from_millis(7500));
        assert_eq!(
            l.pg_settings()[0],
            ("idle_in_transaction_session_timeout", "10000ms".to_string())
        );
        for lease in [1u64, 2_000, 30_000, 600_000] {
            let lease = Duration::from_millis(lease);
            let l = SessionLimits::for_lease(lease);
            for d in [l.idle_in_transaction, l.statement, l.lock, l.busy] {
                assert!(d > Duration::ZERO, "{lease:?}: {l:?}");
                assert!(
                    d < lease || lease < Duration::from_millis(20),
                    "{lease:?}: {l:?}"
                );
            }
        }
    }
}
