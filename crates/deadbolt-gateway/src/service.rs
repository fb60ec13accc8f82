//! `ExperimentService`: the thin tonic adapter over the metadata store plus
//! the run drivers.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::experiment_service_server::{ExperimentService, ExperimentServiceServer};
use deadbolt_proto::validate::invalid_argument;
use deadbolt_runtime::uploads::{self, UploadKind};
use deadbolt_runtime::{auth, convert, policy, stage, Shared};
use deadbolt_spec::RunSpec;
use deadbolt_store::NewRun;
use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::driver::{Clients, Driver};
use crate::error::GatewayError;

/// The gateway: the service plus its run drivers. Who drives a run is a
/// lease in the metadata store (`claim_run`/`claim_runs`, renewed while
/// driving): any gateway replica drives any run, exactly one at a time,
/// and another takes a run over once its driver's lease expired. `driving`
/// only remembers which of this process's tasks are alive.
#[derive(Clone)]
pub struct Gateway {
    pub shared: Shared,
    pub clients: Clients,
    /// This replica's driver id (`gateway-<pid>-<random>`).
    pub driver_id: String,
    driving: Arc<Mutex<HashSet<Uuid>>>,
    /// Run feeds shared by this process's watchers.
    feeds: crate::watch::Feeds,
    /// The teams' uploads in flight here, against their quotas.
    quotas: crate::transfer::Quotas,
}

pub fn routes(g: Gateway) -> tonic::service::Routes {
    tonic::service::Routes::new(
        ExperimentServiceServer::new(g)
            .max_decoding_message_size(deadbolt_runtime::server::MAX_REQUEST_BYTES)
            .max_encoding_message_size(deadbolt_runtime::server::MAX_RESPONSE_BYTES),
    )
}

impl Gateway {
    /// Must be called inside a tokio runtime (the stage channels spawn).
    pub fn new(shared: Shared) -> anyhow::Result<Gateway> {
        let clients = Clients::from_config(&shared.config)?;
        let warm = clients.clone();
        tokio::spawn(async move { warm.warm().await });
        Ok(Gateway {
            clients,
            driver_id: deadbolt_runtime::worker::worker_id("gateway"),
            driving: Arc::default(),
            feeds: crate::watch::Feeds::new(
                shared.store.clone(),
                deadbolt_runtime::stage::fallback(shared.config.poll()),
            ),
            quotas: Default::default(),
            shared,
        })
    }

    /// Starts a driver task for a run whose drive this replica holds
    /// (`token`), unless one is already running here.
    fn spawn_driver(&self, run_id: Uuid, token: Uuid) {
        if !self.driving.lock().expect("lock").insert(run_id) {
            return;
        }
        let d = Driver {
            shared: self.shared.clone(),
            clients: self.clients.clone(),
            run_id,
            driver_id: self.driver_id.clone(),
            token,
        };
        let driving = self.driving.clone();
        tokio::spawn(async move {
            d.run().await;
            driving.lock().expect("lock").remove(&run_id);
        });
    }

