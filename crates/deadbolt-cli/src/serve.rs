//! `deadbolt serve`: any subset of the five services in one process (the
//! stage services only in a binary built with the `torch` feature), until
//! SIGTERM or Ctrl-C drains it. The embedded `experiment` starts all five
//! here too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Result;
use deadbolt_gateway::Gateway;
use deadbolt_runtime::config::ServiceKind;
use deadbolt_runtime::{server, Config, Shared};
use tokio::task::JoinHandle;

/// Services running in this process; dropping it stops them at once.
pub struct Running {
    pub addrs: BTreeMap<ServiceKind, SocketAddr>,
    /// The stage workers (they end after a drain).
    workers: Vec<JoinHandle<()>>,
    /// Background tasks that end with the process (the claim loop).
    tasks: Vec<JoinHandle<()>>,
    servers: Vec<JoinHandle<Result<()>>>,
    gateway: Option<Gateway>,
    shared: Shared,
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() -> Result<&'static str> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => Ok("SIGTERM"),
        r = tokio::signal::ctrl_c() => r.map(|_| "ctrl-c").map_err(Into::into),
    }
}

impl Running {
    /// Serves until a server stops (an error) or SIGTERM/Ctrl-C, which
    /// drains the process ([`Running::drain`]).
    pub async fn wait(mut self) -> Result<()> {
        let servers = std::mem::take(&mut self.servers);
        let first_down = async move {
            if servers.is_empty() {
                return futures::future::pending().await;
            }
            let (r, _, _) = futures::future::select_all(servers.into_iter().map(|h| {
                Box::pin(async move { h.await.map_err(anyhow::Error::from).and_then(|r| r) })
            }))
            .await;
            r
        };
        tokio::select! {
            r = first_down => r,
            sig = shutdown_signal() => {
                tracing::info!(signal = sig?, "draining");
                self.drain().await;
                Ok(())
            }
        }
    }

