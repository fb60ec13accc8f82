//! Who may call what.
//!
//! - **The public API** (the gateway): every RPC but health and reflection
//!   needs `authorization: Bearer <team API key>`; a missing, unknown,
//!   revoked or expired key answers UNAUTHENTICATED, a key without the
//!   method's scope PERMISSION_DENIED. The key's [`Principal`] (its team
//!   and scopes) travels to the handler in the request's extensions; runs,
//!   events and artifacts are the team's. `auth = "none"` (the embedded
//!   `deadbolt experiment`, and tests that say so) makes every caller the
//!   one local team with every scope.
//! - **The stage services** accept only the gateway: calls must carry the
//!   internal credential (`internal_token`, from a Secret), compared in
//!   constant time; a user key is refused.
//!
//! Keys are never logged: only their non-secret prefix, and the store keeps
//! only their sha256.
//!
//! Lookups are cached ([`KeyCache`]): a key's answer (its principal, or "no
//! such key") is kept for `key_cache_secs` (default 5 s), by the key's
//! sha256, so a busy client costs one store lookup per TTL. **Revocation
//! and expiry take effect within that TTL** on every gateway replica.
//! Unknown tokens are rate-limited per client address ([`FailureLimiter`]:
//! a burst of 20, then 2 per second): past the budget a caller's requests
//! are answered RESOURCE_EXHAUSTED without a store lookup until it refills,
//! so guessing keys costs the store nothing and other callers nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use deadbolt_store::{MetadataStore, Principal, Scope, LOCAL_TEAM};
use http::{HeaderValue, Request, Response};
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::error::LayerError;

/// How the gateway authenticates its callers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Team API keys (the default).
    #[default]
    Keys,
    /// Everyone is the local team (the embedded, single-user mode).
    None,
}

/// The scope a public method needs.
pub fn scope_of(path: &str) -> Scope {
    match path.rsplit('/').next().unwrap_or("") {
        "SubmitExperiment" | "SubmitScan" | "CancelExperiment" | "Upload" | "DeleteUpload" => {
            Scope::Submit
        }
        "GetExperiment" | "ListExperiments" | "WatchExperiment" | "Download" | "ListUploads" => {
            Scope::Read
        }
        _ => Scope::Admin,
    }
}

fn open_path(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

/// The principal of a request that passed [`AuthLayer`].
pub fn principal<T>(req: &tonic::Request<T>) -> Result<&Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .ok_or_else(|| LayerError::NoPrincipal.into())
}

fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The answer of a refused call (its status through the one mapping).
pub(crate) fn deny<B: Default>(e: impl Into<Status>) -> Response<B> {
    let (parts, _) = e.into().into_http::<()>().into_parts();
    Response::from_parts(parts, B::default())
}

/// The local principal of `auth = "none"`.
pub fn local_principal() -> Principal {
    Principal {
        team: LOCAL_TEAM.to_string(),
        key_id: uuid::Uuid::nil(),
        key_name: "local".into(),
        scopes: Scope::ALL.to_vec(),
    }
}

/// Authenticates public calls with team API keys (see the module docs).
#[derive(Clone)]
pub struct AuthLayer {
    pub store: Arc<dyn MetadataStore>,
    pub mode: AuthMode,
    pub cache: Arc<KeyCache>,
    pub failures: Arc<FailureLimiter>,
}

impl AuthLayer {
    /// Key auth (or none) over `store`, answers cached for `ttl`.
    pub fn new(store: Arc<dyn MetadataStore>, mode: AuthMode, ttl: Duration) -> AuthLayer {
        AuthLayer {
            store,
            mode,
            cache: Arc::new(KeyCache::new(ttl)),
            failures: Arc::new(FailureLimiter::new(20.0, 2.0)),
        }
    }

    async fn authenticate(&self, key: &str) -> Result<Option<Principal>, Status> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if let Some(hit) = self.cache.get(&digest) {
            return Ok(hit);
        }
        let found = self.store.authenticate(key).await.map_err(Status::from)?;
        self.cache.put(digest, found.clone());
        Ok(found)
    }
}

/// The most answers a [`KeyCache`] or [`FailureLimiter`] keeps; past it,
/// expired entries go, and if none had, all do (a flood of distinct
/// tokens cannot grow memory).
pub const MAX_AUTH_ENTRIES: usize = 10_000;

/// A key store answer (the principal, or no such key) and when it came.
type Answer = (Option<Principal>, Instant);

