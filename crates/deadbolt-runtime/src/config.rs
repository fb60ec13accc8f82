//! Service configuration: a TOML file, then `DEADBOLT_*` environment
//! variables on top.
//!
//! ```toml
//! database_url = "postgres://postgres@127.0.0.1:5432/deadbolt"
//! artifact_url = "s3://deadbolt/artifacts"
//! lease_secs = 30.0
//! heartbeat_secs = 5.0
//! max_attempts = 3
//! [s3]
//! endpoint = "http://127.0.0.1:9000"
//! allow_http = true
//! [listen]
//! trainer = "0.0.0.0:50062"
//! [peers]
//! trainer = ["http://trainer-0:50062", "http://trainer-1:50062"]
//! ```
//!
//! Environment: `DEADBOLT_DATABASE_URL`, `DEADBOLT_MIGRATE` (`true` or
//! `false`), `DEADBOLT_ARTIFACT_URL`,
//! `DEADBOLT_WORK_DIR`, `DEADBOLT_LEASE_SECS`, `DEADBOLT_HEARTBEAT_SECS`,
//! `DEADBOLT_MAX_ATTEMPTS`, `DEADBOLT_POLL_MS`, `DEADBOLT_DRAIN_SECS`,
//! `DEADBOLT_METRICS_LISTEN`, `DEADBOLT_LOG_FORMAT` (`json` or `text`),
//! `DEADBOLT_AUTH` (`keys` or `none`), `DEADBOLT_INTERNAL_TOKEN`, `DEADBOLT_S3_ENDPOINT`,
//! `DEADBOLT_S3_ALLOW_HTTP`, `DEADBOLT_S3_REGION`,
//! `DEADBOLT_S3_ACCESS_KEY_ID`, `DEADBOLT_S3_SECRET_ACCESS_KEY`, and per
//! service `DEADBOLT_<SERVICE>_LISTEN` and `DEADBOLT_<SERVICE>_PEERS`
//! (comma-separated URLs), e.g. `DEADBOLT_TRAINER_PEERS`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The five services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    Poisoner,
    Trainer,
    Analyzer,
    Pruner,
    Gateway,
}

impl ServiceKind {
    pub const ALL: [ServiceKind; 5] = [
        ServiceKind::Poisoner,
        ServiceKind::Trainer,
        ServiceKind::Analyzer,
        ServiceKind::Pruner,
        ServiceKind::Gateway,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            ServiceKind::Poisoner => "poisoner",
            ServiceKind::Trainer => "trainer",
            ServiceKind::Analyzer => "analyzer",
            ServiceKind::Pruner => "pruner",
            ServiceKind::Gateway => "gateway",
        }
    }

    fn default_port(&self) -> u16 {
        match self {
            ServiceKind::Gateway => 50060,
            ServiceKind::Poisoner => 50061,
            ServiceKind::Trainer => 50062,
            ServiceKind::Analyzer => 50063,
            ServiceKind::Pruner => 50064,
        }
    }
}

impl std::str::FromStr for ServiceKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        ServiceKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s.trim())
            .with_context(|| {
                format!("unknown service {s:?} (poisoner, trainer, analyzer, pruner, gateway)")
            })
    }
}

/// S3 settings (anything unset comes from the standard AWS_* variables).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub endpoint: Option<String>,
    pub allow_http: Option<bool>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl S3Config {
    pub fn to_options(&self) -> deadbolt_store::S3Options {
        deadbolt_store::S3Options {
            endpoint: self.endpoint.clone(),
            allow_http: self.allow_http,
            region: self.region.clone(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
        }
    }
}

/// A value per service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerService<T> {
    pub poisoner: Option<T>,
    pub trainer: Option<T>,
    pub analyzer: Option<T>,
    pub pruner: Option<T>,
    pub gateway: Option<T>,
}

impl<T> PerService<T> {
    pub fn get(&self, k: ServiceKind) -> Option<&T> {
        match k {
            ServiceKind::Poisoner => self.poisoner.as_ref(),
            ServiceKind::Trainer => self.trainer.as_ref(),
            ServiceKind::Analyzer => self.analyzer.as_ref(),
            ServiceKind::Pruner => self.pruner.as_ref(),
            ServiceKind::Gateway => self.gateway.as_ref(),
        }
    }
    pub fn set(&mut self, k: ServiceKind, v: T) {
        let slot = match k {
            ServiceKind::Poisoner => &mut self.poisoner,
            ServiceKind::Trainer => &mut self.trainer,
            ServiceKind::Analyzer => &mut self.analyzer,
            ServiceKind::Pruner => &mut self.pruner,
            ServiceKind::Gateway => &mut self.gateway,
        };
        *slot = Some(v);
    }
}

