//! An S3-compatible server on loopback: `moto_server`, one process per
//! [`Moto`], killed when it is dropped. [`Moto::shared`] lets the tests of a
//! process that run at the same time share one server (each with buckets of
//! its own), as starting one takes a few seconds.
//!
//! The binary is looked up in `$DEADBOLT_VENV/bin`, then in the venv that
//! `scripts/setup-test-deps.sh` makes
//! (`${XDG_CACHE_HOME:-~/.cache}/deadbolt/venv-torch-2.13.0/bin`), then on
//! `PATH`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// The credentials the server accepts (moto accepts any).
pub const ACCESS_KEY_ID: &str = "test";
pub const SECRET_ACCESS_KEY: &str = "test";
pub const REGION: &str = "us-east-1";

/// A running `moto_server`.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    port: u16,
}

/// Where `moto_server` is: `$DEADBOLT_VENV/bin`, the setup script's venv, or
/// the bare name (found on PATH when spawned).
pub fn moto_server_bin() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    let venvs = [
        std::env::var_os("DEADBOLT_VENV").map(PathBuf::from),
        cache.map(|c| c.join("deadbolt/venv-torch-2.13.0")),
    ];
    venvs
        .into_iter()
        .flatten()
        .map(|v| v.join("bin/moto_server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("moto_server"))
}

/// One HTTP/1.1 request on a fresh connection; the whole response.
fn http(port: u16, method: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

impl Moto {
    /// Starts `moto_server` and creates `bucket`. Panics, with a hint, when
    /// it cannot.
    pub fn start(bucket: &str) -> Moto {
        let moto = Moto::spawn();
        moto.create_bucket(bucket);
        moto
    }

    /// The server that the tests of this process running now share: started
    /// by the first caller, killed when the last `Arc` is dropped. Create a
    /// bucket of your own on it.
    pub fn shared() -> Arc<Moto> {
        static SHARED: Mutex<Weak<Moto>> = Mutex::new(Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(moto) = shared.upgrade() {
            return moto;
        }
        let moto = Arc::new(Moto::spawn());
        *shared = Arc::downgrade(&moto);
        moto
    }

    /// Starts `moto_server` on a free loopback port and waits until it
    /// answers (30 s at most).
    fn spawn() -> Moto {
        let bin = moto_server_bin();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut cmd = Command::new(&bin);
        crate::fixture::die_with_fixture(&mut cmd);
        let child = cmd
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}); run scripts/setup-test-deps.sh to install moto_server",
                    bin.display()
                )
            });
        let mut moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http(port, "GET", "/").is_ok_and(|r| r.starts_with("HTTP/1.")) {
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!("{} exited ({status}) before answering", bin.display());
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer on port {port} within 30s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        moto
    }

    /// Creates `bucket` (an existing one is kept).
    pub fn create_bucket(&self, bucket: &str) {
        let r = http(self.port, "PUT", &format!("/{bucket}")).expect("create bucket");
        assert!(r.starts_with("HTTP/1.1 200"), "create bucket {bucket}: {r}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `[s3]` table of a deadbolt config file.
    pub fn config(&self) -> String {
        format!(
            "[s3]\nendpoint = \"{}\"\nallow_http = true\nregion = \"{REGION}\"\n\
             access_key_id = \"{ACCESS_KEY_ID}\"\nsecret_access_key = \"{SECRET_ACCESS_KEY}\"\n",
            self.endpoint()
        )
    }

    /// The same settings for [`deadbolt_store::ArtifactStore::from_url_with`].
    pub fn options(&self) -> deadbolt_store::S3Options {
        deadbolt_store::S3Options {
            endpoint: Some(self.endpoint()),
            allow_http: Some(true),
            region: Some(REGION.into()),
            access_key_id: Some(ACCESS_KEY_ID.into()),
            secret_access_key: Some(SECRET_ACCESS_KEY.into()),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
