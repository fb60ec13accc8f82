#!/usr/bin/env bash
# `deadbolt experiment` vs the same steps in plain PyTorch, side by side, on
# the same MNIST IDX files and the spec's hyperparameters. PyTorch
# (bench/experiment_torch.py) trains the clean and the backdoored BadNet CNN,
# collects conv2 norms and sweeps l_inf pruning (k = 0..32, whole model per
# k); deadbolt does all of that plus Grad-CAM, the synthetic trigger and
# every criterion with the real and the synthetic trigger. Prints the wall
# times (medians of REPEATS=3 interleaved repeats), the per-stage timings
# and the figures of both (of the last repeat).
#   bench/experiment.sh [--spec FILE] [--out DIR] [--direct]
#     --direct: `deadbolt experiment --direct` (the core pipeline, no services)
set -euo pipefail
cd "$(dirname "$0")/.."
spec=examples/mnist-badnets.toml; out=runs/bench-experiment; direct=()
while [ $# -gt 0 ]; do
  case "$1" in
    --spec) spec=$2; shift 2;;
    --out) out=$2; shift 2;;
    --direct) direct=(--direct); shift;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
source scripts/env.sh
cargo build --release --quiet -p deadbolt-cli
bin=$PWD/target/release/deadbolt
[ -f data/mnist/train-images-idx3-ubyte ] || $bin data fetch-mnist --out data/mnist >/dev/null
rm -rf "$out"; mkdir -p "$out"
py=$DEADBOLT_VENV/bin/python
# the spec's hyperparameters, for the PyTorch run
read -r epochs lr momentum batch rate target seed < <($py - "$spec" <<'PY'
import sys, tomllib
s = tomllib.load(open(sys.argv[1], "rb")); t = s.get("training", {}); a = s["attack"]
print(t.get("epochs", 6), t.get("lr", 0.01), t.get("momentum", 0.9), t.get("batch_size", 64),
      a["rate"], a.get("target", 0), s.get("seed", 0))
PY
)
repeats=${REPEATS:-3}
echo "== pytorch (epochs $epochs, lr $lr, momentum $momentum, batch $batch, rate $rate, target $target) vs deadbolt experiment ${direct[*]}, $repeats interleaved repeats"
walls_torch=(); walls_db=()
for i in $(seq "$repeats"); do
  t0=$(date +%s.%N)
  $py bench/experiment_torch.py --data data/mnist --out "$out/torch" --epochs "$epochs" --lr "$lr" \
    --momentum "$momentum" --batch "$batch" --rate "$rate" --target "$target" --seed "$seed" >/dev/null
  t1=$(date +%s.%N)
  rm -rf "$out/deadbolt"
  $bin --quiet experiment "$spec" --out "$out/deadbolt" "${direct[@]}" >/dev/null
  t2=$(date +%s.%N)
  walls_torch+=("$(echo "$t1 - $t0" | bc)"); walls_db+=("$(echo "$t2 - $t1" | bc)")
  echo "repeat $i: pytorch ${walls_torch[-1]} s, deadbolt ${walls_db[-1]} s"
done
$py - "$out" "${walls_torch[*]}" "${walls_db[*]}" <<'PY'
import json, statistics, sys
out = sys.argv[1]
wt, wd = [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
wall_torch, wall_db = statistics.median(wt), statistics.median(wd)
print(f"medians of {len(wt)} interleaved repeats: pytorch {wall_torch:.1f} s [{min(wt):.1f}, {max(wt):.1f}], "
      f"deadbolt {wall_db:.1f} s [{min(wd):.1f}, {max(wd):.1f}]; per-repeat pytorch/deadbolt: "
      + ", ".join(f"{a / b:.2f}" for a, b in zip(wt, wd)))
t = json.load(open(f"{out}/torch/torch_report.json"))
d = json.load(open(f"{out}/deadbolt/report.json"))
dt = d.get("timings", {})
print(f"\n{'':28}{'pytorch':>12}{'deadbolt':>12}")
print(f"{'wall time, median (s)':28}{wall_torch:12.1f}{wall_db:12.1f}   ratio pytorch/deadbolt {wall_torch / wall_db:.2f}")
for tk, dk in [("train_clean", "train_clean"), ("train_backdoored", "train_backdoored"), ("stats", "stats"), ("prune_sweep", "prune_real")]:
    a, b = t["timings"].get(tk), dt.get(dk)
    fa = f"{a:12.2f}" if a is not None else f"{'-':>12}"
    fb = f"{b:12.2f}" if b is not None else f"{'-':>12}"
    print(f"{tk + ' (s)':28}{fa}{fb}")
print("  (deadbolt's prune stage sweeps every criterion of the spec; pytorch only linf)")
for m in ["clean_model", "backdoored_model"]:
    print(f"{m + ' acc/asr':28}{t[m]['acc']:6.3f}/{t[m]['asr']:.3f}{d[m]['acc']:6.3f}/{(d[m].get('asr') or 0):.3f}")
print(f"{'linf separation':28}{t['separation']['linf']:12.2f}{d['separation']['linf']['max_ratio']:12.2f}")
kt = t["pruning"]["linf"]["k_for_asr_5pct"]
kd = d["pruning"]["linf"].get("k_for_target_asr")
print(f"{'linf: k for test ASR<=5%':28}{str(kt):>12}{str(kd):>12}")
c = d["pruning"]["linf"]["chosen"]
print(f"deadbolt linf chosen on validation: k={c['k']} acc={c['acc']:.4f} asr={c['asr']:.4f} ra={c['ra']:.4f}")
PY