/// Everything a `deadbolt serve` process needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `postgres://...` or `sqlite://path`.
    #[serde(default = "default_database_url")]
    pub database_url: String,
    /// Run the Postgres migrations when connecting (the default). With
    /// `false` the process only checks that every migration it knows was
    /// applied and refuses to start otherwise: for roles without DDL
    /// rights (the stage and gateway pods; the migrate Job migrates, see
    /// docs/deploy-roles.md). SQLite stores always migrate.
    #[serde(default = "default_migrate")]
    pub migrate: bool,
    /// A path, `file:///abs/path` or `s3://bucket/prefix`.
    #[serde(default = "default_artifact_url")]
    pub artifact_url: String,
    #[serde(default)]
    pub s3: S3Config,
    /// Scratch space of the workers (a fresh folder per job attempt).
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
    /// A job lease lasts this long unless renewed.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: f64,
    /// The gateway keeps an API key's lookup this long: a revoked or
    /// expired key is refused within it (0: no cache).
    #[serde(default = "default_key_cache_secs")]
    pub key_cache_secs: f64,
    /// Workers renew their lease (and report progress) this often.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: f64,
    /// Leases a job may take before it fails for good.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: i32,
    /// The polling scale. Idle workers and waiting calls wake on the
    /// store's change notifications; without one they re-read the store
    /// after the fallback poll, ten times this (at least 1 s), and an idle
    /// worker sooner when the store says a retry or an expired lease is
    /// due, but never more often than this.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// On SIGTERM or Ctrl-C a worker stops leasing and lets its current
    /// job finish its epoch (and store its checkpoint) for at most this
    /// long, then stops it; the job is released for another worker without
    /// counting the attempt.
    #[serde(default = "default_drain_secs")]
    pub drain_secs: f64,
    /// Where the process serves Prometheus metrics (`host:port`, `/metrics`);
    /// none when unset (the container image sets `0.0.0.0:9464`).
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Epoch checkpoints a training job keeps (older ones are deleted once
    /// a newer one is stored), so a run's storage is bounded by the model
    /// size, not its epoch count.
    #[serde(default = "default_keep_epochs")]
    pub keep_epochs: usize,
    /// How the gateway authenticates callers: `keys` (team API keys, the
    /// default) or `none` (everyone is the local team: the embedded mode).
    #[serde(default)]
    pub auth: crate::auth::AuthMode,
    /// The credential the gateway presents to the stage services, which
    /// refuse calls without it (from a Secret: `DEADBOLT_INTERNAL_TOKEN`).
    #[serde(default, skip_serializing)]
    pub internal_token: Option<String>,
    /// Deadline of a gateway request (to its response headers).
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: f64,
    /// Bounds on what a run may cost (`[limits]`).
    #[serde(default)]
    pub limits: crate::policy::Limits,
    /// Datasets remote specs may name (`[datasets.<name>] root = "..."`).
    #[serde(default)]
    pub datasets: std::collections::BTreeMap<String, crate::policy::DatasetEntry>,
    /// Every configured dataset root must lie under this folder.
    #[serde(default)]
    pub data_root: Option<PathBuf>,
    /// Let submitted specs name local paths (only the embedded `deadbolt
    /// experiment`, which runs on the user's own files, sets this).
    #[serde(default)]
    pub allow_local_paths: bool,
    /// TLS certificates and keys (`[tls]`, see [`crate::tls`]).
    #[serde(default, skip_serializing_if = "crate::tls::TlsConfig::is_empty")]
    pub tls: crate::tls::TlsConfig,
    /// Serve and call without TLS on addresses other hosts can reach.
    /// Without it (and without `[tls]`) only loopback listen addresses are
    /// served in plaintext.
    #[serde(default)]
    pub plaintext: bool,
    /// Listen address per service (`host:port`).
    #[serde(default)]
    pub listen: PerService<String>,
    /// Addresses (`http://host:port`) of the stage services the gateway
    /// calls; several per service are load-balanced and retried.
    #[serde(default)]
    pub peers: PerService<Vec<String>>,
}

