//! Prometheus metrics of a service process: the `metrics` facade with the
//! Prometheus recorder (`metrics-exporter-prometheus`), served as text at
//! `http://<metrics_listen>/metrics` (axum). The metric names are listed
//! once here ([`names`]); deploy/prometheus and deploy/grafana use them.
//!
//! - gRPC: [`GrpcMetricsLayer`] counts requests and times them by method and
//!   status code, on every server of the process; the method label is a
//!   known method's path or `unknown` ([`method_label`]), so requests,
//!   authenticated or not, cannot add label sets;
//! - jobs: the worker counts leased / succeeded / failed / retried /
//!   lease-lost / released jobs by stage and sets `worker_up`;
//! - queue: [`spawn_queue_gauges`] reads the queue depth and the oldest
//!   queued job's age per stage, and the database pool, every few seconds;
//! - the stages record training throughput and epoch time, and sweep time;
//!   the artifact store counts bytes and checksum failures.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Every metric name, in one place.
pub mod names {
    pub const GRPC_REQUESTS: &str = "deadbolt_grpc_requests_total";
    pub const GRPC_DURATION: &str = "deadbolt_grpc_request_duration_seconds";
    pub const JOBS_LEASED: &str = "deadbolt_jobs_leased_total";
    pub const JOBS_SUCCEEDED: &str = "deadbolt_jobs_succeeded_total";
    pub const JOBS_FAILED: &str = "deadbolt_jobs_failed_total";
    pub const JOBS_RETRIED: &str = "deadbolt_jobs_retried_total";
    pub const JOBS_LEASE_LOST: &str = "deadbolt_jobs_lease_lost_total";
    pub const JOBS_RELEASED: &str = "deadbolt_jobs_released_total";
    pub const QUEUE_DEPTH: &str = "deadbolt_queue_depth";
    pub const QUEUE_OLDEST: &str = "deadbolt_queue_oldest_seconds";
    pub const WORKER_UP: &str = "deadbolt_worker_up";
    pub const TRAIN_IMAGES_PER_SECOND: &str = "deadbolt_train_images_per_second";
    pub const TRAIN_EPOCH_SECONDS: &str = "deadbolt_train_epoch_seconds";
    pub const PRUNE_SWEEP_SECONDS: &str = "deadbolt_prune_sweep_seconds";
    pub const ARTIFACT_BYTES: &str = "deadbolt_artifact_bytes_total";
    pub const ARTIFACT_CHECKSUM_FAILURES: &str = "deadbolt_artifact_checksum_failures_total";
    pub const DB_POOL_CONNECTIONS: &str = "deadbolt_db_pool_connections";
}

fn handle() -> &'static OnceLock<PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    &HANDLE
}

/// Installs the process's Prometheus recorder (once; later calls reuse it).
pub fn install() -> Result<PrometheusHandle> {
    if let Some(h) = handle().get() {
        return Ok(h.clone());
    }
    let seconds = [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
    ];
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .context("histogram buckets")?
        .build_recorder();
    let h = recorder.handle();
    // another thread may have won the race: keep the first
    if metrics::set_global_recorder(recorder).is_err() {
        return handle()
            .get()
            .cloned()
            .context("a metrics recorder of another kind is installed");
    }
    let _ = handle().set(h.clone());
    describe();
    Ok(h)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    use names::*;
    describe_counter!(
        GRPC_REQUESTS,
        "gRPC requests served, by method and status code"
    );
    describe_histogram!(GRPC_DURATION, Unit::Seconds, "gRPC request latency");
    describe_counter!(JOBS_LEASED, "stage jobs leased by this process");
    describe_counter!(JOBS_SUCCEEDED, "stage jobs that succeeded");
    describe_counter!(JOBS_FAILED, "stage jobs that failed for good");
    describe_counter!(
        JOBS_RETRIED,
        "stage job attempts that failed transiently (requeued)"
    );
    describe_counter!(JOBS_LEASE_LOST, "stage job attempts whose lease was lost");
    describe_counter!(JOBS_RELEASED, "stage jobs released by a draining worker");
    describe_gauge!(QUEUE_DEPTH, "runnable queued jobs, by stage");
    describe_gauge!(
        QUEUE_OLDEST,
        Unit::Seconds,
        "age of the oldest runnable queued job"
    );
    describe_gauge!(WORKER_UP, "1 per running stage worker");
    describe_gauge!(
        TRAIN_IMAGES_PER_SECOND,
        "training throughput of the last epoch"
    );
    describe_histogram!(TRAIN_EPOCH_SECONDS, Unit::Seconds, "training epoch time");
    describe_histogram!(
        PRUNE_SWEEP_SECONDS,
        Unit::Seconds,
        "prune stage time (all criteria)"
    );
    describe_counter!(
        ARTIFACT_BYTES,
        Unit::Bytes,
        "artifact bytes written (out) and read (in)"
    );
    describe_counter!(
        ARTIFACT_CHECKSUM_FAILURES,
        "artifacts whose bytes did not match their sha256"
    );
    describe_gauge!(
        DB_POOL_CONNECTIONS,
        "metadata store pool connections, by state"
    );
}

/// Serves `/metrics` on `addr` (port 0: an ephemeral port); returns the
/// bound address and the server task.
pub async fn serve(addr: &str) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let h = install()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener {addr}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let h = h.clone();
            async move {
                h.run_upkeep();
                ([("content-type", "text/plain; version=0.0.4")], h.render())
            }
        }),
    );
    tracing::info!(addr = %bound, "metrics listening");
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok((bound, task))
}

