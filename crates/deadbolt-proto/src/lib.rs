//! deadbolt-proto: the gRPC contracts of deadbolt (package `deadbolt.v1`,
//! sources in `proto/deadbolt/v1/`).
//!
//! - [`v1`]: prost messages, tonic clients (`*_client`) and servers
//!   (`*_server`) for PoisonerService, TrainerService, AnalyzerService,
//!   PrunerService and ExperimentService (the gateway).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptor set (imports included)
//!   for tonic-reflection.
//! - [`error`]: [`ServiceError`] (an error that says its gRPC code) and
//!   [`status`], the one error-to-status mapping.
//! - [`validate`]: INVALID_ARGUMENT statuses carrying `google.rpc.BadRequest`
//!   field violations.
//! - [`retry`]: [`retryable`], the one rule of which failures are worth
//!   another try (a stage call, a job attempt).
//!
//! Conversions between these messages and the core spec types live in the
//! services (this crate does not link libtorch or deadbolt-core).

pub mod error;
pub mod retry;
pub mod validate;

pub use error::{status, ServiceError};
pub use retry::{retryable, Origin};

/// Generated code for `deadbolt.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("deadbolt.v1");
}

/// Encoded `google.protobuf.FileDescriptorSet` of every deadbolt proto file
/// and its imports, for `tonic_reflection::server::Builder::register_encoded_file_descriptor_set`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/deadbolt_descriptor.bin"));

/// Fully qualified names of the five services.
pub const SERVICE_NAMES: [&str; 5] = [
    "deadbolt.v1.PoisonerService",
    "deadbolt.v1.TrainerService",
    "deadbolt.v1.AnalyzerService",
    "deadbolt.v1.PrunerService",
    "deadbolt.v1.ExperimentService",
];

/// The path of every method of the five services
/// (`/deadbolt.v1.ExperimentService/SubmitExperiment`, ...), as a request's
/// `:path` names it, read from [`FILE_DESCRIPTOR_SET`].
pub fn method_paths() -> Vec<String> {
    use prost::Message;
    let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
        .expect("the built descriptor set decodes");
    fds.file
        .iter()
        .flat_map(|f| {
            let pkg = f.package().to_string();
            f.service.iter().flat_map(move |s| {
                let service = format!("{pkg}.{}", s.name());
                s.method
                    .iter()
                    .map(move |m| format!("/{service}/{}", m.name()))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn method_paths_name_every_method() {
        let paths = method_paths();
        assert!(paths.contains(&"/deadbolt.v1.ExperimentService/SubmitExperiment".to_string()));
        for s in SERVICE_NAMES {
            assert!(
                paths.iter().any(|p| p.starts_with(&format!("/{s}/"))),
                "{s}"
            );
        }
    }

    #[test]
    fn descriptor_set_has_all_five_services() {
        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let mut services: Vec<String> = fds
            .file
            .iter()
            .flat_map(|f| {
                let pkg = f.package().to_string();
                f.service.iter().map(move |s| format!("{pkg}.{}", s.name()))
            })
            .collect();
        services.sort();
        let mut want: Vec<String> = SERVICE_NAMES.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(services, want);
        // Imports are included, so reflection clients can resolve Timestamp.
        assert!(fds
            .file
            .iter()
            .any(|f| f.name() == "google/protobuf/timestamp.proto"));
    }

    #[test]
    fn submit_request_accepts_structured_or_toml() {
        use v1::submit_experiment_request::Spec;
        let toml = v1::SubmitExperimentRequest {
            client_request_id: "r1".into(),
            spec: Some(Spec::SpecToml("[dataset]\nkind = \"mnist\"\n".into())),
        };
        let bytes = toml.encode_to_vec();
        assert_eq!(
            v1::SubmitExperimentRequest::decode(&bytes[..]).unwrap(),
            toml
        );
        let structured = v1::SubmitExperimentRequest {
            client_request_id: "r2".into(),
            spec: Some(Spec::Structured(v1::ExperimentSpec {
                name: "mnist-badnets".into(),
                attack: Some(v1::AttackSpec {
                    trigger: Some(v1::attack_spec::Trigger::Patch(v1::PatchTrigger {
                        size: 3,
                        position: Some(v1::patch_trigger::Position::Corner(
                            v1::Corner::BottomRight as i32,
                        )),
                        ..Default::default()
                    })),
                    rate: 0.1,
                    ..Default::default()
                }),
                ..Default::default()
            })),
        };
        let bytes = structured.encode_to_vec();
        assert_eq!(
            v1::SubmitExperimentRequest::decode(&bytes[..]).unwrap(),
            structured
        );
        // Unset optional fields mean "the spec's default".
        let t = v1::TrainingSpec::default();
        assert_eq!((t.lr, t.epochs), (None, None));
    }
}