fn default_database_url() -> String {
    "sqlite://deadbolt.db".into()
}
fn default_migrate() -> bool {
    true
}
fn default_artifact_url() -> String {
    "artifacts".into()
}
fn default_lease_secs() -> f64 {
    30.0
}
fn default_key_cache_secs() -> f64 {
    5.0
}
fn default_heartbeat_secs() -> f64 {
    5.0
}
fn default_max_attempts() -> i32 {
    3
}
fn default_poll_ms() -> u64 {
    200
}
fn default_drain_secs() -> f64 {
    30.0
}
fn default_keep_epochs() -> usize {
    2
}
fn default_request_timeout_secs() -> f64 {
    30.0
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parse_env<T: std::str::FromStr>(name: &str) -> Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    env(name)
        .map(|v| {
            v.trim()
                .parse::<T>()
                .map_err(|e| anyhow::anyhow!("{name}={v:?}: {e}"))
        })
        .transpose()
}

impl Config {
    /// Reads the file (when given), then applies the environment.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let mut c = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config {}", p.display()))?;
                Self::from_toml_str(&text).with_context(|| format!("config {}", p.display()))?
            }
            None => Config::default(),
        };
        c.apply_env()?;
        c.validate()?;
        Ok(c)
    }

    pub fn from_toml_str(text: &str) -> Result<Config> {
        Ok(toml::from_str(text)?)
    }

    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("config serializes")
    }

    /// `DEADBOLT_*` variables override the file.
    pub fn apply_env(&mut self) -> Result<()> {
        if let Some(v) = env("DEADBOLT_DATABASE_URL") {
            self.database_url = v;
        }
        if let Some(v) = parse_env("DEADBOLT_MIGRATE")? {
            self.migrate = v;
        }
        if let Some(v) = env("DEADBOLT_ARTIFACT_URL") {
            self.artifact_url = v;
        }
        if let Some(v) = env("DEADBOLT_WORK_DIR") {
            self.work_dir = Some(v.into());
        }
        if let Some(v) = parse_env("DEADBOLT_LEASE_SECS")? {
            self.lease_secs = v;
        }
        if let Some(v) = parse_env("DEADBOLT_HEARTBEAT_SECS")? {
            self.heartbeat_secs = v;
        }
        if let Some(v) = parse_env("DEADBOLT_MAX_ATTEMPTS")? {
            self.max_attempts = v;
        }
        if let Some(v) = parse_env("DEADBOLT_POLL_MS")? {
            self.poll_ms = v;
        }
        if let Some(v) = parse_env("DEADBOLT_DRAIN_SECS")? {
            self.drain_secs = v;
        }
        if let Some(v) = env("DEADBOLT_INTERNAL_TOKEN") {
            self.internal_token = Some(v);
        }
        if let Some(v) = env("DEADBOLT_AUTH") {
            self.auth = match v.as_str() {
                "keys" => crate::auth::AuthMode::Keys,
                "none" => crate::auth::AuthMode::None,
                other => bail!("DEADBOLT_AUTH={other:?}: expected keys or none"),
            };
        }
        self.tls.apply_env(env);
        if let Some(v) = parse_env("DEADBOLT_PLAINTEXT")? {
            self.plaintext = v;
        }
        if let Some(v) = env("DEADBOLT_METRICS_LISTEN") {
            self.metrics_listen = Some(v);
        }
        if let Some(v) = env("DEADBOLT_S3_ENDPOINT") {
            self.s3.endpoint = Some(v);
        }
        if let Some(v) = parse_env("DEADBOLT_S3_ALLOW_HTTP")? {
            self.s3.allow_http = Some(v);
        }
        if let Some(v) = env("DEADBOLT_S3_REGION") {
            self.s3.region = Some(v);
        }
        if let Some(v) = env("DEADBOLT_S3_ACCESS_KEY_ID") {
            self.s3.access_key_id = Some(v);
        }
        if let Some(v) = env("DEADBOLT_S3_SECRET_ACCESS_KEY") {
            self.s3.secret_access_key = Some(v);
        }
        for k in ServiceKind::ALL {
            let up = k.as_str().to_uppercase();
            if let Some(v) = env(&format!("DEADBOLT_{up}_LISTEN")) {
                self.listen.set(k, v);
            }
            if let Some(v) = env(&format!("DEADBOLT_{up}_PEERS")) {
                let list = v
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty());
                self.peers.set(k, list.collect());
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        if self.lease_secs.is_nan() || self.lease_secs <= 0.0 {
            bail!("lease_secs must be > 0");
        }
        if !(self.heartbeat_secs > 0.0 && self.heartbeat_secs < self.lease_secs) {
            bail!("heartbeat_secs must be > 0 and below lease_secs");
        }
        if !(self.key_cache_secs >= 0.0 && self.key_cache_secs <= 300.0) {
            bail!("key_cache_secs must be between 0 and 300");
        }
        if self.drain_secs.is_nan() || self.drain_secs < 0.0 {
            bail!("drain_secs must be >= 0");
        }
        if self.keep_epochs < 1 {
            bail!("keep_epochs must be >= 1 (resuming needs the latest epoch)");
        }
        if self.max_attempts < 1 {
            bail!("max_attempts must be >= 1");
        }
        self.tls.validate()?;
        Ok(())
    }

    /// What `serve` requires beyond [`Self::validate`] before it starts
    /// `kinds`: an internal credential that is at least
    /// [`MIN_INTERNAL_TOKEN_LEN`] bytes and not an example placeholder
    /// (stage services refuse every call without it, and the gateway
    /// presents it), and `auth = "none"` only when every service started
    /// listens on loopback (otherwise anyone who reaches the port is the
    /// local team).
    pub fn check_serving(&self, kinds: &[ServiceKind]) -> Result<()> {
        if let Some(token) = self.internal_token.as_deref() {
            check_internal_token(token)?;
        }
        if self.auth == crate::auth::AuthMode::None {
            for &k in kinds.iter().filter(|k| **k == ServiceKind::Gateway) {
                let addr = self.listen_addr(k);
                if crate::tls::needs_opt_in(&addr) {
                    bail!(
                        "auth = \"none\" serves every caller as the local team, so it is \
                         allowed on loopback only, but listen.{} is {addr}; use auth = \"keys\" \
                         (DEADBOLT_AUTH=keys)",
                        k.as_str()
                    );
                }
            }
        }
        Ok(())
    }

    /// Where a service listens (its configured address, else
    /// `127.0.0.1:<default port>`).
    pub fn listen_addr(&self, k: ServiceKind) -> String {
        self.listen
            .get(k)
            .cloned()
            .unwrap_or_else(|| format!("127.0.0.1:{}", k.default_port()))
    }

    /// The addresses the gateway calls for a stage service: the configured
    /// peers, else the service's own listen address.
    pub fn peer_urls(&self, k: ServiceKind) -> Vec<String> {
        match self.peers.get(k) {
            Some(v) if !v.is_empty() => v.clone(),
            _ => vec![format!("{}://{}", self.scheme(), self.listen_addr(k))],
        }
    }

    /// `https` when the services serve TLS (`tls.cert` is set), else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.cert.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The server TLS of service `k`: its certificate (stage services also
    /// require client certificates when `tls.client_ca` is set); none for
    /// plaintext, which needs `plaintext = true` unless the service
    /// listens on loopback only.
    pub fn server_tls(&self, k: ServiceKind) -> Result<Option<tonic::transport::ServerTlsConfig>> {
        if self.tls.cert.is_some() {
            return Ok(Some(self.tls.server(k != ServiceKind::Gateway)?));
        }
        let addr = self.listen_addr(k);
        if !self.plaintext && crate::tls::needs_opt_in(&addr) {
            bail!(
                "listen.{}: {addr} is reachable from other hosts; configure [tls] cert and key \
                 (DEADBOLT_TLS_CERT, DEADBOLT_TLS_KEY) or set plaintext = true \
                 (DEADBOLT_PLAINTEXT=true) to serve it unencrypted",
                k.as_str()
            );
        }
        Ok(None)
    }

    /// How long the gateway keeps a key's lookup (revocation takes effect
    /// within it).
    pub fn key_cache(&self) -> Duration {
        Duration::from_secs_f64(self.key_cache_secs)
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs_f64(self.lease_secs)
    }
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs_f64(self.heartbeat_secs)
    }
    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms.max(10))
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout_secs)
    }
    pub fn drain(&self) -> Duration {
        Duration::from_secs_f64(self.drain_secs)
    }
}

