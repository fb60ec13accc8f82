//! A fresh Postgres database per test.
//!
//! The server comes from `DEADBOLT_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`; the role needs CREATEDB).
//! At most [`MAX_LIVE`] databases of one test process exist at once (more
//! `fresh()` calls wait), so parallel tests stay under the server's
//! connection limit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The default server URL (the database named in it is only used to create
/// and drop the test databases).
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// How many fresh databases one test process holds at once.
pub const MAX_LIVE: usize = 4;

/// A uniquely named, freshly created database, dropped by
/// [`Pg::drop_db`] or, failing that, when the guard is dropped (also when the
/// test panics).
#[derive(Debug)]
pub struct Pg {
    url: String,
    admin: String,
    db: String,
    dropped: AtomicBool,
    _permit: OwnedSemaphorePermit,
}

fn admin_url() -> String {
    std::env::var("DEADBOLT_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_URL.into())
}

async fn execute(admin: &str, sql: String) -> Result<(), sqlx::Error> {
    let pool = sqlx::PgPool::connect(admin).await?;
    let result = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
    pool.close().await;
    result.map(drop)
}

impl Pg {
    /// Creates a database `deadbolt_test_<uuid>` on the test server.
    /// Panics (with a hint) when the server cannot be reached.
    pub async fn fresh() -> Pg {
        static LIVE: OnceLock<Arc<Semaphore>> = OnceLock::new();
        let permit = LIVE
            .get_or_init(|| Arc::new(Semaphore::new(MAX_LIVE)))
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let admin = admin_url();
        let db = format!("deadbolt_test_{}", uuid::Uuid::new_v4().simple());
        execute(&admin, format!("CREATE DATABASE {db}"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot create a database on Postgres at {admin} ({e}); \
                     start it or set DEADBOLT_TEST_PG_URL"
                )
            });
        let mut url = url::Url::parse(&admin).expect("DEADBOLT_TEST_PG_URL is a URL");
        url.set_path(&format!("/{db}"));
        Pg {
            url: url.to_string(),
            admin,
            db,
            dropped: AtomicBool::new(false),
            _permit: permit,
        }
    }

    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.db
    }

    /// Drops the database (closing its connections). Best effort; repeating
    /// it is a no-op.
    pub async fn drop_db(&self) {
        if !self.dropped.swap(true, Ordering::SeqCst) {
            drop_database(&self.admin, &self.db).await;
        }
    }
}

async fn drop_database(admin: &str, db: &str) {
    let sql = format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)");
    if let Err(e) = execute(admin, sql).await {
        eprintln!("could not drop test database {db}: {e}");
    }
}

/// Drops the database `db` from a thread of its own (the caller may be
/// inside a runtime, or exiting), waiting for it.
fn drop_blocking(admin: String, db: String) {
    let dropper = std::thread::spawn(move || {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(drop_database(&admin, &db)),
            Err(e) => eprintln!("could not drop test database {db}: {e}"),
        }
    });
    let _ = dropper.join();
}

impl Pg {
    /// Drops the database when the test process exits: for a database
    /// held by a shared fixture ([`crate::fixture`]), which is never
    /// dropped.
    pub fn drop_at_exit(&self) {
        let (admin, db) = (self.admin.clone(), self.db.clone());
        crate::fixture::at_exit(move || drop_blocking(admin, db));
    }
}

impl Drop for Pg {
    /// A database not dropped yet (a panicking test, a forgotten `drop_db`)
    /// is dropped here, on a thread of its own as this may run inside a
    /// runtime.
    fn drop(&mut self) {
        if self.dropped.swap(true, Ordering::SeqCst) {
            return;
        }
        drop_blocking(self.admin.clone(), self.db.clone());
    }
}
