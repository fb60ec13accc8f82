#!/usr/bin/env bash
# Scenario matrix for `deadbolt scan` and `deadbolt repair` on models
# deadbolt did not train (not run in CI; about 1-3 minutes per scenario on
# 2 CPU cores).
#
# For every scenario, scripts/byom_torch.py trains a small CNN *in PyTorch*
# on the real MNIST digits (8,000 training images), backdoored with a patch
# (solid, checkerboard or random binary; various sizes, positions, targets,
# poisoning rates and training seeds), a blended noise trigger or an
# all-to-all patch, or not at all (clean models: the scan must not say
# `backdoored`). The MNIST test split is divided into the defender's clean
# set (1,000 images: what scan and repair see) and a test set (the rest:
# never seen by deadbolt). Then:
#   deadbolt scan   MODEL --data defender      -> verdict, suspect label
#   deadbolt repair MODEL --data defender      -> repaired model, k
#   byom_torch.py evaluate (PyTorch, strict load_state_dict) on the test set
#     with the real trigger               -> ACC and ASR before and after
# A repair succeeds when, on the test set, ASR <= 5% and ACC dropped <= 2
# points. Prints one line per scenario and the totals, and writes
# OUT/matrix.tsv.
#
# usage: scripts/scenario-matrix.sh [OUT] [--only ID[,ID...]]
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
out="${1:-$root/runs/scenario-matrix}"
only="${3:-}"
[ "${2:-}" = "--only" ] || only=""
source "$here/env.sh"
py="$DEADBOLT_VENV/bin/python"
[ -x "$py" ] || "$here/setup.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
(cd "$root" && cargo build -q -p deadbolt-cli)
mkdir -p "$out"
# a copy, so that a rebuild while the matrix runs does not change it midway
cp "$CARGO_TARGET_DIR/debug/deadbolt" "$out/deadbolt"
bin="$out/deadbolt"
mnist="${DEADBOLT_DATA_DIR:-$root/data}/mnist"
[ -f "$mnist/t10k-images-idx3-ubyte" ] || "$bin" data fetch-mnist --out "$mnist" >/dev/null
threads="${THREADS:-2}"
mkdir -p "$out"
[ -f "$out/data/test/t10k-images-idx3-ubyte" ] ||
  "$py" "$here/byom_torch.py" prepare --mnist "$mnist" --out "$out/data" --defender 1000 >/dev/null

# id | kind | trigger | size | row | col | target | rate | seed | mode
scenarios='
p01 patch random       4  3 12 3 0.10 0 all-to-one
p02 patch random       4  3 12 3 0.10 1 all-to-one
p03 patch solid        3 25 25 0 0.10 2 all-to-one
p04 patch checkerboard 4 12  2 7 0.10 0 all-to-one
p05 patch checkerboard 3 22 12 1 0.05 1 all-to-one
p06 patch random       5 20 20 5 0.05 2 all-to-one
p07 patch solid        4  2  2 9 0.10 3 all-to-one
p08 patch random       3 13 13 2 0.10 3 all-to-one
p09 patch checkerboard 4  0 24 6 0.10 4 all-to-one
p10 patch solid        3 12 24 4 0.05 4 all-to-one
p11 patch random       4 24  4 8 0.10 5 all-to-one
p12 patch checkerboard 5  3  3 0 0.02 5 all-to-one
p13 patch random       4  6 20 1 0.02 6 all-to-one
p14 patch solid        2 25 25 3 0.10 6 all-to-one
p15 patch random       4  3 12 3 0.20 7 all-to-one
p16 patch checkerboard 4 18  6 5 0.10 7 all-to-one
b01 blend  blend       0  0  0 0 0.10 0 all-to-one
a01 a2a    random      4  3 12 0 0.10 0 all-to-all
c01 clean  random      4  3 12 3 0.00 0 all-to-one
c02 clean  random      4  3 12 3 0.00 1 all-to-one
c03 clean  random      4  3 12 3 0.00 2 all-to-one
'

tsv="$out/matrix.tsv"
printf 'id\tkind\ttrigger\tsize\tpos\ttarget\trate\tseed\tacc\tasr\tverdict\tsuspect\tanomaly\tk\tclaimed\tacc_after\tasr_after\tsuccess\tseconds\n' >"$tsv"
printf '%-4s %-6s %-12s %4s %-7s %3s %5s %4s | %6s %6s | %-12s %3s %5s | %3s %-5s %6s %6s %s\n' \
  id kind trigger size pos tgt rate seed acc asr verdict lbl anom k met acc2 asr2 success