    /// Graceful drain: stop leasing jobs and claiming runs; let each
    /// current job finish its epoch within `drain_secs` (then stop it),
    /// release its lease without counting the attempt so another worker
    /// takes it at once, clean its work folder; release the runs this
    /// gateway drives. Servers stop last.
    pub async fn drain(&mut self) {
        self.shared.drain.start();
        let limit = self.shared.config.drain() + std::time::Duration::from_secs(10);
        let workers = std::mem::take(&mut self.workers);
        if tokio::time::timeout(limit, futures::future::join_all(workers))
            .await
            .is_err()
        {
            tracing::warn!("workers did not wind down in time");
        }
        if let Some(g) = &self.gateway {
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            while g.driving() > 0 && Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        tracing::info!("drained");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in self.workers.iter().chain(&self.tasks) {
            t.abort();
        }
        for s in &self.servers {
            s.abort();
        }
    }
}

/// Starts the named services. Stage services start first; a gateway with
/// no configured peers for a stage calls the instance started here.
pub async fn start(shared: &Shared, kinds: &[ServiceKind]) -> Result<Running> {
    let mut run = Running {
        addrs: BTreeMap::new(),
        workers: Vec::new(),
        tasks: Vec::new(),
        servers: Vec::new(),
        gateway: None,
        shared: shared.clone(),
    };
    servable(kinds)?;
    shared.config.check_serving(kinds)?;
    let mut shared = shared.clone();
    #[cfg(feature = "torch")]
    start_stages(&mut run, &shared, kinds).await?;
    if kinds.contains(&ServiceKind::Gateway) {
        for (k, addr) in &run.addrs {
            if shared.config.peers.get(*k).is_none_or(|p| p.is_empty()) {
                let scheme = shared.config.scheme();
                shared
                    .config
                    .peers
                    .set(*k, vec![format!("{scheme}://{addr}")]);
            }
        }
        let tls = shared.config.server_tls(ServiceKind::Gateway)?;
        let listener = server::bind(&shared.config.listen_addr(ServiceKind::Gateway)).await?;
        let g = Gateway::new(shared.clone())?;
        // runs whose driver died (or that nobody drives yet) are claimed
        // now and every third of a lease
        let claimed = g.claim_orphans().await?;
        if claimed > 0 {
            tracing::info!(runs = claimed, "claimed unfinished runs");
        }
        run.tasks.push(tokio::spawn(g.clone().claim_loop()));
        run.gateway = Some(g.clone());
        let (addr, task) = server::spawn_with(
            "deadbolt.v1.ExperimentService",
            deadbolt_gateway::routes(g),
            listener,
            Some(shared.config.request_timeout()),
            server::Guard::Keys(deadbolt_runtime::auth::AuthLayer::new(
                shared.store.clone(),
                shared.config.auth,
                shared.config.key_cache(),
            )),
            tls,
        )
        .await?;
        run.servers.push(task);
        run.addrs.insert(ServiceKind::Gateway, addr);
    }
    Ok(run)
}

/// Starts the stage services among `kinds`: each one's gRPC server (it
/// answers only callers presenting the internal token) and its job worker.
#[cfg(feature = "torch")]
async fn start_stages(run: &mut Running, shared: &Shared, kinds: &[ServiceKind]) -> Result<()> {
    let internal = shared.config.internal_token.clone();
    deadbolt_stages::dataset_bundle::keep_written(
        kinds.contains(&ServiceKind::Poisoner)
            && kinds.iter().any(|k| {
                matches!(
                    k,
                    ServiceKind::Trainer | ServiceKind::Analyzer | ServiceKind::Pruner
                )
            }),
    );
    for &k in kinds.iter().filter(|k| **k != ServiceKind::Gateway) {
        let Some(token) = internal.as_deref() else {
            anyhow::bail!(
                "the {} service needs internal_token (DEADBOLT_INTERNAL_TOKEN): stage \
                 services answer only the gateway, which presents it",
                k.as_str()
            );
        };
        let listener = server::bind(&shared.config.listen_addr(k)).await?;
        let (routes, name, handlers) =
            deadbolt_stages::service(k, shared.clone()).expect("the gateway is started below");
        let guard = server::Guard::Internal(deadbolt_runtime::auth::InternalLayer {
            token: token.into(),
        });
        let tls = shared.config.server_tls(k)?;
        let (addr, task) = server::spawn_with(name, routes, listener, None, guard, tls).await?;
        run.servers.push(task);
        run.addrs.insert(k, addr);
        let worker = shared.worker(k.as_str(), handlers)?;
        run.workers.push(tokio::spawn(worker.run()));
    }
    Ok(())
}

/// Whether this binary can serve every one of `kinds`: built without the
/// `torch` feature, it has the gateway only.
#[cfg(feature = "torch")]
fn servable(_kinds: &[ServiceKind]) -> Result<()> {
    Ok(())
}

#[cfg(not(feature = "torch"))]
fn servable(kinds: &[ServiceKind]) -> Result<()> {
    match kinds.iter().find(|k| **k != ServiceKind::Gateway) {
        Some(k) => Err(crate::needs_torch(&format!("the {} service", k.as_str()))),
        None => Ok(()),
    }
}

/// `deadbolt serve`.
pub async fn serve(config: Config, kinds: Vec<ServiceKind>) -> Result<()> {
    // before any connection: a service this binary lacks is named at once
    servable(&kinds)?;
    if config.metrics_listen.is_some() {
        // before the workers start, so that nothing they record is lost
        deadbolt_runtime::metrics::install()?;
    }
    let shared = Shared::connect(config).await?;
    let mut running = start(&shared, &kinds).await?;
    if let Some(listen) = shared.config.metrics_listen.clone() {
        let (addr, task) = deadbolt_runtime::metrics::serve(&listen).await?;
        running.tasks.push(task);
        running
            .tasks
            .push(deadbolt_runtime::metrics::spawn_queue_gauges(
                shared.store.clone(),
                std::time::Duration::from_secs(2),
            ));
        println!("metrics listening on {addr}");
    }
    for (k, a) in &running.addrs {
        // one line per service, for scripts and tests to find the ports
        println!("{} listening on {a}", k.as_str());
    }
    running.wait().await
}
