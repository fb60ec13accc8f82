//! A Python client (grpcio + grpcio-reflection in the project's virtualenv)
//! discovers the gateway's API through v1alpha reflection alone and calls
//! ListExperiments (tests/clients/reflect_list.py).

mod common;

use std::process::Command;

use common::*;
use deadbolt_store::NewRun;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_discovers_the_api_by_v1alpha_reflection() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = format!("sqlite://{}", d.join("meta.db").display());
    let art = d.join("artifacts").display().to_string();
    std::fs::create_dir_all(d.join("work")).unwrap();
    let gw = serve(
        d,
        "gateway",
        "gateway",
        &config(&db, &art, &d.join("work"), ""),
    );
    let store = deadbolt_store::connect(&db).await.unwrap();
    store
        .create_run(NewRun {
            client_request_id: None,
            team: deadbolt_store::LOCAL_TEAM.into(),
            name: "reflected".into(),
            spec_json: serde_json::json!({}),
        })
        .await
        .unwrap();
    let venv = std::env::var("DEADBOLT_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/deadbolt/venv-torch-2.13.0",
            std::env::var("HOME").unwrap()
        )
    });
    let out = Command::new(format!("{venv}/bin/python"))
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/reflect_list.py"))
        .arg(&gw.addrs["gateway"])
        .output()
        .expect("the venv's python (scripts/setup-test-deps.sh installs grpcio)");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log_tail()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let services: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(services.contains(&"deadbolt.v1.ExperimentService"), "{v}");
    assert_eq!(v["runs"], serde_json::json!(["reflected"]), "{v}");
}