while read -r id kind trig size row col target rate seed mode; do
  [ -n "$id" ] || continue
  if [ -n "$only" ] && [[ ",$only," != *",$id,"* ]]; then continue; fi
  d="$out/$id"
  t0=$(date +%s)
  if [ ! -f "$d/model/metrics.json" ]; then
    "$py" "$here/byom_torch.py" train --mnist "$mnist" --test "$out/data/test" --out "$d/model" \
      --trigger "$trig" --size "$size" --row "$row" --col "$col" --target "$target" \
      --rate "$rate" --seed "$seed" --mode "$mode" --threads "$threads" >/dev/null
  fi
  "$bin" --quiet scan "$d/model/model.safetensors" --data "$out/data/defender" --out "$d/scan" \
    --threads "$threads" >"$d/scan.json" 2>"$d/scan.log" || echo "scan failed: see $d/scan.log"
  claimed=- acc2=- asr2=- k=- success=-
  if [ "$kind" != clean ]; then
    if "$bin" --quiet repair "$d/model/model.safetensors" --data "$out/data/defender" --out "$d/repair" \
      --no-verify --threads "$threads" >"$d/repair.json" 2>"$d/repair.log"; then
      "$py" "$here/byom_torch.py" evaluate --model "$d/repair/model.safetensors" --card "$d/repair/card.toml" \
        --data "$out/data/test" --trigger "$d/model/trigger.safetensors" --target "$target" --mode "$mode" \
        --threads "$threads" >"$d/evaluate.json"
    else
      echo "repair failed: see $d/repair.log"
    fi
  fi
  secs=$(( $(date +%s) - t0 ))
  python3 - "$d" "$kind" "$id" "$trig" "$size" "$row" "$col" "$target" "$rate" "$seed" "$secs" "$tsv" <<'PY'
import json, os, sys
d, kind, id_, trig, size, row, col, target, rate, seed, secs, tsv = sys.argv[1:]
load = lambda f: json.load(open(os.path.join(d, f))) if os.path.exists(os.path.join(d, f)) and os.path.getsize(os.path.join(d, f)) else None
m, s, r, e = load("model/metrics.json"), load("scan.json"), load("repair.json"), load("evaluate.json")
verdict = s["verdict"] if s else "error"
suspect = (s["suspect_labels"] or ["-"])[0] if s else "-"
anom = max(s["anomaly_index"]) if s else float("nan")
k = r["k"] if r else "-"
claimed = ("yes" if r["met"] else "no") if r else "-"
acc2 = e["acc"] if e else None
asr2 = e.get("asr") if e else None
if kind == "clean":
    success = "-"
elif e is None:
    success = "error"
else:
    success = "yes" if (asr2 <= 0.05 and m["acc"] - acc2 <= 0.02) else "no"
pos = f"{row},{col}" if trig != "blend" else "-"
f = lambda v: f"{100*v:6.2f}" if isinstance(v, float) else f"{'-':>6}"
print(f"{id_:<4} {kind:<6} {trig:<12} {size:>4} {pos:<7} {target:>3} {rate:>5} {seed:>4} | {f(m['acc'])} {f(m['asr'])} | "
      f"{verdict:<12} {str(suspect):>3} {anom:5.2f} | {str(k):>3} {claimed:<5} {f(acc2)} {f(asr2)} {success}  ({secs} s)", flush=True)
with open(tsv, "a") as out:
    out.write("\t".join(str(v) for v in [id_, kind, trig, size, pos, target, rate, seed, m["acc"], m["asr"], verdict,
                                          suspect, anom, k, claimed, acc2, asr2, success, secs]) + "\n")
PY
done <<<"$scenarios"

python3 - "$tsv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
def line(name, rs, verdict_ok):
    if not rs:
        return
    flagged = sum(verdict_ok(r) for r in rs)
    rep = [r for r in rs if r["kind"] != "clean"]
    ok = sum(r["success"] == "yes" for r in rep)
    claimed = sum(r["claimed"] == "yes" for r in rep)
    honest = sum((r["claimed"] == "yes") <= (r["success"] == "yes") for r in rep)
    s = f"{name:<22} {len(rs):>2} scenarios: scan right {flagged}/{len(rs)}"
    if rep:
        s += f"; repaired (test ASR <= 5%, drop <= 2) {ok}/{len(rep)}; deadbolt claimed success {claimed}, " \
             f"claims backed by the test figures {honest}/{len(rep)}"
    print(s)
patch = [r for r in rows if r["kind"] == "patch"]
right_label = lambda r: r["verdict"] == "backdoored" and r["suspect"] == r["target"]
print()
line("patch (all-to-one)", patch, right_label)
line("blended", [r for r in rows if r["kind"] == "blend"], right_label)
line("all-to-all", [r for r in rows if r["kind"] == "a2a"], lambda r: r["verdict"] == "backdoored")
line("clean models", [r for r in rows if r["kind"] == "clean"], lambda r: r["verdict"] != "backdoored")
PY