/// The shortest internal credential `serve` accepts, in bytes (32 random
/// bytes, base64: 44).
pub const MIN_INTERNAL_TOKEN_LEN: usize = 32;

/// Refuses an internal credential that is empty, shorter than
/// [`MIN_INTERNAL_TOKEN_LEN`] or one of the examples' placeholders (never
/// echoing it).
pub fn check_internal_token(token: &str) -> Result<()> {
    let t = token.trim();
    if t.is_empty() {
        bail!("internal_token (DEADBOLT_INTERNAL_TOKEN) is empty");
    }
    let lower = t.to_ascii_lowercase();
    if lower.contains("change-me") || lower.contains("changeme") || lower.contains("placeholder") {
        bail!(
            "internal_token (DEADBOLT_INTERNAL_TOKEN) is the example placeholder; generate one: \
             head -c 32 /dev/urandom | base64"
        );
    }
    if t.len() < MIN_INTERNAL_TOKEN_LEN {
        bail!(
            "internal_token (DEADBOLT_INTERNAL_TOKEN) is {} bytes; at least {MIN_INTERNAL_TOKEN_LEN} \
             are required (head -c 32 /dev/urandom | base64)",
            t.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn internal_tokens_and_open_auth_are_checked_before_serving() {
        use crate::auth::AuthMode;
        for bad in [
            "",
            "   ",
            "short-token",
            "CHANGE-ME-to-32-random-bytes-xxxxxxxxxxxxxxxx",
            "change-me-internal-token-padded-to-be-long-enough",
        ] {
            assert!(check_internal_token(bad).is_err(), "{bad:?}");
        }
        let good = "q3J0b2tlbi1mcm9tLTMyLXJhbmRvbS1ieXRlcy0xMjM0NTY=";
        check_internal_token(good).unwrap();
        let e = check_internal_token("short").unwrap_err().to_string();
        assert!(!e.contains("short"), "the token is never echoed: {e}");

        let mut c = Config {
            auth: AuthMode::None,
            internal_token: Some(good.into()),
            ..Config::default()
        };
        c.listen.set(ServiceKind::Gateway, "127.0.0.1:0".into());
        c.check_serving(&[ServiceKind::Gateway]).unwrap();
        c.listen.set(ServiceKind::Gateway, "0.0.0.0:50051".into());
        let e = c.check_serving(&[ServiceKind::Gateway]).unwrap_err();
        assert!(e.to_string().contains("listen.gateway"), "{e}");
        c.auth = AuthMode::Keys;
        c.check_serving(&[ServiceKind::Gateway]).unwrap();
        c.internal_token = Some("change-me-internal-token".into());
        assert!(c.check_serving(&[ServiceKind::Gateway]).is_err());
    }

    use super::*;

    #[test]
    fn the_example_config_parses() {
        let c = Config::from_toml_str(include_str!("../../../deploy/deadbolt.toml")).unwrap();
        assert!(c.database_url.starts_with("postgres://"));
        assert_eq!(c.peers.get(ServiceKind::Trainer).unwrap().len(), 1);
        assert_eq!(c.listen.get(ServiceKind::Gateway).unwrap(), "0.0.0.0:50060");
    }

    #[test]
    fn file_then_defaults() {
        let c = Config::from_toml_str(
            "database_url = \"postgres://x/y\"\nlease_secs = 3.0\nheartbeat_secs = 1.0\n[listen]\ntrainer = \"127.0.0.1:7000\"\n[peers]\ntrainer = [\"http://a:1\", \"http://b:2\"]\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.database_url, "postgres://x/y");
        assert_eq!(c.lease(), Duration::from_secs(3));
        assert_eq!(c.listen_addr(ServiceKind::Trainer), "127.0.0.1:7000");
        assert_eq!(c.listen_addr(ServiceKind::Pruner), "127.0.0.1:50064");
        assert_eq!(c.peer_urls(ServiceKind::Trainer).len(), 2);
        assert_eq!(c.peer_urls(ServiceKind::Pruner), ["http://127.0.0.1:50064"]);
        assert_eq!(Config::from_toml_str(&c.to_toml_string()).unwrap(), c);
        assert!(Config::from_toml_str("nope = 1").is_err());
        let bad = Config {
            heartbeat_secs: 5.0,
            lease_secs: 3.0,
            ..Config::default()
        };
        assert!(bad.validate().is_err());
        assert_eq!(
            "trainer".parse::<ServiceKind>().unwrap(),
            ServiceKind::Trainer
        );
        assert!("x".parse::<ServiceKind>().is_err());
    }
}
