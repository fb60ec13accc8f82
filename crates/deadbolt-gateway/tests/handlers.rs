//! The gateway's handlers (`ExperimentService`) through their public
//! surface: a [`Gateway`] served in-process on loopback over the real
//! SQLite metadata store and the filesystem artifact store, called with the
//! generated client. Each test has a gateway of its own (milliseconds).
//!
//! The caller's principal reaches the handlers as `deadbolt serve`'s auth
//! layer hands it over: in the request's extensions. Here an interceptor
//! puts it there from an `x-test-team` header (the keys themselves are
//! `services_auth`'s). The stage services are not running: the gateway's
//! peers point at a closed port, so a run it drives stays in flight (its
//! stage calls are retried), which is all these tests need of it.

use std::path::PathBuf;
use std::time::Duration;

use deadbolt_gateway::Gateway;
use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::experiment_service_client::ExperimentServiceClient;
use deadbolt_proto::v1::experiment_service_server::ExperimentServiceServer;
use deadbolt_proto::validate::field_violations;
use deadbolt_store::{Principal, Scope};
use futures::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const TEAM_HEADER: &str = "x-test-team";

/// The teams the tests call as.
const TEAMS: [&str; 2] = ["team-a", "team-b"];

/// The tiny experiment as a remote client writes it (the dataset by name).
const SPEC: &str = r#"
name = "tiny"
seed = 7

[dataset]
kind = "mnist"
path = "mnist"
validation_fraction = 0.2
train_limit = 1200
test_limit = 300

[model]
arch = "badnet-cnn"

[attack]
target = 0
rate = 0.1
seed = 1

[attack.trigger]
kind = "patch"
size = 3

[training]
lr = 0.05
schedule = "constant"
epochs = 1
batch_size = 64
device = "cpu"

[defense]
criteria = ["linf", "l1", "fine-pruning"]
stats_images = 120

[defense.synthetic]
steps = 10
images = 32
"#;

/// A gateway served on loopback; its store and folders live as long as it.
struct Served {
    dir: tempfile::TempDir,
    url: String,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Served {
    /// A gateway whose config adds `limits` (the body of a `[limits]`
    /// table).
    async fn start(limits: &str) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("mnist")).unwrap();
        // port 9 (discard) is closed on loopback: stage calls fail at once
        let peers = ["poisoner", "trainer", "analyzer", "pruner"]
            .map(|s| format!("{s} = [\"http://127.0.0.1:9\"]"))
            .join("\n");
        let config = format!(
            "database_url = \"sqlite://{db}\"\nartifact_url = \"{art}\"\nwork_dir = \"{work}\"\n\
             lease_secs = 3.0\nheartbeat_secs = 0.5\npoll_ms = 100\nauth = \"none\"\n\
             [limits]\n{limits}\n[peers]\n{peers}\n[datasets.mnist]\nroot = \"{mnist}\"\n",
            db = d.join("meta.db").display(),
            art = d.join("artifacts").display(),
            work = d.join("work").display(),
            mnist = d.join("mnist").display(),
        );
        let config = deadbolt_runtime::Config::from_toml_str(&config).unwrap();
        let shared = deadbolt_runtime::Shared::connect(config).await.unwrap();
        // runs belong to a team the store knows
        for team in TEAMS {
            shared.store.create_team(team).await.unwrap();
        }
        let gateway = Gateway::new(shared).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let service = ExperimentServiceServer::with_interceptor(gateway, as_team);
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        Served { dir, url, server }
    }

    async fn client(&self) -> ExperimentServiceClient<Channel> {
        ExperimentServiceClient::connect(self.url.clone())
            .await
            .unwrap()
    }

    /// Where the filesystem artifact store keeps `team`'s dataset `name`.
    fn dataset_dir(&self, team: &str, name: &str) -> PathBuf {
        self.dir
            .path()
            .join("artifacts/teams")
            .join(team)
            .join("datasets")
            .join(name)
    }
}

/// The server side: the principal of the team named in [`TEAM_HEADER`],
/// with every scope, as the auth layer would hand it over.
fn as_team(mut req: Request<()>) -> Result<Request<()>, Status> {
    let team = req
        .metadata()
        .get(TEAM_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Status::unauthenticated("no test team"))?
        .to_string();
    req.extensions_mut().insert(Principal {
        team,
        key_id: uuid::Uuid::nil(),
        key_name: "test".into(),
        scopes: Scope::ALL.to_vec(),
    });
    Ok(req)
}

