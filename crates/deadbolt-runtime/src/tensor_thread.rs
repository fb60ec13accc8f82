//! One long-lived thread per process for all tensor work of the stage jobs.
//!
//! libtorch parallelises each op over an OpenMP team owned by the thread
//! that calls it. When several threads each own a team (tokio's blocking
//! pool keeps idle threads alive, and every job could land on another one),
//! the process holds more OpenMP threads than cores and libgomp stops
//! spinning between ops: every op then pays a futex wake-up, and training
//! ran at ~6.4k instead of ~11k images/s on 2 cores. Running every job on
//! this one thread keeps a single team, so a job in a service is as fast as
//! the same work in `deadbolt experiment --direct`. It also keeps tensor
//! work off the async runtime.

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Work = Box<dyn FnOnce() + Send + 'static>;

fn sender() -> &'static Mutex<mpsc::Sender<Work>> {
    static SENDER: OnceLock<Mutex<mpsc::Sender<Work>>> = OnceLock::new();
    SENDER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Work>();
        std::thread::Builder::new()
            .name("deadbolt-tensor".into())
            .spawn(move || {
                for work in rx {
                    work();
                }
            })
            .expect("spawning the tensor thread");
        Mutex::new(tx)
    })
}

/// Runs `f` on the process's tensor thread (jobs queue in order) and
/// returns its result; a panic in `f` comes back as `Err` with its message.
pub async fn run<T, F>(f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let work: Work = Box::new(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
            p.downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into())
        });
        let _ = tx.send(r);
    });
    sender()
        .lock()
        .map_err(|_| "tensor thread lock poisoned".to_string())?
        .send(work)
        .map_err(|_| "the tensor thread is gone".to_string())?;
    rx.await
        .map_err(|_| "the tensor thread dropped the job".to_string())?
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn runs_in_order_on_one_thread_and_reports_panics() {
        let a = super::run(|| std::thread::current().id()).await.unwrap();
        let b = super::run(|| std::thread::current().id()).await.unwrap();
        assert_eq!(a, b);
        assert_ne!(a, std::thread::current().id());
        let e = super::run(|| -> i32 { panic!("boom") }).await.unwrap_err();
        assert!(e.contains("boom"), "{e}");
        // still serving after a panic
        assert_eq!(super::run(|| 2 + 2).await.unwrap(), 4);
    }
}