    /// Takes the drive of one run if nobody holds it, and drives it.
    pub async fn claim(&self, run_id: Uuid) -> Result<bool, deadbolt_store::StoreError> {
        let lease = self.shared.config.lease();
        match self
            .shared
            .store
            .claim_run(run_id, &self.driver_id, lease)
            .await?
        {
            Some(token) => {
                self.spawn_driver(run_id, token);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Claims runs that no live driver holds (new ones, and those of a
    /// replica that died: their lease expired) and drives them; returns
    /// how many it claimed.
    pub async fn claim_orphans(&self) -> Result<usize, deadbolt_store::StoreError> {
        let lease = self.shared.config.lease();
        let claimed = self
            .shared
            .store
            .claim_runs(&self.driver_id, lease, 16)
            .await?;
        for (run, token) in &claimed {
            tracing::info!(run_id = %run.id, status = %run.status, driver = %self.driver_id, "claimed the drive of a run");
            self.spawn_driver(run.id, *token);
        }
        Ok(claimed.len())
    }

    /// Claims orphaned runs every third of a lease until the process
    /// drains. Run in the background by `deadbolt serve`.
    pub async fn claim_loop(self) {
        let every = (self.shared.config.lease() / 3).max(self.shared.config.poll());
        let drain = self.shared.drain.clone();
        while !drain.is_draining() {
            if let Err(e) = self.claim_orphans().await {
                tracing::warn!(error = %e, "claiming runs failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = drain.wait() => {}
            }
        }
    }

    /// Runs this replica is driving now.
    pub fn driving(&self) -> usize {
        self.driving.lock().expect("lock").len()
    }

    /// The run, if it is `team`'s: another team's run is NOT_FOUND, with
    /// the same answer as a run that does not exist.
    async fn team_run(&self, team: &str, id: Uuid) -> Result<deadbolt_store::Run, Status> {
        match self.shared.store.get_run(id).await {
            Ok(r) if r.team == team => Ok(r),
            Ok(_) => Err(Status::from(deadbolt_store::StoreError::not_found(
                "run", id,
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Records a run of `team` (idempotent per client request id, within
    /// the team's quota of runs in flight) and starts driving it. Returns
    /// the run id and whether it was created.
    async fn start_run(
        &self,
        team: &str,
        crid: &str,
        spec: RunSpec,
    ) -> Result<(String, bool), Status> {
        let config = &self.shared.config;
        let team = team.to_string();
        // the quota and the insert are one transaction: exact under
        // concurrent submits; a retry of a known request id answers its run
        let (run, created) = self
            .shared
            .store
            .create_run_within(
                NewRun {
                    team: team.clone(),
                    client_request_id: (!crid.is_empty()).then(|| crid.to_string()),
                    name: spec.name().to_string(),
                    spec_json: spec.to_stored(),
                },
                config.limits.max_runs_in_flight,
            )
            .await?;
        if created {
            tracing::info!(run_id = %run.id, name = %run.name, "run submitted");
            let _ = self
                .shared
                .store
                .append_event(None, run.id, "run", "submitted", &run.name, None)
                .await;
        }
        if !run.status.is_terminal() && !self.shared.drain.is_draining() {
            // a replica that holds the drive already goes on; otherwise
            // this one takes it now (the claim loop would, a moment later)
            self.claim(run.id).await?;
        }
        Ok((run.id.to_string(), created))
    }

    async fn run_proto(&self, team: &str, id: Uuid) -> Result<pb::Run, Status> {
        let s = &self.shared.store;
        let run = self.team_run(team, id).await?;
        let summary = s.run_summary(id).await.ok();
        let choices = s.list_pruning_choices(id).await?;
        let artifacts = s.list_artifacts(id).await?;
        let jobs = s.list_jobs(id).await?;
        Ok(convert::run_to_proto(
            &run,
            summary.as_ref(),
            &choices,
            &artifacts,
            &jobs,
        ))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RunEvent, Status>> + Send>>;

impl Gateway {
    /// Reads the upload's header (the first message) and names its object.
    fn upload_target(
        team: &str,
        h: &pb::UploadHeader,
        max: u64,
    ) -> Result<(String, String), Status> {
        let kind = match pb::UploadKind::try_from(h.kind) {
            Ok(pb::UploadKind::Dataset) => UploadKind::Dataset,
            Ok(pb::UploadKind::TriggerImage) => UploadKind::TriggerImage,
            Ok(pb::UploadKind::Model) => UploadKind::Model,
            _ => {
                return Err(invalid_argument(
                    "header.kind",
                    "UPLOAD_KIND_DATASET, UPLOAD_KIND_TRIGGER_IMAGE or UPLOAD_KIND_MODEL",
                ))
            }
        };
        uploads::check_name(&h.name).map_err(|m| invalid_argument("header.name", m))?;
        let key = match kind {
            UploadKind::Dataset | UploadKind::Model => {
                let check = match kind {
                    UploadKind::Dataset => uploads::check_file,
                    _ => uploads::check_name,
                };
                check(&h.file).map_err(|m| invalid_argument("header.file", m))?;
                format!("{}/{}", uploads::key(team, kind, &h.name), h.file)
            }
            UploadKind::TriggerImage => uploads::key(team, kind, &h.name),
        };
        let sha = h.sha256.trim().to_ascii_lowercase();
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid_argument(
                "header.sha256",
                "the file's sha256 as 64 hex digits",
            ));
        }
        if h.size == 0 {
            return Err(invalid_argument("header.size", "an empty file"));
        }
        if h.size > max {
            return Err(invalid_argument(
                "header.size",
                format!(
                    "{} bytes is above this service's upload limit of {max}",
                    h.size
                ),
            ));
        }
        Ok((key, sha))
    }
}

fn upload_error(e: deadbolt_store::StoreError) -> Status {
    match e {
        deadbolt_store::StoreError::Invalid { field, message } => {
            invalid_argument(format!("header.{field}"), message)
        }
        other => other.into(),
    }
}

#[tonic::async_trait]
impl ExperimentService for Gateway {
    async fn upload(
        &self,
        req: Request<tonic::Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        let team = auth::principal(&req)?.team.clone();
        let config = &self.shared.config;
        let max = config.limits.max_upload_bytes;
        // exempt from the fixed request timeout (server::OWN_DEADLINE):
        // the header within it, the bytes within a deadline that grows
        // with their declared size
        let t0 = tokio::time::Instant::now();
        let base = config.request_timeout();
        let mut stream = req.into_inner();
        let first = tokio::time::timeout(base, stream.message())
            .await
            .map_err(|_| Status::from(GatewayError::UploadHeaderLate(base)))??
            .ok_or_else(|| {
                invalid_argument(
                    "header",
                    "an upload starts with a message carrying its header",
                )
            })?;
        let h = first.header.clone().ok_or_else(|| {
            invalid_argument(
                "header",
                "the first message of an upload carries its header",
            )
        })?;
        let (key, sha) = Self::upload_target(&team, &h, max)?;
        let kind = crate::transfer::kind_of("header.kind", h.kind)?;
        // dropped (a failure, a client gone) it charges nothing
        let reservation = self
            .quotas
            .reserve(
                &self.shared.artifacts,
                &config.limits,
                &team,
                kind,
                &h.name,
                &h.file,
                h.size,
            )
            .await?;
        let limit = crate::transfer::upload_deadline(base, h.size);
        let mut w = self.shared.artifacts.start_upload(&key).await?;
        let got = tokio::time::timeout_at(
            t0 + limit,
            crate::transfer::receive(&mut w, first.data, &mut stream, h.size),
        )
        .await;
        match got {
            Ok(Ok(())) => {}
            Ok(Err(s)) => {
                w.abort().await;
                return Err(s);
            }
            Err(_) => {
                let got = w.size();
                w.abort().await;
                tracing::info!(team = %team, name = %h.name, size = h.size, received = got, "upload past its deadline");
                return Err(GatewayError::UploadLate {
                    got,
                    size: h.size,
                    limit,
                }
                .into());
            }
        }
        let r = w.finish(h.size, &sha).await.map_err(upload_error)?;
        reservation.settle().await;
        tracing::info!(team = %team, name = %h.name, file = %h.file, size = r.size, "upload received");
        Ok(Response::new(pb::UploadResponse {
            reference: format!("{}{}", uploads::UPLOAD_SCHEME, h.name),
            sha256: r.sha256,
            size: r.size,
        }))
    }

    async fn submit_experiment(
        &self,
        req: Request<pb::SubmitExperimentRequest>,
    ) -> Result<Response<pb::SubmitExperimentResponse>, Status> {
        let team = auth::principal(&req)?.team.clone();
        let req = req.into_inner();
        let config = &self.shared.config;
        let crid = req.client_request_id.trim();
        if crid.len() > config.limits.max_name_len {
            return Err(deadbolt_proto::validate::invalid_argument(
                "client_request_id",
                format!(
                    "{} bytes is above this service's limit of {}",
                    crid.len(),
                    config.limits.max_name_len
                ),
            ));
        }
        let mut spec = convert::spec_from_submit(req.spec.as_ref())?;
        policy::check_limits(&spec, &config.limits)?;
        if !config.allow_local_paths {
            let used = policy::resolve_remote_paths(
                &mut spec,
                &config.datasets,
                config.data_root.as_deref(),
                &team,
            )?;
            // another team's upload answers like a missing one
            let mut missing = deadbolt_proto::validate::Violations::new();
            for u in used {
                if !uploads::exists(&self.shared.artifacts, &team, u.kind, &u.name).await? {
                    missing.add(
                        u.field,
                        format!("upload:{}: this team has no such upload", u.name),
                    );
                }
            }
            missing.check()?;
        }
        let (run_id, created) = self
            .start_run(&team, crid, RunSpec::Experiment(spec))
            .await?;
        Ok(Response::new(pb::SubmitExperimentResponse {
            run_id,
            created,
        }))
    }

    async fn submit_scan(
        &self,
        req: Request<pb::SubmitScanRequest>,
    ) -> Result<Response<pb::SubmitExperimentResponse>, Status> {
        let team = auth::principal(&req)?.team.clone();
        let req = req.into_inner();
        let config = &self.shared.config;
        let crid = req.client_request_id.trim();
        let mut v = deadbolt_proto::validate::Violations::new();
        for (field, text) in [("client_request_id", crid), ("name", req.name.trim())] {
            if text.len() > config.limits.max_name_len {
                v.add(
                    field,
                    format!(
                        "{} bytes is above this service's limit of {}",
                        text.len(),
                        config.limits.max_name_len
                    ),
                );
            }
        }
        v.check()?;
        let spec = deadbolt_runtime::scan::scan_spec(
            &team,
            &req.name,
            &req.model,
            &req.data,
            req.repair,
            &req.options_toml,
            &config.limits,
        )
        .map_err(|(field, message)| invalid_argument(field, message))?;
        // another team's upload answers like a missing one
        let mut v = deadbolt_proto::validate::Violations::new();
        for (field, kind, name) in [
            ("model", UploadKind::Model, &spec.model),
            ("data", UploadKind::Dataset, &spec.data),
        ] {
            if !uploads::exists(&self.shared.artifacts, &team, kind, name).await? {
                v.add(
                    field,
                    format!("upload:{name}: this team has no such upload"),
                );
            }
        }
        v.check()?;
        let (run_id, created) = self.start_run(&team, crid, RunSpec::Scan(spec)).await?;
        Ok(Response::new(pb::SubmitExperimentResponse {
            run_id,
            created,
        }))
    }

    async fn get_experiment(
        &self,
        req: Request<pb::GetExperimentRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let team = auth::principal(&req)?.team.clone();
        let id = stage::parse_run_id("run_id", &req.get_ref().run_id)?;
        Ok(Response::new(self.run_proto(&team, id).await?))
    }

    async fn list_experiments(
        &self,
        req: Request<pb::ListExperimentsRequest>,
    ) -> Result<Response<pb::ListExperimentsResponse>, Status> {
        let team = auth::principal(&req)?.team.clone();
        let req = req.into_inner();
        let size = match req.page_size {
            0 => 50,
            n => n.min(500),
        } as i64;
        let offset: i64 = if req.page_token.is_empty() {
            0
        } else {
            req.page_token.parse().map_err(|_| {
                deadbolt_proto::validate::invalid_argument(
                    "page_token",
                    "not a token from a previous response",
                )
            })?
        };
        // one page in a constant number of queries
        let pages = self
            .shared
            .store
            .list_run_pages(Some(&team), size, offset)
            .await?;
        let next = if pages.len() as i64 == size {
            (offset + size).to_string()
        } else {
            String::new()
        };
        let out: Vec<pb::Run> = pages
            .iter()
            .map(|p| {
                convert::run_to_proto(
                    &p.run,
                    p.summary.as_ref(),
                    &p.choices,
                    &p.artifacts,
                    &p.jobs,
                )
            })
            .collect();
        Ok(Response::new(pb::ListExperimentsResponse {
            runs: out,
            next_page_token: next,
        }))
    }

    type WatchExperimentStream = EventStream;

    async fn watch_experiment(
        &self,
        req: Request<pb::WatchExperimentRequest>,
    ) -> Result<Response<Self::WatchExperimentStream>, Status> {
        let team = auth::principal(&req)?.team.clone();
        let req = req.into_inner();
        let id = stage::parse_run_id("run_id", &req.run_id)?;
        let run = self.team_run(&team, id).await?;
        let feeds = self.feeds.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(128);
        tokio::spawn(async move {
            let mut after = req.after_seq;
            let mut feed = feeds.subscribe(id, run.status);
            loop {
                let snap = feed.borrow_and_update().clone();
                if let Some(e) = snap.error {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                let from = after;
                if !snap.read {
                    // the feed has not read the run yet: wait for it
                    tokio::select! {
                        r = feed.changed() => {
                            if r.is_err() {
                                feed = feeds.subscribe(id, snap.status);
                            }
                        }
                        _ = tx.closed() => return,
                    }
                    continue;
                }
                for e in snap.events.iter().filter(|e| e.seq > from) {
                    after = e.seq;
                    if tx
                        .send(Ok(convert::event_to_proto(e, snap.status)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                if snap.status.is_terminal() {
                    return;
                }
                tokio::select! {
                    r = feed.changed() => {
                        if r.is_err() {
                            // the feed ended before the run did (its other
                            // watchers left): follow a new one
                            feed = feeds.subscribe(id, snap.status);
                        }
                    }
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_experiment(
        &self,
        req: Request<pb::CancelExperimentRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let team = auth::principal(&req)?.team.clone();
        let id = stage::parse_run_id("run_id", &req.get_ref().run_id)?;
        self.team_run(&team, id).await?;
        self.shared.store.cancel_run(id).await?;
        let _ = self
            .shared
            .store
            .append_event(None, id, "run", "cancelled", "cancelled by request", None)
            .await;
        Ok(Response::new(self.run_proto(&team, id).await?))
    }

    type DownloadStream = crate::transfer::DownloadStream;

    async fn download(
        &self,
        req: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let team = auth::principal(&req)?.team.clone();
        let req = req.into_inner();
        let id = stage::parse_run_id("run_id", &req.run_id)?;
        // another team's run: NOT_FOUND, as a missing one
        self.team_run(&team, id).await?;
        let records = self.shared.store.list_artifacts(id).await?;
        let records = crate::transfer::select(records, req.target.as_ref())?;
        tracing::info!(team = %team, run_id = %id, artifacts = records.len(), "download");
        Ok(Response::new(crate::transfer::download(
            self.shared.artifacts.clone(),
            records,
        )))
    }

    async fn list_uploads(
        &self,
        req: Request<pb::ListUploadsRequest>,
    ) -> Result<Response<pb::ListUploadsResponse>, Status> {
        let team = auth::principal(&req)?.team.clone();
        Ok(Response::new(
            crate::transfer::list_uploads(
                &self.shared.artifacts,
                &self.shared.config.limits,
                &team,
            )
            .await?,
        ))
    }

    async fn delete_upload(
        &self,
        req: Request<pb::DeleteUploadRequest>,
    ) -> Result<Response<pb::DeleteUploadResponse>, Status> {
        let team = auth::principal(&req)?.team.clone();
        Ok(Response::new(
            crate::transfer::delete_upload(&self.shared.artifacts, &team, req.get_ref()).await?,
        ))
    }
}
