//! Helpers for deadbolt's tests (a dev-dependency only):
//!
//! - [`fixture`]: one fixture (a cluster, a gateway) shared by the tests of
//!   a test binary;
//! - [`pg`]: a fresh Postgres database per test ([`pg::Pg`]);
//! - [`s3`]: an S3-compatible server on loopback ([`s3::Moto`], `moto_server`,
//!   which `scripts/setup-test-deps.sh` installs);
//! - [`serve`]: `deadbolt serve` child processes, their config, and gateway
//!   client helpers (submit, watch to the end);
//! - [`upload`]: an upload's messages (header, then chunks);
//! - [`specs`]: tiny experiment specs;
//! - [`tls`]: a private CA and certificates (rcgen);
//! - [`torch`]: the project's torch virtualenv and `scripts/byom_torch.py`.

pub mod fixture;
pub mod pg;
pub mod s3;
pub mod serve;
pub mod specs;
pub mod tls;
pub mod torch;
pub mod upload;
