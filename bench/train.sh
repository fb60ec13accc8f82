#!/usr/bin/env bash
# Training throughput, deadbolt vs the same training in PyTorch, side by side
# in one run: the same model, data, batch 64, SGD and thread count. Runs are
# interleaved (deadbolt, pytorch-dataloader, pytorch-indexed) REPEATS times;
# prints the median (and range) of images/s of each, the ratios deadbolt /
# pytorch, and the same for images per CPU-second (the CPU time of the
# training epochs, all threads): on a shared machine other processes steal
# wall time, the CPU-time ratio is what they disturb least.
#   bench/train.sh [--threads N] [--repeats R] [--device cpu|cuda]
#                  [--arch badnet-cnn|preact-resnet18] [--images N] [--epochs E]
#                  [--bin PATH] [--torch-flags "--channels-last --amp"]
#   badnet-cnn: the MNIST training split (bench/train-bench.toml, 2 epochs).
#   preact-resnet18: CIFAR-shaped random data (3x32x32 uint8 pixels, 10
#     classes; --images, default 512, 1 epoch) written as CIFAR-10 batches.
#   --bin: a deadbolt binary to use instead of building target/debug/deadbolt.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2; repeats=3; device=cpu; arch=badnet-cnn; images=""; epochs=""; bin=""; torch_flags=""
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2;;
    --repeats) repeats=$2; shift 2;;
    --device) device=$2; shift 2;;
    --arch) arch=$2; shift 2;;
    --images) images=$2; shift 2;;
    --epochs) epochs=$2; shift 2;;
    --bin) bin=$2; shift 2;;
    --torch-flags) torch_flags=$2; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
scripts/setup.sh
source scripts/env.sh
if [ -z "$bin" ]; then
  cargo build --quiet -p deadbolt-cli
  bin=${CARGO_TARGET_DIR:-target}/debug/deadbolt
fi
py=$DEADBOLT_VENV/bin/python
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
case "$arch" in
  badnet-cnn)
    $bin data fetch-mnist --out data/mnist >/dev/null
    spec=bench/train-bench.toml; data=data/mnist; epochs=${epochs:-2}
    [ -z "$images" ] || { echo "--images is for preact-resnet18 (badnet-cnn trains on the MNIST split)" >&2; exit 2; }
    ;;
  preact-resnet18)
    images=${images:-512}; epochs=${epochs:-1}; data=$out/cifar
    # random CIFAR-10 batches: the training images and a small test batch
    $py - "$data" "$images" <<'PY'
import os, sys, numpy as np
d, n = sys.argv[1], int(sys.argv[2]); os.makedirs(d)
rng = np.random.default_rng(0)
for name, m in (("data_batch_1.bin", n), ("test_batch.bin", 64)):
    rec = rng.integers(0, 256, size=(m, 1 + 3 * 32 * 32), dtype=np.uint8)
    rec[:, 0] = rng.integers(0, 10, size=m)
    rec.tofile(os.path.join(d, name))
PY
    spec=$out/preact.toml
    cat >"$spec" <<EOF
name = "bench-train-preact"
seed = 0
[dataset]
kind = "cifar10"
path = "$data"
validation_fraction = 0.0
[model]
arch = "preact-resnet18"
[training]
optimizer = "sgd"
lr = 0.01
momentum = 0.9
weight_decay = 0.0005
schedule = "constant"
epochs = $epochs
batch_size = 64
EOF
    ;;
  *) echo "unknown --arch $arch (badnet-cnn or preact-resnet18)" >&2; exit 2;;
esac
for r in $(seq "$repeats"); do
  $bin --quiet train "$spec" --out "$out/db$r" --device "$device" --threads "$threads" \
    | $py -c 'import json,sys; d=json.load(sys.stdin); e=d["epochs"]; n=sum(x["seconds"]*x["images_per_sec"] for x in e); c=sum(x.get("cpu_seconds",0) for x in e); print(json.dumps({"impl":"deadbolt","images_per_sec":d["train_images_per_sec"],"cpu_images_per_sec":n/c if c>0 else 0}))' >>"$out/results"
  for loader in dataloader indexed; do
    # shellcheck disable=SC2086
    $py bench/train_torch.py --arch "$arch" --data "$data" --epochs "$epochs" --threads "$threads" \
      --device "$device" --loader "$loader" $torch_flags >>"$out/results"
  done
done
$py - "$out/results" "$threads" "$device" "$arch" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
impls = list(dict.fromkeys(r["impl"] for r in rows))
print(f"{sys.argv[4]}, device {sys.argv[3]}, threads {sys.argv[2]}, {sum(r['impl'] == impls[0] for r in rows)} interleaved runs each")
for key, what in (("images_per_sec", "images/s"), ("cpu_images_per_sec", "images per CPU-second")):
    med = {}
    for impl in impls:
        v = [r[key] for r in rows if r["impl"] == impl]
        med[impl] = statistics.median(v)
        print(f"  {impl:34s} {med[impl]:9.1f} {what}  (median; range {min(v):.1f}..{max(v):.1f})")
    for base in impls[1:]:
        if med[base] > 0:
            print(f"  ratio deadbolt / {base}: {med[impls[0]] / med[base]:.2f}")
PY
