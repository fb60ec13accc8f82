//! A tonic server for one service, with `grpc.health.v1` (the service and
//! the whole server report SERVING) and reflection over
//! `deadbolt_proto::FILE_DESCRIPTOR_SET`.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tonic_health::ServingStatus;

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
    let addr = listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(service_name, ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(deadbolt_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let routes = routes.add_service(health).add_service(reflection);
    tracing::info!(service = service_name, addr = %addr, "grpc server listening");
    let task = tokio::spawn(async move {
        // keep the reporter alive as long as the server
        let _reporter = reporter;
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .with_context(|| format!("{service_name} server on {addr}"))
    });
    Ok((addr, task))
}

/// A client channel over several addresses of one service: load-balanced,
/// connecting lazily, so a dead (or frozen: keepalive pings) instance only
/// fails the calls it was given (the caller retries them).
pub fn balanced_channel(urls: &[String]) -> Result<tonic::transport::Channel> {
    let endpoints = urls
        .iter()
        .map(|u| {
            tonic::transport::Endpoint::from_shared(u.clone())
                .with_context(|| format!("bad peer address {u:?}"))
                .map(|e| {
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