/// A request of `team`.
fn of<T>(team: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert(TEAM_HEADER, team.parse().expect("an ascii team name"));
    r
}

fn toml_submit(crid: &str, spec: &str) -> pb::SubmitExperimentRequest {
    pb::SubmitExperimentRequest {
        client_request_id: crid.into(),
        spec: Some(pb::submit_experiment_request::Spec::SpecToml(spec.into())),
    }
}

/// Submits the tiny spec as `team`; the run id.
async fn submit(c: &mut ExperimentServiceClient<Channel>, team: &str, crid: &str) -> String {
    c.submit_experiment(of(team, toml_submit(crid, SPEC)))
        .await
        .unwrap()
        .into_inner()
        .run_id
}

/// The fields of an INVALID_ARGUMENT's violations.
fn fields(s: &Status) -> Vec<String> {
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    field_violations(s).into_iter().map(|f| f.0).collect()
}

/// An upload of `body` as `team`'s dataset `name`, file `file`.
async fn upload(
    c: &mut ExperimentServiceClient<Channel>,
    team: &str,
    name: &str,
    file: &str,
    body: &[u8],
) -> Result<pb::UploadResponse, Status> {
    let h = deadbolt_test_support::upload::header(pb::UploadKind::Dataset, name, file, body);
    upload_messages(
        c,
        team,
        deadbolt_test_support::upload::messages(h, body, 1000),
    )
    .await
}

async fn upload_messages(
    c: &mut ExperimentServiceClient<Channel>,
    team: &str,
    msgs: Vec<pb::UploadChunk>,
) -> Result<pb::UploadResponse, Status> {
    c.upload(of(team, futures::stream::iter(msgs)))
        .await
        .map(|r| r.into_inner())
}

async fn usage(c: &mut ExperimentServiceClient<Channel>, team: &str) -> pb::ListUploadsResponse {
    c.list_uploads(of(team, pb::ListUploadsRequest {}))
        .await
        .unwrap()
        .into_inner()
}

// ---- submit ----

