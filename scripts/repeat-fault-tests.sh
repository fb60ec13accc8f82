#!/usr/bin/env bash
# Repeats the process-level fault tests N times each (not in CI: minutes
# per repetition) and prints how many passed:
#   scripts/repeat-fault-tests.sh [N=10] [N_OTHERS=N]
# services_fault (kill -9 a trainer mid-training) N times;
# services_zombie (SIGSTOP past the lease, SIGCONT after the takeover),
# services_pause_in_fence (a trainer stopped by a failpoint between a
# fenced write's row lock and its COMMIT) and services_drain (SIGTERM
# mid-training) N_OTHERS times. Each test checks
# itself for lost or duplicated rows and for figures equal to an
# uninterrupted run's; a failing repetition's output is kept under
# target/repeat-fault-tests/.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
n_fault=${1:-10}
n_others=${2:-$n_fault}
scripts/setup.sh
scripts/setup-test-deps.sh
source scripts/env.sh
cargo build --quiet -p deadbolt-cli --tests || exit 1
logs=target/repeat-fault-tests
mkdir -p "$logs"
summary=()
for spec in "services_fault:$n_fault" "services_zombie:$n_others" "services_pause_in_fence:$n_others" "services_drain:$n_others"; do
  t=${spec%%:*}; n=${spec##*:}
  pass=0
  for i in $(seq "$n"); do
    if cargo test --quiet -p deadbolt-cli --test "$t" -- --nocapture >"$logs/$t-$i.log" 2>&1; then
      pass=$((pass + 1)); rm -f "$logs/$t-$i.log"
      echo "$t run $i: ok" >&2
    else
      echo "$t run $i: FAILED (see $logs/$t-$i.log)" >&2
    fi
  done
  summary+=("$t: $pass/$n passed")
done
printf '%s\n' "${summary[@]}"
