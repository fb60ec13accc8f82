//! A tonic server for one service, with `grpc.health.v1` (the service and
//! the whole server report SERVING), reflection (v1 and v1alpha) over
//! `deadbolt_proto::FILE_DESCRIPTOR_SET`, and request metrics.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::ServingStatus;

/// The largest request a deadbolt server decodes (4 MiB; a spec is a few KiB).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// The largest response it encodes (16 MiB: a page of runs with their
/// artifacts and stages).
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// Concurrent HTTP/2 streams per connection (a watcher holds one).
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Methods that bound their own duration, exempt from the fixed request
/// timeout of [`spawn_with`]: an upload's deadline grows with its declared
/// size (the gateway's upload handler), where a fixed 30 s would cut a
/// 256 MiB upload short.
pub const OWN_DEADLINE: &[&str] = &["/deadbolt.v1.ExperimentService/Upload"];

/// The request timeout of [`spawn_with`], as tonic's `Server::timeout`
/// applies it (CANCELLED "Timeout expired" once the response headers did
/// not come in time), but for the methods of [`OWN_DEADLINE`]. A client's
/// `grpc-timeout` still applies to every method (tonic's own layer).
#[derive(Clone)]
struct DeadlineLayer(std::time::Duration);

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            timeout: self.0,
        }
    }
}

#[derive(Clone)]
struct Deadline<S> {
    inner: S,
    timeout: std::time::Duration,
}

impl<S, B, R> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let own = OWN_DEADLINE.contains(&req.uri().path());
        let fut = self.inner.call(req);
        if own {
            return Box::pin(fut);
        }
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Ok(crate::auth::deny(crate::error::LayerError::TimeoutExpired)),
            }
        })
    }
}

/// Binds `addr` (port 0 = an ephemeral port).
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

/// Serves `routes` (one deadbolt service, named `service_name`) plus health
/// and reflection on `listener` until the task is dropped. Returns the
/// bound address and the server task.
pub async fn spawn(
    service_name: &'static str,
    routes: Routes,
    listener: TcpListener,
) -> Result<(SocketAddr, tokio::task::JoinHandle<Result<()>>)> {
    spawn_with(service_name, routes, listener, None, Guard::Open, None).await
}

/// Who may call a server (see [`crate::auth`]).
#[derive(Clone)]
pub enum Guard {
    /// Team API keys (the gateway).
    Keys(crate::auth::AuthLayer),
    /// The internal credential (stage services).
    Internal(crate::auth::InternalLayer),
    /// Anyone (tests of the server itself).
    Open,
}

/// [`spawn`], with a per-request deadline (the time to the response
/// headers: a streaming call is bounded until it returns its stream;
/// the methods of [`OWN_DEADLINE`] bound themselves). Stage services take
/// none: their calls wait on jobs that run for hours.
pub async fn spawn_with(
    service_name: &'static str,
    routes: Routes,
    listener: TcpListener,
    request_timeout: Option<std::time::Duration>,
    guard: Guard,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<Result<()>>)> {
    let (keys, internal) = match guard {
        Guard::Keys(k) => (Some(k), None),
        Guard::Internal(i) => (None, Some(i)),
        Guard::Open => (None, None),
    };
    let addr = listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(service_name, ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    // reflection as v1 and v1alpha: grpcio-reflection (Python), grpcui and
    // several GUI clients speak only v1alpha
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(deadbolt_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(deadbolt_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the v1alpha reflection service")?;
    let routes = routes
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha);
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)));
    let secure = tls.is_some();
    if let Some(t) = tls {
        builder = builder
            .tls_config(t)
            .with_context(|| format!("{service_name}: the TLS configuration"))?;
    }
    // the request timeout is applied by [`DeadlineLayer`] (tonic's own
    // would cut an upload at a fixed time whatever its size)
    let deadline = request_timeout.map(DeadlineLayer);
    tracing::info!(service = service_name, addr = %addr, tls = secure, "grpc server listening");
    let task = tokio::spawn(async move {
        // keep the reporter alive as long as the server
        let _reporter = reporter;
        builder
            // outermost, as tonic's own timeout was
            .layer(tower::util::option_layer(deadline))
            .layer(crate::metrics::GrpcMetricsLayer {
                service: service_name,
            })
            .layer(tower::util::option_layer(keys))
            .layer(tower::util::option_layer(internal))
            .add_routes(routes)
            // TCP_NODELAY on every accepted connection (tonic's own
            // setting applies only to listeners it binds): without it a
            // response's last small frame (the trailers) waits for the
            // peer's delayed ACK, 40-100 ms on every call
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )
            .await
            .with_context(|| format!("{service_name} server on {addr}"))
    });
    Ok((addr, task))
}

/// A client channel over several addresses of one service: load-balanced,
/// connecting lazily, so a dead (or frozen: keepalive pings) instance only
/// fails the calls it was given (the caller retries them).
/// `https://` URLs are called over TLS (`tls`: CA bundle, client
/// certificate, domain).
pub fn balanced_channel(
    urls: &[String],
    tls: Option<&crate::tls::TlsConfig>,
) -> Result<tonic::transport::Channel> {
    let endpoints = urls
        .iter()
        .map(|u| {
            let mut e = tonic::transport::Endpoint::from_shared(u.clone())
                .with_context(|| format!("bad peer address {u:?}"))?;
            if let Some(c) = crate::tls::client_for(u, tls)? {
                e = e
                    .tls_config(c)
                    .with_context(|| format!("TLS for peer {u}"))?;
            }
            Ok::<_, anyhow::Error>(e)
        })
        .map(|e| {
            e.map(|e| {
                // HTTP/2 keepalive pings: a peer that stops answering
                // (paused, partitioned) fails its calls within ~10 s,
                // and the caller retries them elsewhere
                e.connect_timeout(std::time::Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(std::time::Duration::from_secs(5))
                    .keep_alive_timeout(std::time::Duration::from_secs(5))
                    .keep_alive_while_idle(true)
            })
        })
        .collect::<Result<Vec<_>>>()?;
    anyhow::ensure!(!endpoints.is_empty(), "no peer addresses");
    Ok(tonic::transport::Channel::balance_list(
        endpoints.into_iter(),
    ))
}