#[tokio::test]
async fn submit_records_a_run_of_the_callers_team_once_per_request_id() {
    let g = Served::start("").await;
    let mut c = g.client().await;
    let first = c
        .submit_experiment(of("team-a", toml_submit("once", SPEC)))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    let again = c
        .submit_experiment(of("team-a", toml_submit("once", SPEC)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.run_id, first.run_id,
        "a retried submit made a new run"
    );
    assert!(!again.created);
    let run = c
        .get_experiment(of(
            "team-a",
            pb::GetExperimentRequest {
                run_id: first.run_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (run.id.as_str(), run.name.as_str()),
        (first.run_id.as_str(), "tiny")
    );
    assert!(
        [pb::JobStatus::Queued as i32, pb::JobStatus::Running as i32].contains(&run.status),
        "{run:?}"
    );
}

/// What team a's submit of `spec` (none: no spec) answers, on a gateway of
/// its own.
async fn refused_submit(spec: Option<&str>) -> Status {
    let g = Served::start("").await;
    let req = pb::SubmitExperimentRequest {
        client_request_id: String::new(),
        spec: spec.map(|s| pb::submit_experiment_request::Spec::SpecToml(s.into())),
    };
    let mut c = g.client().await;
    c.submit_experiment(of("team-a", req)).await.unwrap_err()
}

#[tokio::test]
async fn submit_of_a_bad_spec_is_invalid_argument_naming_the_field() {
    let e = refused_submit(Some(&SPEC.replace("rate = 0.1", "rate = 1.5"))).await;
    assert_eq!(fields(&e), ["spec.attack.rate"]);
}

#[tokio::test]
async fn submit_without_a_spec_names_spec() {
    assert_eq!(fields(&refused_submit(None).await), ["spec"]);
}

#[tokio::test]
async fn submit_naming_a_server_path_names_spec_dataset_path() {
    let e = refused_submit(Some(&SPEC.replace("path = \"mnist\"", "path = \"/etc\""))).await;
    assert_eq!(fields(&e), ["spec.dataset.path"]);
}

#[tokio::test]
async fn a_refused_submit_leaves_no_run() {
    let g = Served::start("").await;
    let mut c = g.client().await;
    c.submit_experiment(of(
        "team-a",
        toml_submit("bad", &SPEC.replace("epochs = 1", "epochs = 0")),
    ))
    .await
    .unwrap_err();
    let listed = c
        .list_experiments(of("team-a", pb::ListExperimentsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.runs.is_empty(), "{:?}", listed.runs);
}

#[tokio::test]
async fn submit_past_the_teams_runs_in_flight_is_resource_exhausted() {
    let g = Served::start("max_runs_in_flight = 1").await;
    let mut c = g.client().await;
    submit(&mut c, "team-a", "first").await;
    let e = c
        .submit_experiment(of("team-a", toml_submit("second", SPEC)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // the quota is the team's: another team still submits
    submit(&mut c, "team-b", "first").await;
}

#[tokio::test]
async fn submit_naming_another_teams_upload_answers_as_a_missing_one() {
    let g = Served::start("").await;
    let mut c = g.client().await;
    upload(&mut c, "team-a", "digits", "f", b"bytes of team a")
        .await
        .unwrap();
    let spec = SPEC.replace("path = \"mnist\"", "path = \"upload:digits\"");
    let e = c
        .submit_experiment(of("team-b", toml_submit("", &spec)))
        .await
        .unwrap_err();
    assert_eq!(fields(&e), ["spec.dataset.path"]);
    assert!(!e.message().contains("team-a"), "{e:?}");
    // the owner's submit passes the same check
    c.submit_experiment(of("team-a", toml_submit("", &spec)))
        .await
        .unwrap();
}

#[tokio::test]
async fn submit_scan_of_a_model_never_uploaded_names_model() {
    let g = Served::start("").await;
    let mut c = g.client().await;
    upload(&mut c, "team-a", "digits", "f", b"some digits")
        .await
        .unwrap();
    let e = c
        .submit_scan(of(
            "team-a",
            pb::SubmitScanRequest {
                model: "upload:nope".into(),
                data: "upload:digits".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(fields(&e), ["model"]);
}

// ---- get, list, cancel ----

/// What `team-b` gets asking for `run_id` of each method that names a run,
/// with the run id replaced by `ID`.
async fn answers_to_team_b(c: &mut ExperimentServiceClient<Channel>, run_id: &str) -> Vec<String> {
    let id = || run_id.to_string();
    let plain = |e: Status| format!("{:?} {}", e.code(), e.message().replace(run_id, "ID"));
    vec![
        plain(
            c.get_experiment(of("team-b", pb::GetExperimentRequest { run_id: id() }))
                .await
                .unwrap_err(),
        ),
        plain(
            c.watch_experiment(of(
                "team-b",
                pb::WatchExperimentRequest {
                    run_id: id(),
                    after_seq: 0,
                },
            ))
            .await
            .err()
            .unwrap(),
        ),
        plain(
            c.cancel_experiment(of("team-b", pb::CancelExperimentRequest { run_id: id() }))
                .await
                .unwrap_err(),
        ),
        plain(
            c.download(of(
                "team-b",
                pb::DownloadRequest {
                    run_id: id(),
                    target: Some(pb::download_request::Target::Report(pb::ReportFiles {
                        models: true,
                    })),
                },
            ))
            .await
            .err()
            .unwrap(),
        ),
    ]
}

#[tokio::test]
async fn a_run_that_does_not_exist_is_not_found_by_get_watch_cancel_and_download() {
    let g = Served::start("").await;
    let mut c = g.client().await;
    let missing = answers_to_team_b(&mut c, &uuid::Uuid::new_v4().to_string()).await;
    assert!(
        missing.iter().all(|a| a.starts_with("NotFound ")),
        "{missing:#?}"
    );
}

#[tokio::test]
async fn another_teams_run_is_not_found_as_a_missing_one() {
    let g = Served::start("").await;
    let mut c = g.client().await;
    let theirs = submit(&mut c, "team-a", "a-1").await;
    let got = answers_to_team_b(&mut c, &theirs).await;
    let missing = answers_to_team_b(&mut c, &uuid::Uuid::new_v4().to_string()).await;
    assert_eq!(got, missing);
    // and team a's run is not cancelled by team b's attempt
    let run = c
        .get_experiment(of("team-a", pb::GetExperimentRequest { run_id: theirs }))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(run.status, pb::JobStatus::Cancelled as i32);
}

#[tokio::test]
async fn list_shows_the_callers_runs_a_page_at_a_time() {
    let g = Served::start("").await;
    let mut c = g.client().await;
    let mut mine = Vec::new();
    for i in 0..3 {
        mine.push(submit(&mut c, "team-a", &format!("a-{i}")).await);
    }
    submit(&mut c, "team-b", "b-0").await;
    let page = |token: String| pb::ListExperimentsRequest {
        page_size: 2,
        page_token: token,
    };
    let first = c
        .list_experiments(of("team-a", page(String::new())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.runs.len(), 2);
    assert!(!first.next_page_token.is_empty());
    let second = c
        .list_experiments(of("team-a", page(first.next_page_token.clone())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.runs.len(), 1);
    assert!(second.next_page_token.is_empty());
    let mut listed: Vec<String> = first
        .runs
        .iter()
        .chain(&second.runs)
        .map(|r| r.id.clone())
        .collect();
    listed.sort();
    mine.sort();
    assert_eq!(listed, mine, "team a's runs, each once");
}

#[tokio::test]
async fn get_of_a_malformed_run_id_names_run_id() {
    let g = Served::start("").await;
    let req = pb::GetExperimentRequest {
        run_id: "nope".into(),
    };
    let e = g.client().await.get_experiment(of("team-a", req)).await;
    assert_eq!(fields(&e.unwrap_err()), ["run_id"]);
}

#[tokio::test]
async fn list_with_a_token_it_never_gave_names_page_token() {
    let g = Served::start("").await;
    let e = g
        .client()
        .await
        .list_experiments(of(
            "team-a",
            pb::ListExperimentsRequest {
                page_size: 0,
                page_token: "not-a-token".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(fields(&e), ["page_token"]);
}

#[tokio::test]
async fn cancel_ends_a_run_cancelled() {
    let g = Served::start("").await;
    let mut c = g.client().await;
    let run_id = submit(&mut c, "team-a", "to-cancel").await;
    let run = c
        .cancel_experiment(of("team-a", pb::CancelExperimentRequest { run_id }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.status, pb::JobStatus::Cancelled as i32, "{run:?}");
}

// ---- watch ----

/// The sequence numbers and kinds of `run_id`'s events after `after_seq`,
/// for a watch that must end by itself within 10 s.
async fn replay(
    c: &mut ExperimentServiceClient<Channel>,
    run_id: &str,
    after_seq: i64,
) -> Vec<(i64, String)> {
    let s = c
        .watch_experiment(of(
            "team-a",
            pb::WatchExperimentRequest {
                run_id: run_id.into(),
                after_seq,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(
        Duration::from_secs(10),
        s.map(|e| {
            let e = e.unwrap();
            (e.seq, e.kind)
        })
        .collect::<Vec<_>>(),
    )
    .await
    .expect("the watch of a finished run ends")
}

#[tokio::test]
async fn watch_of_a_finished_run_replays_its_events_and_ends() {
    let g = Served::start("").await;
    let mut c = g.client().await;
    let run_id = submit(&mut c, "team-a", "watched").await;
    c.cancel_experiment(of(
        "team-a",
        pb::CancelExperimentRequest {
            run_id: run_id.clone(),
        },
    ))
    .await
    .unwrap();
    let all = replay(&mut c, &run_id, 0).await;
    assert_eq!(
        all.first().map(|e| e.1.as_str()),
        Some("submitted"),
        "{all:?}"
    );
    assert!(all.iter().any(|e| e.1 == "cancelled"), "{all:?}");
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "{all:?}");
    // a client that lost its stream resumes after the last event it saw
    // (the stopping driver may have added an event since)
    let rest = replay(&mut c, &run_id, all[0].0).await;
    assert_eq!(rest.get(..all.len() - 1), Some(&all[1..]), "{rest:?}");
    assert!(rest.windows(2).all(|w| w[0].0 < w[1].0), "{rest:?}");
}

// ---- uploads ----

#[tokio::test]
async fn an_upload_is_stored_under_its_team_and_counted_there() {
    let g = Served::start("").await;
    let mut c = g.client().await;
    let body = vec![7u8; 2500];
    let r = upload(&mut c, "team-a", "digits", "f1", &body)
        .await
        .unwrap();
    assert_eq!(r.reference, "upload:digits");
    assert_eq!(
        (r.sha256.as_str(), r.size),
        (
            deadbolt_test_support::upload::sha256_hex(&body).as_str(),
            2500
        )
    );
    let stored = g.dataset_dir("team-a", "digits");
    assert_eq!(std::fs::read(stored.join("f1")).unwrap(), body);
    let a = usage(&mut c, "team-a").await;
    assert_eq!((a.used_bytes, a.used_files), (2500, 1), "{a:?}");
    let b = usage(&mut c, "team-b").await;
    assert_eq!((b.used_bytes, b.used_files), (0, 0), "{b:?}");
}

#[tokio::test]
async fn an_upload_whose_bytes_miss_their_sha256_stores_nothing() {
    let g = Served::start("").await;
    let mut c = g.client().await;
    let body = b"the bytes sent".to_vec();
    let mut h = deadbolt_test_support::upload::header(pb::UploadKind::Dataset, "d", "f", &body);
    h.sha256 = "0".repeat(64);
    let e = upload_messages(
        &mut c,
        "team-a",
        deadbolt_test_support::upload::messages(h, &body, 4),
    )
    .await
    .unwrap_err();
    assert_eq!(fields(&e), ["header.sha256"]);
    assert_eq!(usage(&mut c, "team-a").await.used_files, 0);
    assert!(!g.dataset_dir("team-a", "d").join("f").exists());
}

#[tokio::test]
async fn an_upload_without_a_header_names_header() {
    let g = Served::start("").await;
    let mut c = g.client().await;
    let e = upload_messages(
        &mut c,
        "team-a",
        vec![pb::UploadChunk {
            header: None,
            data: b"no header".to_vec(),
        }],
    )
    .await
    .unwrap_err();
    assert_eq!(fields(&e), ["header"]);
}

#[tokio::test]
async fn an_upload_past_the_teams_bytes_quota_is_resource_exhausted() {
    let g = Served::start("max_upload_bytes_per_team = 1000").await;
    let mut c = g.client().await;
    upload(&mut c, "team-a", "d", "f1", &[1u8; 600])
        .await
        .unwrap();
    let e = upload(&mut c, "team-a", "d", "f2", &[2u8; 600])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_upload_bytes_per_team"), "{e:?}");
    // another team's quota is its own
    upload(&mut c, "team-b", "d", "f2", &[2u8; 600])
        .await
        .unwrap();
}

#[tokio::test]
async fn delete_upload_removes_the_teams_files_only() {
    let g = Served::start("").await;
    let mut c = g.client().await;
    upload(&mut c, "team-a", "d", "f1", &[1u8; 300])
        .await
        .unwrap();
    upload(&mut c, "team-a", "d", "f2", &[2u8; 200])
        .await
        .unwrap();
    let delete = |file: &str| pb::DeleteUploadRequest {
        kind: pb::UploadKind::Dataset as i32,
        name: "d".into(),
        file: file.into(),
    };
    let e = c.delete_upload(of("team-b", delete(""))).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let gone = c
        .delete_upload(of("team-a", delete("f1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((gone.files, gone.bytes), (1, 300), "{gone:?}");
    let left = usage(&mut c, "team-a").await;
    assert_eq!((left.used_bytes, left.used_files), (200, 1), "{left:?}");
    assert!(!g.dataset_dir("team-a", "d").join("f1").exists());
}

// ---- download ----

#[tokio::test]
async fn download_of_an_artifact_the_run_does_not_have_is_not_found() {
    let g = Served::start("").await;
    let mut c = g.client().await;
    let run_id = submit(&mut c, "team-a", "dl").await;
    let e = c
        .download(of(
            "team-a",
            pb::DownloadRequest {
                run_id,
                target: Some(pb::download_request::Target::Artifact(
                    "report/report.json".into(),
                )),
            },
        ))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}
