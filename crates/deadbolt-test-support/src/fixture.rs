//! A fixture shared by every test of one test binary (one cluster, one
//! gateway), set up once, by whichever test asks first.
//!
//! The setup runs on a thread of its own that lives as long as the test
//! process (the "keeper"), inside a tokio runtime of its own. Processes it
//! starts ([`crate::serve::serve`], [`crate::s3::Moto`]) are killed by the
//! kernel when the test process exits (`PR_SET_PDEATHSIG`, bound to the
//! keeper thread), since a static is never dropped. A fixture holds
//! processes, paths and addresses, never a client or a pool: those belong
//! to the runtime that made them, and each test runs in a runtime of its
//! own.
//!
//! A static is never dropped: what a fixture must undo when the test
//! process exits (a database, a folder, processes to stop before those go)
//! it registers with [`at_exit`].
//!
//! A setup that panics fails every test that asks for it, with its message,
//! and is not tried again.

use std::cell::Cell;
use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

type Hook = Box<dyn FnOnce() + Send>;

/// What runs when the test process exits, last registered first.
static AT_EXIT: Mutex<Vec<Hook>> = Mutex::new(Vec::new());

extern "C" fn run_at_exit() {
    let hooks = std::mem::take(&mut *AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()));
    for hook in hooks.into_iter().rev() {
        // a failing hook does not keep the others from running
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(hook));
    }
}

/// Runs `f` when the test process exits (`atexit`: after the last test,
/// whether the tests passed or failed), hooks registered later first.
pub fn at_exit(f: impl FnOnce() + Send + 'static) {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        // SAFETY: registers a plain function; it runs once, at exit.
        let rc = unsafe { libc::atexit(run_at_exit) };
        assert_eq!(rc, 0, "atexit");
    });
    AT_EXIT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Box::new(f));
}

/// Removes `dir` (a fixture's temporary folder) when the test process
/// exits.
pub fn remove_at_exit(dir: &Path) {
    let dir = dir.to_path_buf();
    at_exit(move || {
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// Kills the process `pid` (SIGKILL) when the test process exits, before
/// the hooks registered earlier run (its database, its folder).
pub fn kill_at_exit(pid: u32) {
    at_exit(move || {
        // SAFETY: kill(2) on a pid this process started.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    });
}

thread_local! {
    /// Set on the keeper threads.
    static KEEPER: Cell<bool> = const { Cell::new(false) };
}

/// The fixture in `cell`, set up by `setup` the first time any test of the
/// binary asks (the others wait for it).
pub fn shared<T, S, F>(cell: &'static OnceLock<Result<T, String>>, setup: S) -> &'static T
where
    T: Send + Sync + 'static,
    S: FnOnce() -> F + Send + 'static,
    F: Future<Output = T> + 'static,
{
    let got = cell.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("fixture-keeper".into())
            .spawn(move || {
                KEEPER.with(|k| k.set(true));
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a tokio runtime for the fixture");
                let got =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(setup())))
                        .map_err(|p| {
                            p.downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "the fixture's setup panicked".into())
                        });
                let _ = tx.send(got);
                // the processes the setup started die with this thread:
                // it lives until the test process exits
                loop {
                    std::thread::park();
                }
            })
            .expect("spawning the fixture's thread");
        rx.recv()
            .unwrap_or_else(|_| Err("the fixture's thread ended".into()))
    });
    match got {
        Ok(t) => t,
        Err(e) => panic!("the shared fixture could not be set up: {e}"),
    }
}

/// On a keeper thread: `cmd`'s process gets SIGKILL when the keeper (that
/// is, the test process) goes. Elsewhere nothing changes: the caller's
/// guard kills the process.
pub fn die_with_fixture(cmd: &mut Command) {
    if KEEPER.with(Cell::get) {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches no memory of the
        // parent between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}
