//! Helpers of the process-level service tests (from
//! `deadbolt-test-support`), bound to this crate's `deadbolt` binary.
#![allow(dead_code, unused_imports)]

use std::path::Path;

pub use deadbolt_test_support::pg::Pg;
pub use deadbolt_test_support::s3::Moto;
pub use deadbolt_test_support::serve::{
    channel, config, config_with, config_with_lease, gateway, internal, peers, pid_of, submit_toml,
    wait_for, watch, Proc,
};
pub use deadbolt_test_support::specs::{repo, tiny_spec, tiny_spec_local};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_deadbolt")
}

/// `deadbolt serve --config <dir>/<name>.toml --services <services>`, once
/// every service printed its address.
pub fn serve(dir: &Path, name: &str, services: &str, config: &str) -> Proc {
    deadbolt_test_support::serve::serve(Path::new(bin()), dir, name, services, config)
}

/// The fields of a status's BadRequest violations.
pub fn field_of(st: &tonic::Status) -> Vec<String> {
    tonic_types::StatusExt::get_details_bad_request(st)
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}
