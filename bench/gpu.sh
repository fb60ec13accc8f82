#!/usr/bin/env bash
# The GPU path, measured in one command:
#   1. checks that CUDA is visible (deadbolt's libtorch is the PyTorch wheel's,
#      so PyTorch seeing the GPU is deadbolt seeing it), and stops with a
#      clear message when it is not;
#   2. training throughput on the GPU, deadbolt vs PyTorch on the same GPU
#      (bench/train.sh, interleaved repeats, medians and ratios): badnet-cnn
#      on the MNIST training split, then preact-resnet18 on CIFAR-shaped
#      random data; PyTorch once as written and once tuned (channels-last,
#      float16 autocast with a gradient scaler);
#   3. `deadbolt experiment` end to end on the default spec (device auto,
#      so the GPU), timed, with its stage timings and figures.
#
#   bench/gpu.sh [--repeats R] [--preact-images N] [--bin PATH] [--out DIR]
#   bench/gpu.sh --device cpu --smoke
#     --device cpu: every step on the CPU (no CUDA check); --smoke: toy sizes
#     (1 repeat, 256 preact images, an experiment of 1 epoch on 2,000
#     digits): checks the script on a machine without a GPU.
#     --bin: a deadbolt binary to use instead of building the release one.
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda; smoke=0; repeats=3; preact_images=10000; bin=""; out=runs/bench-gpu; threads=2
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2;;
    --smoke) smoke=1; shift;;
    --repeats) repeats=$2; shift 2;;
    --preact-images) preact_images=$2; shift 2;;
    --bin) bin=$2; shift 2;;
    --out) out=$2; shift 2;;
    --threads) threads=$2; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
case "$device" in cuda|cpu) ;; *) echo "--device is cuda or cpu" >&2; exit 2;; esac
scripts/setup.sh
source scripts/env.sh
py=$DEADBOLT_VENV/bin/python

echo "== 1. device"
if [ "$device" = cuda ]; then
  if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "bench/gpu.sh: CUDA is not visible: torch.cuda.is_available() is False for the torch in" >&2
    echo "  $DEADBOLT_VENV (no NVIDIA GPU or driver on this machine, or CUDA_VISIBLE_DEVICES hides it)." >&2
    command -v nvidia-smi >/dev/null && nvidia-smi -L >&2 || echo "  nvidia-smi: not found" >&2
    echo "  To check every step on the CPU instead: bench/gpu.sh --device cpu --smoke" >&2
    exit 3
  fi
  "$py" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"cuda: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")'
else
  echo "cpu ($threads threads)"
fi
if [ "$smoke" = 1 ]; then repeats=1; preact_images=256; fi
if [ -z "$bin" ]; then
  cargo build --release --quiet -p deadbolt-cli
  bin=${CARGO_TARGET_DIR:-target}/release/deadbolt
fi
tuned="--channels-last"
[ "$device" = cuda ] && tuned="$tuned --amp"

echo "== 2a. training, badnet-cnn on MNIST (PyTorch as written)"
bench/train.sh --device "$device" --threads "$threads" --repeats "$repeats" --bin "$bin"
echo "== 2b. training, badnet-cnn on MNIST (PyTorch $tuned)"
bench/train.sh --device "$device" --threads "$threads" --repeats "$repeats" --bin "$bin" --torch-flags "$tuned"
echo "== 2c. training, preact-resnet18 on CIFAR-shaped data, $preact_images images (PyTorch as written)"
bench/train.sh --arch preact-resnet18 --images "$preact_images" --device "$device" --threads "$threads" \
  --repeats "$repeats" --bin "$bin"
echo "== 2d. training, preact-resnet18 on CIFAR-shaped data (PyTorch $tuned)"
bench/train.sh --arch preact-resnet18 --images "$preact_images" --device "$device" --threads "$threads" \
  --repeats "$repeats" --bin "$bin" --torch-flags "$tuned"

echo "== 3. deadbolt experiment, end to end"
rm -rf "$out"; mkdir -p "$out"
spec=examples/mnist-badnets.toml
if [ "$smoke" = 1 ] || [ "$device" = cpu ]; then
  # the default spec with the device spelled out (and, for --smoke, small)
  "$py" - "$spec" "$out/spec.toml" "$device" "$smoke" <<'PY'
import re, sys
src, dst, device, smoke = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
s = open(src).read()
s = re.sub(r'(?m)^device\s*=.*$', f'device = "{device}"', s)
if smoke:
    s = re.sub(r'(?m)^epochs\s*=.*$', 'epochs = 1', s)
    s = re.sub(r'(?m)^\[dataset\]\s*$', '[dataset]\ntrain_limit = 2000', s, count=1)
open(dst, "w").write(s)
PY
  spec=$out/spec.toml
fi
t0=$(date +%s.%N)
"$bin" --quiet experiment "$spec" --out "$out/experiment" >/dev/null
t1=$(date +%s.%N)
"$py" - "$out/experiment/report.json" "$t0" "$t1" <<'PY'
import json, sys
r, wall = json.load(open(sys.argv[1])), float(sys.argv[3]) - float(sys.argv[2])
print(f"wall time {wall:.1f} s")
for k, v in sorted(r.get("timings", {}).items()):
    print(f"  {k:28s} {v:8.2f} s")
for m in ("clean_model", "backdoored_model"):
    print(f"  {m:28s} acc {r[m]['acc']:.4f} asr {(r[m].get('asr') or 0):.4f}")
c = r["pruning"]["linf"]["chosen"]
print(f"  linf chosen on validation: k={c['k']} acc={c['acc']:.4f} asr={c['asr']:.4f}")
PY
