#!/usr/bin/env bash
# The MNIST experiment through separate service processes (poisoner, trainer,
# analyzer, pruner, gateway: one `deadbolt serve` each, Postgres + the local
# artifact store, or S3 on moto_server with --s3) vs `deadbolt experiment`
# (all services in-process, SQLite + local files) vs `deadbolt experiment
# --direct` (the core pipeline, no services), one after the other in one
# run. Prints the wall times and the overhead of the services.
#   bench/services.sh [--spec FILE] [--s3]   (REPEATS=3 interleaved repeats; medians;
#   KEEP_LOGS=1 keeps the service processes' logs and outputs)
set -euo pipefail
cd "$(dirname "$0")/.."
spec=bench/services-bench.toml; s3=0
while [ $# -gt 0 ]; do
  case "$1" in
    --spec) spec=$2; shift 2;;
    --s3) s3=1; shift;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
scripts/setup.sh
source scripts/env.sh
# release, as deployed (deploy/Dockerfile): the services path does more
# Rust-side work (messages, files) than --direct, and a debug build inflates it
cargo build --quiet --release -p deadbolt-cli
bin=$PWD/target/release/deadbolt
$bin data fetch-mnist --out data/mnist >/dev/null
out=$(mktemp -d)
pids=(); svc_pids=()
db=deadbolt_bench_$$
pg_admin=${DEADBOLT_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql -q "$pg_admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  if [ -n "${KEEP_LOGS:-}" ]; then echo "logs kept in $out" >&2; else rm -rf "$out"; fi
}
trap cleanup EXIT
psql -q "$pg_admin" -c "CREATE DATABASE $db" >/dev/null
pg_url=${pg_admin%/*}/$db
artifacts=$out/artifacts
s3_conf=""
if [ "$s3" = 1 ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$DEADBOLT_VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >/dev/null 2>&1 & pids+=($!)
  for _ in $(seq 100); do curl -s "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
  curl -s -X PUT "http://127.0.0.1:$port/deadbolt" >/dev/null
  artifacts=s3://deadbolt/bench
  s3_conf=$(printf '[s3]\nendpoint = "http://127.0.0.1:%s"\nallow_http = true\nregion = "us-east-1"\naccess_key_id = "x"\nsecret_access_key = "x"\n' "$port")
fi

# separate processes; stage services first, then the gateway with their addresses
start() { # name services extra-config
  local name=$1 svcs=$2 extra=${3:-}
  mkdir -p "$out/work-$name"
  cat >"$out/$name.toml" <<TOML
database_url = "$pg_url"
artifact_url = "$artifacts"
work_dir = "$out/work-$name"
lease_secs = 30.0
heartbeat_secs = 2.0
# a local benchmark: one local team, the spec's local data path
auth = "none"
allow_local_paths = true
internal_token = "bench-internal-credential-$$"
$extra
$s3_conf
[listen]
poisoner = "127.0.0.1:0"
trainer = "127.0.0.1:0"
analyzer = "127.0.0.1:0"
pruner = "127.0.0.1:0"
gateway = "127.0.0.1:0"
TOML
  $bin serve --config "$out/$name.toml" --services "$svcs" >"$out/$name.out" 2>"$out/$name.log" &
  pids+=($!); svc_pids+=($!)
  for _ in $(seq 300); do grep -q "listening on" "$out/$name.out" 2>/dev/null && break; sleep 0.1; done
  ADDR=$(grep "listening on" "$out/$name.out" | awk '{print $4}')
  [ -n "$ADDR" ] || { echo "$name did not start:" >&2; tail -20 "$out/$name.log" >&2; exit 1; }
}
peers="[peers]"
for s in poisoner trainer analyzer pruner; do
  start "$s" "$s"
  peers="$peers
$s = [\"http://$ADDR\"]"
done
start gateway gateway "$peers"
gw=$ADDR

now() { python3 -c 'import time; print(time.time())'; }
# CPU seconds (user + system): the wall time of one run on a shared machine
# moves with what else runs there, the CPU it takes much less.
# servers_cpu: of the service processes so far; `times` (a builtin: no
# fork) records this shell's finished children, i.e. the client commands
servers_cpu() {
  python3 - "${svc_pids[@]}" <<'PY'
import os, sys
tck = os.sysconf("SC_CLK_TCK"); total = 0
for pid in sys.argv[1:]:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    total += int(f[11]) + int(f[12])
print(total / tck)
PY
}
# db_cpu: of the local Postgres server's processes (the database work of
# the processes path; SQLite's runs inside the in-process path's process):
# utime + stime of each, plus what their parents reaped of exited children
db_cpu() {
  python3 - <<'PY'
import os
tck = os.sysconf("SC_CLK_TCK"); total = 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        raw = open(f"/proc/{pid}/stat").read()
    except OSError:
        continue
    if "(postgres)" not in raw:
        continue
    f = raw.rsplit(")", 1)[1].split()
    total += sum(int(x) for x in f[11:15])
print(total / tck)
PY
}
children_cpu() { # times' second line: children's user and system time
  python3 -c 'import sys
l = open(sys.argv[1]).read().splitlines()[1].split()
f = lambda t: int(t.split("m")[0]) * 60 + float(t.split("m")[1].rstrip("s"))
print(f(l[0]) + f(l[1]))' "$1"
}
repeats=${REPEATS:-3}
times=$out/times.tsv
: >"$times"
# interleaved repeats: processes, in-process, direct, then again
for r in $(seq "$repeats"); do
  s0=$(servers_cpu); p0=$(db_cpu)
  t0=$(now)
  times >"$out/c0"
  # one client process, as each of the other two is (a process start loads
  # libtorch: about 0.3 s)
  submitted=$($bin --quiet submit "$spec" --gateway "http://$gw" --request-id "bench-$$-$r" --watch)
  times >"$out/c1"
  t1=$(now)
  s1=$(servers_cpu); p1=$(db_cpu)
  run=$(echo "$submitted" | head -1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["run_id"])')
  rm -rf "$out/inproc" "$out/direct"
  t1b=$(now)
  times >"$out/c2"
  $bin --quiet experiment "$spec" --out "$out/inproc" >/dev/null
  times >"$out/c3"
  t2=$(now)
  times >"$out/c4"
  $bin --quiet experiment "$spec" --out "$out/direct" --direct >/dev/null
  times >"$out/c5"
  t3=$(now)
  cp=$(python3 -c "print($s1 - $s0 + $(children_cpu "$out/c1") - $(children_cpu "$out/c0"))")
  ci=$(python3 -c "print($(children_cpu "$out/c3") - $(children_cpu "$out/c2"))")
  cd_=$(python3 -c "print($(children_cpu "$out/c5") - $(children_cpu "$out/c4"))")
  pg=$(python3 -c "print($p1 - $p0)")
  echo "$t0 $t1 $t1b $t2 $t3 $cp $ci $cd_ $pg" >>"$times"
  # each path's own stage timings of this repeat (outside the timed spans)
  rm -rf "$out/procs"
  $bin --quiet report "$run" --gateway "http://$gw" --config "$out/gateway.toml" --out "$out/procs" >/dev/null
  for k in procs inproc direct; do cp "$out/$k/report.json" "$out/report-$k-$r.json"; done
  echo "repeat $r: processes $(python3 -c "print(f'{$t1-$t0:.1f}')") s ($(python3 -c "print(f'{$cp:.1f}')") CPU s + Postgres $(python3 -c "print(f'{$pg:.1f}')")), in-process $(python3 -c "print(f'{$t2-$t1b:.1f}')") s ($(python3 -c "print(f'{$ci:.1f}')") CPU s), direct $(python3 -c "print(f'{$t3-$t2:.1f}')") s ($(python3 -c "print(f'{$cd_:.1f}')") CPU s)" >&2
done
python3 - "$times" "$out" <<'PY'
import json, statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
out = sys.argv[2]
keys = ["data", "train_clean", "train_backdoored", "analyze", "prune", "total"]
print("stage seconds, median over repeats " + " ".join(f"{k:>16}" for k in keys))
for k in ("procs", "inproc", "direct"):
    t = [json.load(open(f"{out}/report-{k}-{r + 1}.json"))["timings"] for r in range(len(rows))]
    print(f"{k:<34} " + " ".join(f"{statistics.median(x.get(s, float('nan')) for x in t):16.2f}" for s in keys))
P = [r[1] - r[0] for r in rows]; I = [r[3] - r[2] for r in rows]; D = [r[4] - r[3] for r in rows]
CP = [r[5] for r in rows]; CI = [r[6] for r in rows]; CD = [r[7] for r in rows]
procs, inproc, direct = statistics.median(P), statistics.median(I), statistics.median(D)
spread = lambda v: f"[{min(v):.1f}, {max(v):.1f}]"
print(f"{len(rows)} interleaved repeats; medians, [min, max]:")
print(f"  processes {procs:.1f} s {spread(P)}  in-process {inproc:.1f} s {spread(I)}  direct {direct:.1f} s {spread(D)}")
print(f"  CPU seconds (user + system, every deadbolt process of the path): processes {statistics.median(CP):.1f} {spread(CP)}  in-process {statistics.median(CI):.1f} {spread(CI)}  direct {statistics.median(CD):.1f} {spread(CD)}")
PG = [r[8] for r in rows]
print(f"  and the Postgres server's CPU seconds during the processes path: {statistics.median(PG):.2f} {spread(PG)}")
med = lambda a, b: statistics.median(x / y for x, y in zip(a, b))
print(f"  median of the per-repeat ratios to direct: wall processes {med(P, D):.3f}, in-process {med(I, D):.3f}; CPU processes {med(CP, CD):.3f} (with Postgres {med([c + g for c, g in zip(CP, PG)], CD):.3f}), in-process {med(CI, CD):.3f}")
print(f"  per repeat, processes/direct: {', '.join(f'{p/d:.3f}' for p, d in zip(P, D))}; in-process/direct: {', '.join(f'{i/d:.3f}' for i, d in zip(I, D))}")
a = json.load(open(f"{out}/inproc/report.json"))
b = json.load(open(f"{out}/direct/report.json"))
print(f"separate service processes (postgres): {procs:8.1f} s  overhead vs in-process {100*(procs/inproc-1):+.1f}%  vs direct {100*(procs/direct-1):+.1f}%")
print(f"deadbolt experiment (in-process)      : {inproc:8.1f} s  overhead vs direct {100*(inproc/direct-1):+.1f}%")
print(f"deadbolt experiment --direct (no services): {direct:6.1f} s")
print("figures in-process vs direct: clean acc", a["clean_model"]["acc"], b["clean_model"]["acc"],
      "| linf chosen", a["pruning"]["linf"]["chosen"], b["pruning"]["linf"]["chosen"])
PY
