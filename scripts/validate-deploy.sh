#!/usr/bin/env bash
# Offline checks of the deployment files (no Docker engine or cluster here):
# the Kubernetes manifests against the API schemas (kubernetes-validate,
# strict), and docker-compose.yml for structure: every deadbolt service runs
# `serve --services <itself>` and listens on the port its peers point at.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
"$DEADBOLT_VENV/bin/kubernetes-validate" --strict --quiet "$root"/deploy/k8s/*.yaml
"$DEADBOLT_VENV/bin/python" - "$root/docker-compose.yml" <<'PY'
import re, sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
svcs = doc["services"]
stages = ["poisoner", "trainer", "analyzer", "pruner", "gateway"]
for s in stages:
    assert s in svcs, f"docker-compose.yml: no service {s}"
    c = svcs[s]
    assert c["command"] == ["serve", "--services", s], f"{s}: command {c['command']}"
    env = c["environment"]
    listen = env[f"DEADBOLT_{s.upper()}_LISTEN"]
    port = listen.rsplit(":", 1)[1]
    if s != "gateway":
        peer = env[f"DEADBOLT_{s.upper()}_PEERS"]
        assert peer == f"http://{s}:{port}", f"{s}: peers {peer} vs listen {listen}"
    for k in ("DEADBOLT_DATABASE_URL", "DEADBOLT_ARTIFACT_URL"):
        assert k in env, f"{s}: missing {k}"
print("docker-compose.yml ok")
PY
echo "deploy manifests ok"
