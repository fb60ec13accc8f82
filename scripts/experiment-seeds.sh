#!/usr/bin/env bash
# Spread of `deadbolt experiment` over training seeds (not run in CI; about
# 1 minute per seed on 2 CPU cores): the default spec
# (examples/mnist-badnets.toml) with `seed` = each of SEEDS and
# `defense.fine_tune_epochs` = EPOCHS (0: k chosen on the pruning-only
# validation curve; > 0: k chosen with the fine-tuning in the loop, as
# `deadbolt repair` does). Prints, per seed and for l_inf ranked with the
# real and with the synthetic trigger: k, test ACC/ASR of the delivered
# model (fine-tuned when EPOCHS > 0) and whether it met ASR <= 5% at an ACC
# drop <= 2 points against the backdoored model; then the totals.
#
# usage: scripts/experiment-seeds.sh [EPOCHS] [SEEDS] [OUT]
#   e.g. scripts/experiment-seeds.sh 2 "0 1 2 3 4 5" runs/seeds
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
epochs="${1:-2}"
seeds="${2:-0 1 2 3 4 5}"
out="${3:-$root/runs/experiment-seeds-ft$epochs}"
source "$here/env.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
(cd "$root" && cargo build -q -p deadbolt-cli)
bin="$CARGO_TARGET_DIR/debug/deadbolt"
py="$DEADBOLT_VENV/bin/python"
mkdir -p "$out"
for seed in $seeds; do
  d="$out/seed-$seed"
  if [ ! -f "$d/report.json" ]; then
    # the first `seed = 0` is the experiment's (training) seed
    sed -e "0,/^seed = 0$/s//seed = $seed/" \
      -e "s/^fine_tune_epochs = 0$/fine_tune_epochs = $epochs/" \
      "$root/examples/mnist-badnets.toml" >"$out/spec-$seed.toml"
    "$bin" --quiet experiment "$out/spec-$seed.toml" --out "$d" --direct >/dev/null 2>"$out/seed-$seed.log"
  fi
done
"$py" - "$out" $seeds <<'PY'
import json, sys
out, seeds = sys.argv[1], sys.argv[2:]
met = {"pruning": 0, "pruning_synthetic": 0}
print(f"{'seed':>4} {'ranked':>9} {'k':>3} {'acc0':>7} {'acc':>7} {'asr':>7} {'met':>4}  tried")
for s in seeds:
    r = json.load(open(f"{out}/seed-{s}/report.json"))
    base = r["backdoored_model"]["acc"]
    for t in met:
        c = r[t]["linf"]
        p = c.get("fine_tuned") or c["chosen"]
        ok = p["asr"] <= 0.05 and base - p["acc"] <= 0.02 + 1e-12
        met[t] += ok
        tried = [x["k"] for x in (c.get("fine_tune_search") or {}).get("candidates", [])]
        print(f"{s:>4} {c['ranked_with']:>9} {p['k']:>3} {100*base:6.2f}% {100*p['acc']:6.2f}% {100*p['asr']:6.2f}% {'yes' if ok else 'no':>4}  {tried}")
for t, n in met.items():
    print(f"linf ranked with the {'real' if t == 'pruning' else 'synthetic'} trigger: met on {n}/{len(seeds)} seeds")
PY