/// Answers of the key store by the key's sha256, each for a TTL.
#[derive(Debug)]
pub struct KeyCache {
    ttl: Duration,
    entries: Mutex<HashMap<[u8; 32], Answer>>,
}

impl KeyCache {
    pub fn new(ttl: Duration) -> KeyCache {
        KeyCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, digest: &[u8; 32]) -> Option<Option<Principal>> {
        let e = self.entries.lock().ok()?;
        let (p, at) = e.get(digest)?;
        (at.elapsed() < self.ttl).then(|| p.clone())
    }

    fn put(&self, digest: [u8; 32], p: Option<Principal>) {
        if self.ttl.is_zero() {
            return;
        }
        if let Ok(mut e) = self.entries.lock() {
            if e.len() >= MAX_AUTH_ENTRIES {
                let ttl = self.ttl;
                e.retain(|_, (_, at)| at.elapsed() < ttl);
                if e.len() >= MAX_AUTH_ENTRIES {
                    e.clear();
                }
            }
            e.insert(digest, (p, Instant::now()));
        }
    }

    /// Entries held (for tests).
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A token bucket of failed authentications per client address.
#[derive(Debug)]
pub struct FailureLimiter {
    burst: f64,
    per_sec: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl FailureLimiter {
    pub fn new(burst: f64, per_sec: f64) -> FailureLimiter {
        FailureLimiter {
            burst,
            per_sec,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The tokens `ip` has now (refilled since its last failure).
    fn level(&self, b: &(f64, Instant)) -> f64 {
        (b.0 + b.1.elapsed().as_secs_f64() * self.per_sec).min(self.burst)
    }

    /// False while `ip` has spent its failures.
    pub fn allowed(&self, ip: IpAddr) -> bool {
        let Ok(b) = self.buckets.lock() else {
            return true;
        };
        b.get(&ip).is_none_or(|e| self.level(e) >= 1.0)
    }

    /// Spends one of `ip`'s failures.
    pub fn failed(&self, ip: IpAddr) {
        let Ok(mut b) = self.buckets.lock() else {
            return;
        };
        if b.len() >= MAX_AUTH_ENTRIES && !b.contains_key(&ip) {
            let full = self.burst;
            b.retain(|_, e| (e.0 + e.1.elapsed().as_secs_f64() * self.per_sec) < full);
            if b.len() >= MAX_AUTH_ENTRIES {
                b.clear();
            }
        }
        let level = b.get(&ip).map_or(self.burst, |e| self.level(e));
        b.insert(ip, ((level - 1.0).max(0.0), Instant::now()));
    }
}

/// The client's address (plaintext or TLS connections).
fn peer_ip<B>(req: &Request<B>) -> Option<IpAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
        .map(|a| a.ip())
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S, B, R> tower::Service<Request<B>> for Auth<S>
where
    S: tower::Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // the clone that was polled ready serves this call
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            if open_path(&path) {
                return inner.call(req).await;
            }
            let principal = match layer.mode {
                AuthMode::None => local_principal(),
                AuthMode::Keys => {
                    let ip = peer_ip(&req);
                    if ip.is_some_and(|ip| !layer.failures.allowed(ip)) {
                        return Ok(deny(LayerError::TooManyFailures));
                    }
                    let Some(key) = bearer(req.headers()).map(str::to_string) else {
                        return Ok(deny(LayerError::MissingKey));
                    };
                    match layer.authenticate(&key).await {
                        Ok(Some(p)) => p,
                        Ok(None) => {
                            if let Some(ip) = ip {
                                layer.failures.failed(ip);
                            }
                            tracing::info!(method = %path, "refused an unknown, revoked or expired key");
                            return Ok(deny(LayerError::UnknownKey));
                        }
                        Err(e) => return Ok(deny(e)),
                    }
                }
            };
            let need = scope_of(&path);
            if !principal.has(need) {
                return Ok(deny(LayerError::LacksScope {
                    key_name: principal.key_name,
                    team: principal.team,
                    scope: need,
                }));
            }
            req.extensions_mut().insert(principal);
            inner.call(req).await
        })
    }
}

/// Requires the internal credential on every stage-service call but
/// health and reflection.
#[derive(Clone)]
pub struct InternalLayer {
    pub token: Arc<str>,
}

