//! The generated code end to end: a stub ExperimentService on a loopback
//! port, the generated client, a server stream, INVALID_ARGUMENT details
//! across the wire, and reflection built from FILE_DESCRIPTOR_SET.

use std::pin::Pin;

use deadbolt_proto::v1::experiment_service_client::ExperimentServiceClient;
use deadbolt_proto::v1::experiment_service_server::{ExperimentService, ExperimentServiceServer};
use deadbolt_proto::v1::*;
use deadbolt_proto::validate::{field_violations, Violations};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Stub;

#[tonic::async_trait]
impl ExperimentService for Stub {
    async fn submit_experiment(
        &self,
        req: Request<SubmitExperimentRequest>,
    ) -> Result<Response<SubmitExperimentResponse>, Status> {
        let req = req.into_inner();
        let mut v = Violations::new();
        v.present("spec", &req.spec);
        if let Some(submit_experiment_request::Spec::Structured(s)) = &req.spec {
            if let Some(a) = &s.attack {
                v.in_range("spec.attack.rate", a.rate, 0.0, 1.0);
            }
        }
        v.check()?;
        Ok(Response::new(SubmitExperimentResponse {
            run_id: "00000000-0000-0000-0000-000000000001".into(),
            created: true,
        }))
    }

    async fn get_experiment(
        &self,
        req: Request<GetExperimentRequest>,
    ) -> Result<Response<Run>, Status> {
        Err(Status::not_found(format!(
            "run {} not found",
            req.get_ref().run_id
        )))
    }

    async fn list_experiments(
        &self,
        _: Request<ListExperimentsRequest>,
    ) -> Result<Response<ListExperimentsResponse>, Status> {
        Ok(Response::new(ListExperimentsResponse::default()))
    }

    type WatchExperimentStream = Pin<Box<dyn Stream<Item = Result<RunEvent, Status>> + Send>>;

    async fn watch_experiment(
        &self,
        req: Request<WatchExperimentRequest>,
    ) -> Result<Response<Self::WatchExperimentStream>, Status> {
        let after = req.into_inner().after_seq;
        let events = (after + 1..=3).map(|seq| {
            Ok(RunEvent {
                seq,
                stage: "train-backdoored".into(),
                kind: "progress".into(),
                progress: Some(seq as f64 / 3.0),
                status: JobStatus::Running as i32,
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(futures::stream::iter(events))))
    }

    async fn submit_scan(
        &self,
        _: Request<deadbolt_proto::v1::SubmitScanRequest>,
    ) -> Result<Response<SubmitExperimentResponse>, Status> {
        Err(Status::unimplemented("not in this stub"))
    }

    async fn upload(
        &self,
        req: Request<tonic::Streaming<UploadChunk>>,
    ) -> Result<Response<UploadResponse>, Status> {
        let mut s = req.into_inner();
        let mut size = 0u64;
        let mut name = String::new();
        while let Some(c) = s.message().await? {
            if let Some(h) = c.header {
                name = h.name;
            }
            size += c.data.len() as u64;
        }
        Ok(Response::new(UploadResponse {
            reference: format!("upload:{name}"),
            sha256: String::new(),
            size,
        }))
    }

    async fn cancel_experiment(
        &self,
        _: Request<CancelExperimentRequest>,
    ) -> Result<Response<Run>, Status> {
        Ok(Response::new(Run {
            status: JobStatus::Cancelled as i32,
            ..Default::default()
        }))
    }

    type DownloadStream = Pin<Box<dyn Stream<Item = Result<DownloadChunk, Status>> + Send>>;

    async fn download(
        &self,
        _: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        Err(Status::unimplemented("not in this stub"))
    }

    async fn list_uploads(
        &self,
        _: Request<ListUploadsRequest>,
    ) -> Result<Response<ListUploadsResponse>, Status> {
        Err(Status::unimplemented("not in this stub"))
    }

    async fn delete_upload(
        &self,
        _: Request<DeleteUploadRequest>,
    ) -> Result<Response<DeleteUploadResponse>, Status> {
        Err(Status::unimplemented("not in this stub"))
    }
}

#[tokio::test]
async fn client_and_server_round_trip() {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(deadbolt_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("descriptor set is valid for reflection");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(reflection)
            .add_service(ExperimentServiceServer::new(Stub))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = ExperimentServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    // a client stream: the header, then the bytes in several messages
    let chunks = vec![
        UploadChunk {
            header: Some(UploadHeader {
                name: "digits".into(),
                ..Default::default()
            }),
            data: vec![1; 3],
        },
        UploadChunk {
            header: None,
            data: vec![2; 5],
        },
    ];
    let up = client
        .upload(futures::stream::iter(chunks))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((up.reference.as_str(), up.size), ("upload:digits", 8));

    let ok = client
        .submit_experiment(SubmitExperimentRequest {
            client_request_id: "r1".into(),
            spec: Some(submit_experiment_request::Spec::SpecToml(
                "[dataset]\nkind = \"mnist\"\n".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.created);

    // Field violations survive the trip through grpc-status-details-bin.
    let err = client
        .submit_experiment(SubmitExperimentRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(field_violations(&err)[0].0, "spec");
    let err = client
        .submit_experiment(SubmitExperimentRequest {
            spec: Some(submit_experiment_request::Spec::Structured(
                ExperimentSpec {
                    attack: Some(AttackSpec {
                        rate: 1.5,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field_violations(&err)[0].0, "spec.attack.rate");

    let nf = client
        .get_experiment(GetExperimentRequest { run_id: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(nf.code(), tonic::Code::NotFound);

    let seqs: Vec<i64> = client
        .watch_experiment(WatchExperimentRequest {
            run_id: "x".into(),
            after_seq: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .map(|e| e.unwrap().seq)
        .collect()
        .await;
    assert_eq!(seqs, [2, 3]);

    let c = client
        .cancel_experiment(CancelExperimentRequest { run_id: "x".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.status(), JobStatus::Cancelled);
    server.abort();
}
