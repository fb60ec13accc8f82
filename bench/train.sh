#!/usr/bin/env bash
# Training throughput, deadbolt vs the same training in PyTorch, side by side
# in one run: badnet-cnn on the MNIST training split, batch 64, SGD, the same
# thread count. Runs are interleaved (deadbolt, pytorch-dataloader,
# pytorch-indexed) REPEATS times; prints the median images/s of each and the
# ratios deadbolt / pytorch.
#   bench/train.sh [--threads N] [--repeats R] [--device cpu|cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2; repeats=3; device=cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2;;
    --repeats) repeats=$2; shift 2;;
    --device) device=$2; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
scripts/setup.sh
source scripts/env.sh
cargo build --quiet -p deadbolt-cli
bin=target/debug/deadbolt
$bin data fetch-mnist --out data/mnist >/dev/null
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for r in $(seq "$repeats"); do
  $bin --quiet train bench/train-bench.toml --out "$out/db$r" --device "$device" --threads "$threads" \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"impl":"deadbolt","images_per_sec":d["train_images_per_sec"]}))' >>"$out/results"
  for loader in dataloader indexed; do
    "$DEADBOLT_VENV/bin/python" bench/train_torch.py --data data/mnist --epochs 2 --threads "$threads" \
      --device "$device" --loader "$loader" >>"$out/results"
  done
done
python3 - "$out/results" "$threads" "$device" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = {}
for impl in ("deadbolt", "pytorch-dataloader", "pytorch-indexed"):
    v = [r["images_per_sec"] for r in rows if r["impl"] == impl]
    med[impl] = statistics.median(v)
    print(f"{impl:20s} {med[impl]:9.0f} images/s  (runs: {', '.join(f'{x:.0f}' for x in v)})")
print(f"device {sys.argv[3]}, threads {sys.argv[2]}")
for base in ("pytorch-dataloader", "pytorch-indexed"):
    print(f"ratio deadbolt / {base}: {med['deadbolt'] / med[base]:.2f}")
PY
