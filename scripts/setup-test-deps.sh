#!/usr/bin/env bash
# Installs what the test suites need beyond scripts/setup.sh, idempotently:
#   - moto_server (PyPI moto[server]), the S3-compatible server that the
#     deadbolt-store artifact tests start on loopback.
# Prints nothing on a second run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"

if [ ! -x "$DEADBOLT_VENV/bin/moto_server" ]; then
  echo "setup-test-deps: installing moto[server] into $DEADBOLT_VENV" >&2
  if [ ! -x "$DEADBOLT_VENV/bin/python" ]; then
    python3 -m venv "$DEADBOLT_VENV"
  fi
  "$DEADBOLT_VENV/bin/pip" install --quiet "moto[server]>=5,<6"
fi

# kubernetes-validate (+ PyYAML) checks deploy/ offline (scripts/validate-deploy.sh).
if [ ! -x "$DEADBOLT_VENV/bin/kubernetes-validate" ]; then
  echo "setup-test-deps: installing kubernetes-validate into $DEADBOLT_VENV" >&2
  "$DEADBOLT_VENV/bin/pip" install --quiet "kubernetes-validate>=1.30" pyyaml
fi

# grpcio + grpcio-reflection: the non-Rust client that discovers the API
# through v1alpha reflection (crates/deadbolt-cli/tests/reflection_v1alpha.rs).
if [ ! -f "$DEADBOLT_VENV/.grpcio" ]; then
  echo "setup-test-deps: installing grpcio and grpcio-reflection into $DEADBOLT_VENV" >&2
  "$DEADBOLT_VENV/bin/pip" install --quiet "grpcio>=1.60" "grpcio-reflection>=1.60" "protobuf>=4.25"
  touch "$DEADBOLT_VENV/.grpcio"
fi