impl<S> tower::Layer<S> for InternalLayer {
    type Service = Internal<S>;
    fn layer(&self, inner: S) -> Internal<S> {
        Internal {
            inner,
            token: self.token.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Internal<S> {
    inner: S,
    token: Arc<str>,
}

/// Equal bytes, in time that depends only on the lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl<S, B, R> tower::Service<Request<B>> for Internal<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let ok = open_path(req.uri().path())
            || bearer(req.headers()).is_some_and(|t| same(t.as_bytes(), self.token.as_bytes()));
        if !ok {
            tracing::warn!(method = %req.uri().path(), "refused a stage call without the internal credential");
            let r = deny(LayerError::NotTheGateway);
            return Box::pin(async move { Ok(r) });
        }
        let fut = self.inner.call(req);
        Box::pin(fut)
    }
}

/// Adds `authorization: Bearer <token>` to every request of a client
/// channel (the gateway's stage clients, the CLI's gateway client).
#[derive(Clone, Debug)]
pub struct WithBearer<S> {
    inner: S,
    header: Option<HeaderValue>,
}

impl<S> WithBearer<S> {
    /// `token` None adds nothing. A token that is not a valid header value
    /// is an error naming where it came from (never the token itself).
    pub fn new(inner: S, token: Option<&str>, what: &str) -> anyhow::Result<Self> {
        let header = token
            .map(|t| {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|_| anyhow::anyhow!("{what} is not a valid header value"))?;
                v.set_sensitive(true);
                anyhow::Ok(v)
            })
            .transpose()?;
        Ok(WithBearer { inner, header })
    }
}

impl<S, B> tower::Service<Request<B>> for WithBearer<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if let Some(h) = &self.header {
            req.headers_mut().insert("authorization", h.clone());
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_answers_are_cached_for_their_ttl_and_bounded() {
        let c = KeyCache::new(Duration::from_millis(200));
        let d = [7u8; 32];
        assert_eq!(c.get(&d), None);
        c.put(d, Some(local_principal()));
        assert_eq!(c.get(&d), Some(Some(local_principal())));
        c.put([8u8; 32], None);
        assert_eq!(c.get(&[8u8; 32]), Some(None), "unknown keys are cached too");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(c.get(&d), None, "past the ttl the store is asked again");
        // a flood of distinct tokens cannot grow the cache past its bound
        let big = KeyCache::new(Duration::from_secs(60));
        for i in 0..(3 * MAX_AUTH_ENTRIES as u32) {
            let mut d = [0u8; 32];
            d[..4].copy_from_slice(&i.to_le_bytes());
            big.put(d, None);
            assert!(big.len() <= MAX_AUTH_ENTRIES);
        }
        // ttl 0: nothing cached
        let none = KeyCache::new(Duration::ZERO);
        none.put(d, None);
        assert!(none.is_empty());
    }

    #[test]
    fn failed_authentications_are_limited_per_address() {
        let l = FailureLimiter::new(3.0, 1000.0 / 3600.0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(l.allowed(a));
            l.failed(a);
        }
        assert!(!l.allowed(a), "the burst is spent");
        assert!(l.allowed(b), "another address keeps its own budget");
        // refills
        let fast = FailureLimiter::new(1.0, 50.0);
        fast.failed(a);
        assert!(!fast.allowed(a));
        std::thread::sleep(Duration::from_millis(60));
        assert!(fast.allowed(a));
        // bounded under a flood of addresses
        for i in 0..(2 * MAX_AUTH_ENTRIES as u32) {
            l.failed(IpAddr::from(i.to_be_bytes()));
        }
        assert!(l.buckets.lock().unwrap().len() <= MAX_AUTH_ENTRIES);
    }

    #[test]
    fn methods_need_their_scope() {
        assert_eq!(
            scope_of("/deadbolt.v1.ExperimentService/SubmitExperiment"),
            Scope::Submit
        );
        assert_eq!(
            scope_of("/deadbolt.v1.ExperimentService/SubmitScan"),
            Scope::Submit
        );
        assert_eq!(
            scope_of("/deadbolt.v1.ExperimentService/WatchExperiment"),
            Scope::Read
        );
        for (m, scope) in [
            ("Download", Scope::Read),
            ("ListUploads", Scope::Read),
            ("DeleteUpload", Scope::Submit),
        ] {
            assert_eq!(
                scope_of(&format!("/deadbolt.v1.ExperimentService/{m}")),
                scope,
                "{m}"
            );
        }
        assert_eq!(scope_of("/deadbolt.v1.Admin/Whatever"), Scope::Admin);
        assert!(open_path("/grpc.health.v1.Health/Check"));
        assert!(!open_path("/deadbolt.v1.TrainerService/Train"));
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }
}
