//! TLS between every pair of processes (certificates made with rcgen, a
//! private CA): the stage services in one process, the gateway in another,
//! the clients (this test and the `deadbolt` CLI) in a third. The MNIST run
//! goes through over TLS; a plaintext client is refused by the gateway; a
//! direct stage call without a client certificate, or with one from another
//! CA, is refused even with the internal credential; a process refuses to
//! serve plaintext on a non-loopback address unless configured to.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use deadbolt_proto::v1 as pb;
use deadbolt_proto::v1::experiment_service_client::ExperimentServiceClient;
use deadbolt_proto::v1::trainer_service_client::TrainerServiceClient;
use deadbolt_test_support::tls::TestPki;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

async fn tls_channel(url: &str, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A stage call (with the internal credential) over `tls`: Ok when it
/// reached the service (any gRPC answer from the handler), Err when the
/// connection or handshake was refused.
async fn stage_call(url: &str, tls: ClientTlsConfig) -> Result<tonic::Code, String> {
    let ch = tls_channel(url, tls).await.map_err(|e| format!("{e:?}"))?;
    let mut t = TrainerServiceClient::with_interceptor(ch, internal);
    let r = t
        .train(pb::TrainRequest {
            run_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await;
    match r {
        Ok(_) => Ok(tonic::Code::Ok),
        // the handler answers these for a run that does not exist (or for
        // a caller it does not admit); anything else is the connection
        // failing. Under TLS 1.3 the server checks the client's certificate
        // after the client considers the handshake done, so a refusal shows
        // up on the first call as UNAVAILABLE, UNKNOWN, CANCELLED (a reset
        // stream) or INTERNAL, never as one of these
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::NotFound
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::InvalidArgument
                    | tonic::Code::Unauthenticated
                    | tonic::Code::PermissionDenied
            ) =>
        {
            Ok(s.code())
        }
        Err(s) => Err(format!("{s:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mnist_run_goes_over_tls_and_plaintext_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = TestPki::new(&d.join("pki"));
    let spec = tiny_spec(d, 1, 600);
    let pg = Pg::fresh().await;
    let art = d.join("artifacts").display().to_string();
    let base = |name: &str, extra: &str| {
        let work = d.join(format!("work-{name}"));
        std::fs::create_dir_all(&work).unwrap();
        config(pg.url(), &art, &work, &format!("{extra}\n{}", pki.config()))
    };
    let (stages, peer_config) = serve_stages(d, &base("stages", ""), true);
    let gw = serve(d, "gateway", "gateway", &base("gw", &peer_config));
    let url = gw.url_tls("gateway");

    // the run, over TLS from here to the gateway and from it to the stages
    let ch = tls_channel(&url, pki.client(None)).await.unwrap();
    let mut c = ExperimentServiceClient::new(ch);
    let run_id = c
        .submit_experiment(pb::SubmitExperimentRequest {
            client_request_id: "tls".into(),
            spec: Some(pb::submit_experiment_request::Spec::SpecToml(
                std::fs::read_to_string(&spec).unwrap(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let (events, run) = watch(&mut c, &run_id, Duration::from_secs(300)).await;
    assert_eq!(
        run.status,
        pb::JobStatus::Succeeded as i32,
        "{events:#?}\n{}\n{}",
        gw.log_tail(),
        stages.log_tail()
    );

    // the CLI over TLS, trusting the CA through DEADBOLT_TLS_CA
    let out = Command::new(bin())
        .args(["--quiet", "runs", "--gateway", &url])
        .env("DEADBOLT_TLS_CA", &pki.ca)
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&run_id),
        "deadbolt runs over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and without the CA, the server is not trusted
    let out = Command::new(bin())
        .args(["--quiet", "runs", "--gateway", &url])
        .env_remove("DEADBOLT_TLS_CA")
        .output()
        .unwrap();
    assert!(!out.status.success(), "an untrusted server was accepted");

    // a plaintext client gets nothing from the gateway
    let plain = format!("http://{}", gw.addrs["gateway"]);
    let refused = match Endpoint::from_shared(plain)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
    {
        Err(_) => true,
        Ok(ch) => ExperimentServiceClient::new(ch)
            .list_experiments(pb::ListExperimentsRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "a plaintext client was served");

    // stage services: mutual TLS on top of the internal credential
    let trainer = stages.url_tls("trainer");
    let ok = stage_call(
        &trainer,
        pki.client(Some((&pki.client_cert, &pki.client_key))),
    )
    .await;
    assert!(
        matches!(ok, Ok(code) if code != tonic::Code::Unauthenticated),
        "the gateway's certificate was refused: {ok:?}"
    );
    let none = stage_call(&trainer, pki.client(None)).await;
    assert!(
        none.is_err(),
        "a client without a certificate reached a stage: {none:?}"
    );
    let rogue = stage_call(
        &trainer,
        pki.client(Some((&pki.rogue_cert, &pki.rogue_key))),
    )
    .await;
    assert!(
        rogue.is_err(),
        "another CA's certificate reached a stage: {rogue:?}"
    );
    drop(gw);
    drop(stages);
}

#[test]
fn plaintext_on_a_reachable_address_needs_opting_in() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let work = d.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let db = format!("sqlite://{}", d.join("meta.db").display());
    let art = d.join("artifacts").display().to_string();
    let cfg = d.join("open.toml");
    std::fs::write(
        &cfg,
        // keys: auth = "none" is refused off loopback before TLS is asked
        config(&db, &art, &work, "")
            .replace("gateway = \"127.0.0.1:0\"", "gateway = \"0.0.0.0:0\"")
            .replace("auth = \"none\"", "auth = \"keys\""),
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--services", "gateway"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "served plaintext on 0.0.0.0");
    assert!(
        err.contains("listen.gateway") && err.contains("plaintext = true") && err.contains("tls"),
        "{err}"
    );
    // opting in serves it
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("plaintext = true\n{text}")).unwrap();
    let mut p = deadbolt_test_support::serve::serve(
        std::path::Path::new(bin()),
        d,
        "opted-in",
        "gateway",
        &std::fs::read_to_string(&cfg).unwrap(),
    );
    assert!(p.addrs["gateway"].starts_with("0.0.0.0:"), "{:?}", p.addrs);
    p.kill();
    // but never without keys: auth = "none" is for loopback only
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("auth = \"keys\"", "auth = \"none\"");
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--services", "gateway"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "served auth = none on 0.0.0.0");
    assert!(err.contains("loopback only"), "{err}");
}