/// Sets the queue and pool gauges from the store every `every`.
pub fn spawn_queue_gauges(
    store: std::sync::Arc<dyn deadbolt_store::MetadataStore>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match store.queue_stats().await {
                Ok(stats) => {
                    // every stage, so an emptied queue reads 0, not its
                    // last depth
                    for k in crate::stage::StageKind::ALL {
                        let s = stats.iter().find(|s| s.stage == k.as_str());
                        metrics::gauge!(names::QUEUE_DEPTH, "stage" => k.as_str())
                            .set(s.map(|s| s.queued as f64).unwrap_or(0.0));
                        metrics::gauge!(names::QUEUE_OLDEST, "stage" => k.as_str())
                            .set(s.map(|s| s.oldest_seconds).unwrap_or(0.0));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading queue stats failed"),
            }
            let (size, idle) = store.pool_stats();
            metrics::gauge!(names::DB_POOL_CONNECTIONS, "state" => "idle").set(idle as f64);
            metrics::gauge!(names::DB_POOL_CONNECTIONS, "state" => "used")
                .set(size.saturating_sub(idle) as f64);
            tokio::time::sleep(every).await;
        }
    })
}

/// Methods every deadbolt server answers besides the deadbolt services':
/// health and reflection (v1 and v1alpha).
const STANDARD_METHODS: [&str; 5] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.health.v1.Health/List",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The `method` label of every path that is no known method.
pub const UNKNOWN_METHOD: &str = "unknown";

fn known_methods() -> &'static std::collections::HashSet<String> {
    static KNOWN: OnceLock<std::collections::HashSet<String>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        deadbolt_proto::method_paths()
            .into_iter()
            .chain(STANDARD_METHODS.map(String::from))
            .collect()
    })
}

/// The `method` label of a request path: the path of a known gRPC method
/// (the deadbolt services', health, reflection), else [`UNKNOWN_METHOD`].
/// It is a `'static` str from a fixed set: whatever paths clients send
/// (before authentication too), the label sets and the memory behind them
/// stay bounded, and labelling allocates nothing.
pub fn method_label(path: &str) -> &'static str {
    known_methods()
        .get(path)
        .map(String::as_str)
        .unwrap_or(UNKNOWN_METHOD)
}

/// A tower layer counting and timing every gRPC request of a server by
/// method ([`method_label`]) and status code (`grpc-status` of a
/// trailers-only response, the way tonic answers an error; OK otherwise).
#[derive(Clone, Copy, Debug)]
pub struct GrpcMetricsLayer {
    pub service: &'static str,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            service: self.service,
        }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
    service: &'static str,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_label(req.uri().path());
        let service = self.service;
        let t0 = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            let code = match &r {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(tonic::Code::from_i32)
                    .unwrap_or(tonic::Code::Ok),
                Err(_) => tonic::Code::Unavailable,
            };
            let code = deadbolt_proto::error::code_name(code);
            metrics::counter!(names::GRPC_REQUESTS, "service" => service, "method" => method, "code" => code)
                .increment(1);
            metrics::histogram!(names::GRPC_DURATION, "service" => service, "method" => method)
                .record(t0.elapsed().as_secs_f64());
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service};

    /// Serves `paths` through the layer into a recorder of its own and
    /// renders what it recorded.
    fn recorded(paths: impl Iterator<Item = String>) -> String {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let mut svc = GrpcMetricsLayer { service: "test" }.layer(tower::service_fn(
            |_req: http::Request<()>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(()))
            },
        ));
        metrics::with_local_recorder(&recorder, || {
            for p in paths {
                let req = http::Request::builder().uri(p).body(()).unwrap();
                futures::executor::block_on(svc.call(req)).unwrap();
            }
        });
        handle.render()
    }

    fn series(text: &str, name: &str) -> usize {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .count()
    }

    #[test]
    fn random_paths_share_one_label_set() {
        // 10,000 random paths (a seeded xorshift), as an unauthenticated
        // client may send them, and one known method
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let random = (0..10_000).map(|_| format!("/p{:x}.S{:x}/M{:x}", next(), next(), next()));
        let known = "/deadbolt.v1.ExperimentService/SubmitExperiment".to_string();
        let text = recorded(random.chain(std::iter::once(known.clone())));
        assert_eq!(series(&text, names::GRPC_REQUESTS), 2, "{text}");
        assert!(
            text.contains(&format!("method=\"{UNKNOWN_METHOD}\"")),
            "{text}"
        );
        assert!(text.contains(&format!("method=\"{known}\"")), "{text}");
        assert!(text.contains("} 10000"), "{text}");
        // the histogram too: one count line per label set
        assert_eq!(
            series(&text, &format!("{}_count", names::GRPC_DURATION)),
            2,
            "{text}"
        );
        // and the page stays small (10,000 label sets would be ~1 MB)
        assert!(text.len() < 8_000, "{} bytes", text.len());
    }

    #[test]
    fn known_methods_keep_their_path() {
        for p in deadbolt_proto::method_paths()
            .iter()
            .map(String::as_str)
            .chain(STANDARD_METHODS)
        {
            assert_eq!(method_label(p), p);
        }
        for p in ["/", "", "/deadbolt.v1.ExperimentService/Nope", "/metrics"] {
            assert_eq!(method_label(p), UNKNOWN_METHOD);
        }
    }
}
