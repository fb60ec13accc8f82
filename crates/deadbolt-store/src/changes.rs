//! Change notifications: "something about run X changed", and what kind of
//! thing (a job was enqueued, ended or released; the run's status changed;
//! an event or result was written), so that watchers and waiting stage
//! calls wake up instead of polling, and each waiter wakes only for the
//! kinds it reads (an idle worker for jobs, a driver for jobs and the run,
//! a watcher for all).
//!
//! In one process they travel over a broadcast channel (all the embedded
//! SQLite store needs); on Postgres every change is also sent with
//! `pg_notify('deadbolt_changes', "<kind>:<run id>")`, and one `LISTEN`
//! connection per process (started with the first subscriber) forwards the
//! other processes' changes to the same channel. A lagging or lost
//! notification only delays a waiter until its slow fallback poll.

use std::sync::{Arc, OnceLock};

use tokio::sync::broadcast;
use uuid::Uuid;

/// The Postgres channel.
pub const CHANNEL: &str = "deadbolt_changes";

/// What changed about a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Its status (or its jobs' statuses, by a cancel).
    Run,
    /// One of its stage jobs was enqueued, ended, failed for a retry or was
    /// released: a job may have become leasable, or a waiter's job ended.
    Job,
    /// An event was appended or a result written.
    Event,
}

impl ChangeKind {
    pub const ALL: [ChangeKind; 3] = [ChangeKind::Run, ChangeKind::Job, ChangeKind::Event];

    fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Run => "run",
            ChangeKind::Job => "job",
            ChangeKind::Event => "event",
        }
    }
}

/// One notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub run_id: Uuid,
    pub kind: ChangeKind,
}

impl Change {
    /// The `pg_notify` payload: `<kind>:<run id>`.
    pub fn payload(&self) -> String {
        format!("{}:{}", self.kind.as_str(), self.run_id)
    }

    /// Parses a payload. A bare run id (a process of an earlier version)
    /// counts as a job change, which wakes every kind of waiter.
    pub fn parse(payload: &str) -> Option<Change> {
        let (kind, id) = match payload.split_once(':') {
            Some(("run", id)) => (ChangeKind::Run, id),
            Some(("job", id)) => (ChangeKind::Job, id),
            Some(("event", id)) => (ChangeKind::Event, id),
            Some(_) => return None,
            None => (ChangeKind::Job, payload),
        };
        Some(Change {
            run_id: Uuid::parse_str(id).ok()?,
            kind,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Changes {
    tx: broadcast::Sender<Change>,
    listening: Arc<OnceLock<()>>,
}

impl Default for Changes {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(4096);
        Changes {
            tx,
            listening: Arc::default(),
        }
    }
}

impl Changes {
    /// Tells this process's subscribers.
    pub fn send(&self, change: Change) {
        let _ = self.tx.send(change);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.tx.subscribe()
    }

    /// Runs `start` the first time only (starting the listener).
    pub fn listen_once(&self, start: impl FnOnce(broadcast::Sender<Change>)) {
        let tx = self.tx.clone();
        self.listening.get_or_init(|| start(tx));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let run_id = Uuid::new_v4();
        for kind in ChangeKind::ALL {
            let c = Change { run_id, kind };
            assert_eq!(Change::parse(&c.payload()), Some(c));
        }
        // an earlier version's bare id wakes every waiter
        assert_eq!(
            Change::parse(&run_id.to_string()),
            Some(Change {
                run_id,
                kind: ChangeKind::Job
            })
        );
        assert_eq!(Change::parse("nope"), None);
        assert_eq!(Change::parse(&format!("other:{run_id}")), None);
        assert_eq!(Change::parse("job:not-a-uuid"), None);
    }
}
