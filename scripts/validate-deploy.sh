#!/usr/bin/env bash
# Offline checks of the deployment files (no Docker engine or cluster here),
# run by scripts/test.sh (CI). Installs its tools first
# (scripts/setup-deploy-deps.sh: kubectl with kustomize, kubernetes-validate,
# promtool), then scripts/validate_deploy.py checks:
#   - deploy/k8s: both overlays (cpu, gpu) rendered with `kubectl kustomize`;
#     built-in objects against the Kubernetes API schemas (strict), KEDA and
#     Prometheus Operator objects against the vendored deploy/k8s/schemas;
#     securityContext / resources / Secrets / NetworkPolicies / drain /
#     headless peers / metrics / KEDA / GPU / PDB rules;
#   - deploy/prometheus: promtool check rules, test rules, check config;
#   - deploy/grafana: the dashboard and its provisioning; its SQL and the
#     KEDA queries planned on the migrated schema (when Postgres is up);
#   - docker-compose.yml: only the gateway port published, credentials from
#     the env file, hardened containers.
# Idempotent; a few seconds once the tools are installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
"$root/scripts/setup-deploy-deps.sh"
venv="${DEADBOLT_DEPLOY_VENV:-$DEADBOLT_CACHE/venv-deploy}"
export DEADBOLT_KUBECTL="$venv/bin/kubectl"
"$venv/bin/python" "$root/scripts/validate_deploy.py" "$root"
echo "deploy manifests ok"
