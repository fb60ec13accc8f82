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

use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use deadbolt_store::{MetadataStore, Principal, Scope, LOCAL_TEAM};
use http::{HeaderValue, Request, Response};
use serde::{Deserialize, Serialize};
use tonic::Status;

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
        "SubmitExperiment" | "SubmitScan" | "CancelExperiment" | "Upload" => Scope::Submit,
        "GetExperiment" | "ListExperiments" | "WatchExperiment" => Scope::Read,
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
        .ok_or_else(|| Status::unauthenticated("no principal (the auth layer is missing)"))
}

fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn deny<B: Default>(status: Status) -> Response<B> {
    let (parts, _) = status.into_http::<()>().into_parts();
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
                    let Some(key) = bearer(req.headers()).map(str::to_string) else {
                        return Ok(deny(Status::unauthenticated(
                            "missing `authorization: Bearer <api key>`",
                        )));
                    };
                    match layer.store.authenticate(&key).await {
                        Ok(Some(p)) => p,
                        Ok(None) => {
                            tracing::info!(method = %path, "refused an unknown, revoked or expired key");
                            return Ok(deny(Status::unauthenticated(
                                "unknown, revoked or expired api key",
                            )));
                        }
                        Err(e) => return Ok(deny(Status::from(e))),
                    }
                }
            };
            let need = scope_of(&path);
            if !principal.has(need) {
                return Ok(deny(Status::permission_denied(format!(
                    "key {:?} of team {} lacks the {need} scope",
                    principal.key_name, principal.team
                ))));
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
            let r = deny(Status::unauthenticated(
                "stage services answer only the gateway (internal credential required)",
            ));
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
        assert_eq!(scope_of("/deadbolt.v1.Admin/Whatever"), Scope::Admin);
        assert!(open_path("/grpc.health.v1.Health/Check"));
        assert!(!open_path("/deadbolt.v1.TrainerService/Train"));
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }
}
