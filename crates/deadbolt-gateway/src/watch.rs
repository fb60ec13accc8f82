//! Push-based run watching: one feed task per watched run and process
//! reads the run's new events when the store says the run changed
//! (Postgres LISTEN/NOTIFY, an in-process broadcast on SQLite; a slow poll
//! as fallback) and publishes them to every watcher of that run through a
//! `tokio::sync::watch` channel. Many watchers of a run cost one reader,
//! not one database poll each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadbolt_store::{ChangeKind, MetadataStore, RunEvent, RunStatus};
use tokio::sync::watch;
use tonic::Status;
use uuid::Uuid;

/// What a run's watchers see: every event so far and the run's status
/// (read before the events, so the events recorded before a final status
/// are all in the snapshot that carries it).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub events: Arc<Vec<RunEvent>>,
    pub status: RunStatus,
    /// Set when the feed could not read the run (the watchers end with it).
    pub error: Option<Status>,
    /// False until the feed has read the run once: a new feed's first
    /// snapshot holds no events yet, whatever the run's status (a watcher
    /// of a finished run waits for the replay instead of ending at once).
    pub read: bool,
}

/// The feeds of this process, by run.
#[derive(Clone)]
pub struct Feeds {
    store: Arc<dyn MetadataStore>,
    fallback: Duration,
    feeds: Arc<Mutex<HashMap<Uuid, Arc<watch::Sender<Snapshot>>>>>,
}

impl Feeds {
    pub fn new(store: Arc<dyn MetadataStore>, fallback: Duration) -> Feeds {
        Feeds {
            store,
            fallback,
            feeds: Arc::default(),
        }
    }

    /// The feed of `run_id` (started when this is its first watcher). The
    /// feed ends when the run ended or its last watcher left; a watcher
    /// whose feed ended before the run did subscribes again.
    pub fn subscribe(&self, run_id: Uuid, status: RunStatus) -> watch::Receiver<Snapshot> {
        let mut feeds = self.feeds.lock().expect("lock");
        if let Some(tx) = feeds.get(&run_id) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(Snapshot {
            events: Arc::new(Vec::new()),
            status,
            error: None,
            read: false,
        });
        let tx = Arc::new(tx);
        feeds.insert(run_id, tx.clone());
        let (store, fallback, all) = (self.store.clone(), self.fallback, self.feeds.clone());
        tokio::spawn(async move {
            feed(store, run_id, &tx, fallback).await;
            let mut feeds = all.lock().expect("lock");
            if feeds.get(&run_id).is_some_and(|t| Arc::ptr_eq(t, &tx)) {
                feeds.remove(&run_id);
            }
        });
        rx
    }
}

async fn feed(
    store: Arc<dyn MetadataStore>,
    run_id: Uuid,
    tx: &watch::Sender<Snapshot>,
    fallback: Duration,
) {
    let mut changes = store.changes();
    let mut events: Vec<RunEvent> = Vec::new();
    loop {
        let run = match store.get_run(run_id).await {
            Ok(r) => r,
            Err(e) => {
                tx.send_modify(|s| s.error = Some(Status::from(e)));
                return;
            }
        };
        let after = events.last().map(|e| e.seq).unwrap_or(0);
        let new = match store.list_events(run_id, after).await {
            Ok(e) => e,
            Err(e) => {
                tx.send_modify(|s| s.error = Some(Status::from(e)));
                return;
            }
        };
        let changed = {
            let snap = tx.borrow();
            !snap.read || !new.is_empty() || snap.status != run.status
        };
        if changed {
            events.extend(new);
            tx.send_replace(Snapshot {
                events: Arc::new(events.clone()),
                status: run.status,
                error: None,
                read: true,
            });
        }
        if run.status.is_terminal() || tx.receiver_count() == 0 {
            return;
        }
        tokio::select! {
            _ = deadbolt_runtime::stage::changed(&mut changes, run_id, &ChangeKind::ALL) => {}
            _ = tokio::time::sleep(fallback) => {}
            _ = tx.closed() => return,
        }
    }
}
