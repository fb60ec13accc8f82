//! Change notifications: "something about run X changed" (an event was
//! appended, a job ended or was released, the run's status changed), so
//! watchers and waiting stage calls wake up instead of polling.
//!
//! In one process they travel over a broadcast channel (all the embedded
//! SQLite store needs); on Postgres every change is also sent with
//! `pg_notify('deadbolt_changes', run_id)`, and one `LISTEN` connection per
//! process (started with the first subscriber) forwards the other
//! processes' changes to the same channel. A lagging or lost notification
//! only delays a waiter until its slow fallback poll.

use std::sync::{Arc, OnceLock};

use tokio::sync::broadcast;
use uuid::Uuid;

/// The Postgres channel.
pub const CHANNEL: &str = "deadbolt_changes";

#[derive(Debug, Clone)]
pub struct Changes {
    tx: broadcast::Sender<Uuid>,
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
    pub fn send(&self, run_id: Uuid) {
        let _ = self.tx.send(run_id);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.tx.subscribe()
    }

    /// Runs `start` the first time only (starting the listener).
    pub fn listen_once(&self, start: impl FnOnce(broadcast::Sender<Uuid>)) {
        let tx = self.tx.clone();
        self.listening.get_or_init(|| start(tx));
    }
}
