#!/usr/bin/env python3
"""Offline checks of deadbolt's deployment files (run by scripts/validate-deploy.sh).

No cluster, Docker engine or Grafana server runs here, so everything is
checked from the files:

kubernetes  both overlays rendered with `kubectl kustomize`; every built-in
            object validated strictly against the Kubernetes API schemas
            (kubernetes-validate), every custom resource (KEDA, Prometheus
            Operator) against the schemas vendored in deploy/k8s/schemas (and
            the schemas shown to reject broken objects); then the rules of the
            hardened deployment: securityContext and resources of every
            container, credentials only from Secrets, NetworkPolicies (only the
            gateway reaches the stage services' gRPC ports, Postgres and the
            object store only from deadbolt), drain grace periods, headless
            peers, metrics ports, KEDA targets, GPU scheduling, PDBs; and the
            identities: every stage mounts its own TLS Secret (never the
            gateway's, never another stage's), the gateway its public and
            its client certificate, each pod its database role
            (deploy/postgres/20-roles.sql) with DEADBOLT_MIGRATE=false, the
            migrate Job the schema owner's (the checks shown to reject
            broken copies of the rendered overlay).
sql         the KEDA queries and the dashboard's SQL planned (EXPLAIN) against
            a scratch database migrated with migrations/postgres, when a
            Postgres server is reachable (DEADBOLT_TEST_PG_URL); the end-to-end
            test crates/deadbolt-cli/tests/dashboard_queries.rs runs them on
            real data.
prometheus  promtool check rules / test rules / check config; the dashboard's
            PromQL checked by promtool too; every deadbolt_* metric named in
            rules and dashboard exists in crates/deadbolt-runtime/src/metrics.rs.
grafana     dashboard structure, data source uids provisioned, variables.
compose     docker-compose.yml: only the gateway port published, credentials
            only from the env file (deploy/compose.env.example defines them),
            hardened deadbolt containers, mounted files exist.
images      images by role: deploy/Dockerfile builds `deadbolt` (target
            worker, the default: libtorch) and `deadbolt-gateway` (target
            gateway: deadbolt built with --no-default-features, no libtorch,
            no Python), both non-root with the metrics port; the gateway
            Deployment and compose service run the gateway image, every
            other workload the worker image (the checks shown to reject
            broken copies).

Prints one line per area and exits 1 listing every failure.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
KUBECTL = os.environ.get("DEADBOLT_KUBECTL", "kubectl")
PROMTOOL = os.environ.get("DEADBOLT_PROMTOOL", "promtool")
K8S_VERSION = os.environ.get("DEADBOLT_K8S_VERSION", "1.30.0")

SERVICES = ["gateway", "poisoner", "trainer", "analyzer", "pruner"]
STAGE_SERVICES = ["poisoner", "trainer", "analyzer", "pruner"]
GPU_SERVICES = ["trainer", "analyzer", "pruner"]
PORTS = {"gateway": 50060, "poisoner": 50061, "trainer": 50062, "analyzer": 50063, "pruner": 50064}
METRICS_PORT = 9464
# env var names that hold credentials: they must come from a Secret
CREDENTIAL = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY$|DATABASE_URL)", re.I)
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}

failures: list[str] = []


def fail(area: str, msg: str) -> None:
    failures.append(f"{area}: {msg}")


def check(area: str, cond: bool, msg: str) -> bool:
    if not cond:
        fail(area, msg)
    return cond


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# --------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------

def load_crd_schemas() -> dict[tuple[str, str], dict]:
    out = {}
    for p in sorted((ROOT / "deploy/k8s/schemas").glob("*.json")):
        s = json.loads(p.read_text())
        jsonschema.Draft7Validator.check_schema(s)
        api = s["properties"]["apiVersion"]["const"]
        kind = s["properties"]["kind"]["const"]
        out[(api, kind)] = s
    return out


def validate_object(area: str, doc: dict, crds: dict) -> None:
    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    name = f"{kind}/{doc.get('metadata', {}).get('name')}"
    group = api.split("/")[0] if "/" in api else ""
    if (api, kind) in crds:
        errs = sorted(jsonschema.Draft7Validator(crds[(api, kind)]).iter_errors(doc), key=str)
        for e in errs:
            fail(area, f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
    elif "." in group and not group.endswith(".k8s.io"):
        fail(area, f"{name}: custom resource {api} without a vendored schema in deploy/k8s/schemas")
    else:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(area, f"{name}: {'/'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            fail(area, f"{name}: no schema: {e}")


def schemas_bite(crds: dict, docs: list[dict]) -> None:
    """The validators reject broken objects (else a green check means nothing)."""
    area = "schemas"
    def rejected(doc: dict) -> bool:
        before = len(failures)
        validate_object(area, doc, crds)
        bad = len(failures) > before
        del failures[before:]
        return bad
    so = next(d for d in docs if d["kind"] == "ScaledObject")
    pm = next(d for d in docs if d["kind"] == "PodMonitor")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    check(area, not rejected(so) and not rejected(pm) and not rejected(dep), "a valid object is rejected")
    broken = []
    b = copy.deepcopy(so); del b["spec"]["triggers"]; broken.append(("ScaledObject without triggers", b))
    b = copy.deepcopy(so); b["spec"]["minReplicas"] = b["spec"].pop("minReplicaCount", 0)
    broken.append(("ScaledObject with minReplicas", b))
    b = copy.deepcopy(so); b["spec"]["triggers"][0]["metadata"]["targetQueryValue"] = 1
    broken.append(("ScaledObject with a numeric trigger metadata value", b))
    b = copy.deepcopy(pm); del b["spec"]["selector"]; broken.append(("PodMonitor without selector", b))
    b = copy.deepcopy(pm); b["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    broken.append(("PodMonitor with a bad interval", b))
    b = copy.deepcopy(dep); b["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    broken.append(("Deployment with a misspelt field", b))
    b = copy.deepcopy(dep); b["spec"]["replicas"] = "two"
    broken.append(("Deployment with a string replica count", b))
    for what, doc in broken:
        check(area, rejected(doc), f"{what} passes validation")


def labels_match(selector: dict, labels: dict) -> bool:
    """Does a LabelSelector (matchLabels + matchExpressions) select these labels?"""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        k, op, vals = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and labels.get(k) in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def pod_labels(component: str) -> dict:
    return {"app.kubernetes.io/name": "deadbolt", "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": "deadbolt"}


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def workloads(docs: list[dict]):
    """(KIND/NAME, doc) of every workload (Deployment, Job, ...)."""
    return ((f"{d['kind']}/{d['metadata']['name']}", d) for d in docs if d["kind"] in WORKLOADS)


def is_gateway(d: dict) -> bool:
    return d["kind"] == "Deployment" and d["metadata"]["name"] == "gateway"


def env_of(container: dict, configmaps: dict) -> dict:
    """A container's environment: its ConfigMap envFrom, then its env values."""
    env = {}
    for ef in container.get("envFrom") or []:
        if "configMapRef" in ef:
            env.update(configmaps.get(ef["configMapRef"]["name"], {}))
    for e in container.get("env") or []:
        if "value" in e:
            env[e["name"]] = e["value"]
    return env


def check_workloads(area: str, docs: list[dict], secrets: dict) -> None:
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d["kind"] == "ConfigMap"}
    for name, data in configmaps.items():
        for k, v in data.items():
            # a path to a mounted Secret file (DEADBOLT_TLS_KEY) is not a credential
            path_to_secret = str(v).startswith("/etc/deadbolt/tls/")
            check(area, path_to_secret or not CREDENTIAL.search(k),
                  f"ConfigMap {name} holds credential {k}")
    for wname, d in workloads(docs):
        ps = pod_spec(d)
        psc = ps.get("securityContext") or {}
        check(area, ps.get("automountServiceAccountToken") is False, f"{wname}: mounts a service account token")
        check(area, (psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
              f"{wname}: pod seccompProfile is not RuntimeDefault")
        vols = {v["name"]: v for v in ps.get("volumes") or []}
        for c in (ps.get("initContainers") or []) + ps["containers"]:
            cname = f"{wname}/{c['name']}"
            sc = c.get("securityContext") or {}
            non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
            uid = sc.get("runAsUser", psc.get("runAsUser"))
            check(area, non_root is True, f"{cname}: runAsNonRoot is not true")
            check(area, uid is None or uid != 0, f"{cname}: runs as uid 0")
            check(area, sc.get("readOnlyRootFilesystem") is True, f"{cname}: root filesystem not read-only")
            check(area, sc.get("allowPrivilegeEscalation") is False, f"{cname}: privilege escalation allowed")
            check(area, sc.get("privileged") is not True, f"{cname}: privileged")
            check(area, "ALL" in ((sc.get("capabilities") or {}).get("drop") or []),
                  f"{cname}: capabilities not dropped (drop: [ALL])")
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    check(area, r in (res.get(kind) or {}), f"{cname}: no {r} {kind}")
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
            check(area, "/tmp" in mounts and "emptyDir" in vols.get(mounts.get("/tmp"), {}),
                  f"{cname}: no emptyDir at /tmp (the root filesystem is read-only)")
            env = env_of(c, configmaps)
            work = env.get("DEADBOLT_WORK_DIR")
            if work:
                check(area, any(work == m or work.startswith(m.rstrip("/") + "/") for m in mounts),
                      f"{cname}: DEADBOLT_WORK_DIR {work} is not on a mounted volume")
            secret_dirs = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts") or []
                           if "secret" in vols.get(m["name"], {})]
            for e in c.get("env") or []:
                # a path to a file of a mounted Secret (DEADBOLT_TLS_CLIENT_KEY) is not a credential
                in_secret = any(str(e.get("value", "")).startswith(s) for s in secret_dirs)
                if CREDENTIAL.search(e["name"]) and not in_secret:
                    check(area, "secretKeyRef" in (e.get("valueFrom") or {}),
                          f"{cname}: credential {e['name']} not from a Secret")
            for ef in c.get("envFrom") or []:
                if "secretRef" in ef:
                    check(area, ef["secretRef"]["name"] in secrets,
                          f"{cname}: Secret {ef['secretRef']['name']} is not in secrets.example.yaml")
            for v in vols.values():
                if "secret" in v:
                    check(area, v["secret"]["secretName"] in secrets,
                          f"{wname}: volume Secret {v['secret']['secretName']} is not in secrets.example.yaml")
        if d["kind"] == "Deployment":
            c = ps["containers"][0]
            env = env_of(c, configmaps)
            drain = float(env.get("DEADBOLT_DRAIN_SECS", 30))
            grace = ps.get("terminationGracePeriodSeconds", 30)
            # the process drains for drain_secs, then waits up to 10 s for
            # its workers and 5 s for the gateway's runs (crates/deadbolt-cli/src/serve.rs)
            check(area, grace > drain + 15,
                  f"{wname}: terminationGracePeriodSeconds {grace} <= drain_secs {drain} + 15")
            check(area, "readinessProbe" in c, f"{wname}: no readiness probe")
            svc = d["metadata"]["name"]
            if svc in PORTS:
                port = PORTS[svc]
                check(area, c.get("args") == ["serve", "--services", svc], f"{wname}: args {c.get('args')}")
                listen = env.get(f"DEADBOLT_{svc.upper()}_LISTEN", "")
                check(area, listen.endswith(f":{port}"), f"{wname}: listens on {listen!r}, not :{port}")
                cports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
                check(area, cports.get("grpc") == port, f"{wname}: grpc containerPort {cports.get('grpc')}")
                check(area, cports.get("metrics") == METRICS_PORT, f"{wname}: no metrics port {METRICS_PORT}")
                check(area, env.get("DEADBOLT_METRICS_LISTEN", "").endswith(f":{METRICS_PORT}"),
                      f"{wname}: DEADBOLT_METRICS_LISTEN is not :{METRICS_PORT}")
                ann = d["spec"]["template"]["metadata"].get("annotations") or {}
                check(area, ann.get("prometheus.io/port") == str(METRICS_PORT),
                      f"{wname}: no prometheus.io/port annotation")
                check(area, (c.get("readinessProbe") or {}).get("tcpSocket", {}).get("port") == port,
                      f"{wname}: readiness probe is not on port {port}")
                # TLS: certificate and key configured, peers over https, the
                # TLS Secret mounted (and required)
                check(area, env.get("DEADBOLT_TLS_CERT", "").startswith("/etc/deadbolt/tls/")
                      and env.get("DEADBOLT_TLS_KEY", "").startswith("/etc/deadbolt/tls/"),
                      f"{wname}: no TLS certificate and key (DEADBOLT_TLS_CERT/KEY)")
                check(area, env.get("DEADBOLT_PLAINTEXT", "false") != "true",
                      f"{wname}: serves plaintext")
                for peer in ("POISONER", "TRAINER", "ANALYZER", "PRUNER"):
                    urls = env.get(f"DEADBOLT_{peer}_PEERS", "")
                    check(area, urls.startswith("https://"), f"{wname}: {peer} peers {urls!r} not https")
                vols = {v["name"]: v for v in ps.get("volumes") or []}
                tls = (vols.get("tls") or {}).get("secret") or {}
                check(area, tls.get("secretName") == f"deadbolt-tls-{svc}" and not tls.get("optional"),
                      f"{wname}: its own TLS Secret deadbolt-tls-{svc} is not mounted as required")


# The Secrets that only the gateway may read: its public certificate and the
# client certificate it calls the stages with.
GATEWAY_TLS_SECRETS = {"deadbolt-tls-gateway", "deadbolt-tls-gateway-client"}
# The database Secret and role of each kind of workload (deploy/postgres/20-roles.sql).
DB_SECRETS = {"gateway": ("deadbolt-db-gateway", "deadbolt_gateway"),
              "stage": ("deadbolt-db-stage", "deadbolt_stage"),
              "migrate": ("deadbolt-db-migrate", "deadbolt_migrate")}


def secret_mounts(d: dict) -> dict[str, str]:
    """A workload's Secret volumes as its containers mount them: mount path -> Secret name."""
    ps = pod_spec(d)
    vols = {v["name"]: (v.get("secret") or {}).get("secretName") for v in ps.get("volumes") or []}
    out = {}
    for c in (ps.get("initContainers") or []) + ps["containers"]:
        for m in c.get("volumeMounts") or []:
            if vols.get(m["name"]):
                out[m["mountPath"].rstrip("/")] = vols[m["name"]]
    return out


def secrets_read(d: dict) -> set[str]:
    """Every Secret a workload reads: volumes (projected too), envFrom, env valueFrom."""
    ps = pod_spec(d)
    names = set()
    for v in ps.get("volumes") or []:
        names.add((v.get("secret") or {}).get("secretName"))
        for src in (v.get("projected") or {}).get("sources") or []:
            names.add((src.get("secret") or {}).get("name"))
    for c in (ps.get("initContainers") or []) + ps["containers"]:
        for ef in c.get("envFrom") or []:
            names.add((ef.get("secretRef") or {}).get("name"))
        for e in c.get("env") or []:
            names.add(((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name"))
    return {n for n in names if n}


def check_identities(area: str, docs: list[dict], secrets: dict) -> None:
    """Every stage Deployment mounts its own TLS Secret (never the gateway's,
    never another stage's); the gateway its public certificate plus a
    separate client certificate for calling the stages; each kind of pod
    connects as its database role (the stages' cannot read api_keys) without
    DDL (DEADBOLT_MIGRATE=false); only the migrate Job as the schema owner."""
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d["kind"] == "ConfigMap"}
    deps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    own_tls: dict[str, str] = {}
    for s in SERVICES:
        d = deps.get(s)
        if d is None:
            continue
        wname = f"Deployment/{s}"
        mounts = secret_mounts(d)
        used = secrets_read(d)
        env = env_of(pod_spec(d)["containers"][0], configmaps)
        mine = mounts.get("/etc/deadbolt/tls")
        own_tls[s] = mine or ""
        check(area, mine == f"deadbolt-tls-{s}",
              f"{wname}: mounts {mine!r} at /etc/deadbolt/tls, not its own deadbolt-tls-{s}")
        check(area, "DEADBOLT_TLS_DOMAIN" not in env,
              f"{wname}: DEADBOLT_TLS_DOMAIN overrides the per-service server names")
        for k, v in env.items():
            if k.startswith("DEADBOLT_TLS_") and k != "DEADBOLT_TLS_DOMAIN":
                check(area, any(str(v).startswith(m + "/") for m in mounts),
                      f"{wname}: {k}={v} is not a file of a mounted Secret")
        check(area, env.get("DEADBOLT_MIGRATE") == "false",
              f"{wname}: DEADBOLT_MIGRATE is not \"false\" (only the migrate Job runs DDL)")
        if s in STAGE_SERVICES:
            check(area, not (used & GATEWAY_TLS_SECRETS),
                  f"{wname}: a stage reads the gateway's certificate Secret {sorted(used & GATEWAY_TLS_SECRETS)}")
            others = {f"deadbolt-tls-{o}" for o in SERVICES if o != s}
            check(area, not (used & others), f"{wname}: reads another service's TLS Secret {sorted(used & others)}")
            check(area, env.get("DEADBOLT_TLS_CLIENT_CA", "").startswith("/etc/deadbolt/tls/"),
                  f"{wname}: no DEADBOLT_TLS_CLIENT_CA (a stage requires the gateway's client certificate)")
            check(area, "DEADBOLT_TLS_CLIENT_CERT" not in env and "DEADBOLT_TLS_CLIENT_KEY" not in env,
                  f"{wname}: a stage has a client certificate (only the gateway calls the stages)")
            db = DB_SECRETS["stage"][0]
            check(area, db in used and not ({DB_SECRETS["gateway"][0], DB_SECRETS["migrate"][0]} & used),
                  f"{wname}: connects with a database Secret other than {db}")
        else:
            client = mounts.get("/etc/deadbolt/tls-client")
            check(area, client == "deadbolt-tls-gateway-client",
                  f"{wname}: deadbolt-tls-gateway-client is not mounted at /etc/deadbolt/tls-client "
                  f"(found {client!r})")
            cert, ccert = env.get("DEADBOLT_TLS_CERT", ""), env.get("DEADBOLT_TLS_CLIENT_CERT", "")
            check(area, all(env.get(k, "").startswith("/etc/deadbolt/tls-client/") for k in
                            ("DEADBOLT_TLS_CLIENT_CERT", "DEADBOLT_TLS_CLIENT_KEY", "DEADBOLT_TLS_CA")),
                  f"{wname}: DEADBOLT_TLS_CLIENT_CERT/KEY and DEADBOLT_TLS_CA are not from its client Secret")
            check(area, cert != ccert, f"{wname}: presents its public certificate as its client certificate")
            db = DB_SECRETS["gateway"][0]
            check(area, db in used and DB_SECRETS["migrate"][0] not in used,
                  f"{wname}: connects with a database Secret other than {db}")
    stage_tls = [own_tls.get(s) for s in STAGE_SERVICES if own_tls.get(s)]
    check(area, len(stage_tls) == len(set(stage_tls)) == len(STAGE_SERVICES),
          f"the stages do not each mount a distinct TLS Secret: {stage_tls}")
    # only the gateway reads its certificates; only the migrate Job the owner's URL
    for wname, d in workloads(docs):
        used = secrets_read(d)
        if not is_gateway(d):
            check(area, not (used & GATEWAY_TLS_SECRETS), f"{wname}: reads the gateway's certificate Secret")
        if d["kind"] == "Job":
            env = env_of(pod_spec(d)["containers"][0], configmaps)
            check(area, DB_SECRETS["migrate"][0] in used and env.get("DEADBOLT_MIGRATE", "true") == "true",
                  f"{wname}: does not migrate as the schema owner ({DB_SECRETS['migrate'][0]})")
        else:
            check(area, DB_SECRETS["migrate"][0] not in used, f"{wname}: reads the schema owner's URL")
    # the example Secrets: each TLS Secret with its files, each database URL with its role
    for s in SERVICES:
        keys = set(secrets.get(f"deadbolt-tls-{s}", {}))
        want = {"tls.crt", "tls.key"} | ({"ca.crt"} if s in STAGE_SERVICES else set())
        check(area, want <= keys, f"secrets.example.yaml: deadbolt-tls-{s} lacks {sorted(want - keys)}")
    keys = set(secrets.get("deadbolt-tls-gateway-client", {}))
    check(area, {"tls.crt", "tls.key", "ca.crt"} <= keys,
          "secrets.example.yaml: deadbolt-tls-gateway-client lacks tls.crt, tls.key or ca.crt")
    for name, role in DB_SECRETS.values():
        url = urllib.parse.urlparse(secrets.get(name, {}).get("DEADBOLT_DATABASE_URL", ""))
        check(area, url.username == role,
              f"secrets.example.yaml: {name}'s DEADBOLT_DATABASE_URL logs in as {url.username!r}, not {role}")
    # KEDA's queue query: never the gateway's role (it reads api_keys) nor the owner's
    for ta in (d for d in docs if d["kind"] == "TriggerAuthentication"):
        for r in ta["spec"].get("secretTargetRef") or []:
            check(area, r["name"] not in (DB_SECRETS["gateway"][0], DB_SECRETS["migrate"][0]),
                  f"TriggerAuthentication {ta['metadata']['name']}: reads {r['name']}")


def identities_bite(docs: list[dict], secrets: dict) -> None:
    """check_identities rejects what it exists to reject (else a green check means nothing)."""
    area = "identities"

    def rejected(mutate) -> bool:
        b = copy.deepcopy(docs)
        mutate({d["metadata"]["name"]: d for d in b if d["kind"] == "Deployment"})
        before = len(failures)
        check_identities(area, b, secrets)
        bad = len(failures) > before
        del failures[before:]
        return bad

    def volume(dep: dict, name: str) -> dict:
        return next(v for v in pod_spec(dep)["volumes"] if v["name"] == name)

    def set_env(dep: dict, k: str, v: str) -> None:
        c = pod_spec(dep)["containers"][0]
        c["env"] = [e for e in c.get("env") or [] if e["name"] != k] + [{"name": k, "value": v}]

    def gateway_cert(deps):
        volume(deps["trainer"], "tls")["secret"]["secretName"] = "deadbolt-tls-gateway"

    def shared_cert(deps):
        volume(deps["analyzer"], "tls")["secret"]["secretName"] = "deadbolt-tls-pruner"

    def extra_gateway_volume(deps):
        pod_spec(deps["pruner"])["volumes"].append(
            {"name": "gw", "secret": {"secretName": "deadbolt-tls-gateway-client"}})

    def gateway_db(deps):
        for ef in pod_spec(deps["poisoner"])["containers"][0]["envFrom"]:
            if (ef.get("secretRef") or {}).get("name") == DB_SECRETS["stage"][0]:
                ef["secretRef"]["name"] = DB_SECRETS["gateway"][0]

    def migrating(deps):
        set_env(deps["trainer"], "DEADBOLT_MIGRATE", "true")

    def public_as_client(deps):
        set_env(deps["gateway"], "DEADBOLT_TLS_CLIENT_CERT", "/etc/deadbolt/tls/tls.crt")

    check(area, not rejected(lambda deps: None), "the rendered overlay fails the identity checks")
    for what, m in (("a stage mounting the gateway's certificate", gateway_cert),
                    ("two stages sharing a certificate", shared_cert),
                    ("a stage with a volume of the gateway's client certificate", extra_gateway_volume),
                    ("a stage connecting as the gateway's role", gateway_db),
                    ("a stage that migrates", migrating),
                    ("the gateway calling with its public certificate", public_as_client)):
        check(area, rejected(m), f"{what} passes the identity checks")


def check_network_policies(area: str, docs: list[dict]) -> None:
    nps = [d for d in docs if d["kind"] == "NetworkPolicy"]
    check(area, any(n["spec"].get("podSelector") == {} and
                    set(n["spec"].get("policyTypes") or []) == {"Ingress", "Egress"}
                    and not n["spec"].get("ingress") and not n["spec"].get("egress") for n in nps),
          "no default-deny NetworkPolicy (podSelector {}, Ingress and Egress, no rules)")
    gateway = pod_labels("gateway")

    def ingress_rules(labels: dict):
        for n in nps:
            if labels_match(n["spec"].get("podSelector") or {}, labels) and \
                    "Ingress" in (n["spec"].get("policyTypes") or ["Ingress"]):
                for r in n["spec"].get("ingress") or []:
                    yield n["metadata"]["name"], r

    def allows_port(rule: dict, port: int) -> bool:
        ports = rule.get("ports")
        if not ports:
            return True
        for p in ports:
            lo = p.get("port")
            hi = p.get("endPort", lo)
            if lo is None or (isinstance(lo, int) and lo <= port <= hi) or lo == "grpc":
                return True
        return False

    for s in STAGE_SERVICES:
        labels = pod_labels(s)
        own = [n for n in nps if (n["spec"].get("podSelector") or {}).get("matchLabels", {})
               .get("app.kubernetes.io/component") == s]
        check(area, bool(own), f"no NetworkPolicy for the stage service {s}")
        allowed = False
        for pname, rule in ingress_rules(labels):
            if not allows_port(rule, PORTS[s]):
                continue
            peers = rule.get("from")
            ok = bool(peers) and all(set(p) == {"podSelector"} and labels_match(p["podSelector"], gateway)
                                     and not labels_match(p["podSelector"], pod_labels("trainer"))
                                     for p in peers)
            check(area, ok, f"NetworkPolicy {pname} lets more than the gateway reach {s}:{PORTS[s]}")
            allowed = allowed or ok
        check(area, allowed, f"no NetworkPolicy lets the gateway reach {s}:{PORTS[s]}")
    # the datastores: Postgres and the object store only from deadbolt (and KEDA, Grafana)
    for store, port in (("postgres", 5432), ("minio", 9000)):
        labels = {"app.kubernetes.io/name": store}
        rules = list(ingress_rules(labels))
        check(area, bool(rules), f"no NetworkPolicy for an in-cluster {store}")
        for pname, rule in rules:
            for p in rule.get("from") or [{}]:
                ok = ("podSelector" in p and "namespaceSelector" not in p
                      and labels_match(p["podSelector"], pod_labels("trainer"))
                      and not labels_match(p["podSelector"], {"app.kubernetes.io/name": "other"})) \
                    or (store == "postgres" and "namespaceSelector" in p and
                        (p["namespaceSelector"].get("matchLabels") or {}).get("kubernetes.io/metadata.name")
                        in ("keda", "monitoring"))
                check(area, ok, f"NetworkPolicy {pname} lets {p or 'anyone'} reach {store}")
    egress = [n for n in nps if labels_match(n["spec"].get("podSelector") or {}, pod_labels("trainer"))
              and "Egress" in (n["spec"].get("policyTypes") or [])]
    check(area, any(any(p.get("port") == 5432 for r in n["spec"].get("egress") or [] for p in r.get("ports") or [])
                    for n in egress), "deadbolt pods have no egress to Postgres (5432)")


def check_overlay(name: str, docs: list[dict], crds: dict, secrets: dict) -> None:
    area = f"k8s/{name}"
    for d in docs:
        validate_object(area, d, crds)
    check_workloads(area, docs, secrets)
    check_identities(area, docs, secrets)
    check_network_policies(area, docs)
    by = {}
    for d in docs:
        by.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    deps = by.get("Deployment", {})
    check(area, set(SERVICES) <= set(deps), f"Deployments {sorted(deps)} lack some of {SERVICES}")
    check(area, "Job" in by and any("migrate" in n for n in by["Job"]), "no migration Job")
    # PDBs
    for s in SERVICES:
        tl = deps[s]["spec"]["template"]["metadata"]["labels"] if s in deps else {}
        check(area, any(labels_match(p["spec"]["selector"], tl) for p in by.get("PodDisruptionBudget", {}).values()),
              f"no PodDisruptionBudget for {s}")
    # peers: headless Services whose port is the service's port
    cm = by.get("ConfigMap", {}).get("deadbolt-config", {}).get("data") or {}
    services = by.get("Service", {})
    for s in STAGE_SERVICES:
        peers = [u.strip() for u in cm.get(f"DEADBOLT_{s.upper()}_PEERS", "").split(",") if u.strip()]
        check(area, bool(peers), f"no DEADBOLT_{s.upper()}_PEERS")
        for u in peers:
            url = urllib.parse.urlparse(u)
            host = url.hostname.split(".")[0]
            svc = services.get(host)
            if not check(area, svc is not None, f"peer {u}: no Service {host}"):
                continue
            check(area, svc["spec"].get("clusterIP") == "None", f"peer {u}: Service {host} is not headless")
            check(area, labels_match({"matchLabels": svc["spec"]["selector"]}, pod_labels(s)),
                  f"peer {u}: Service {host} does not select {s}")
            check(area, url.port == PORTS[s] and any(p["port"] == PORTS[s] for p in svc["spec"]["ports"]),
                  f"peer {u}: port is not {PORTS[s]}")
    # Prometheus Operator: a PodMonitor on the metrics port of every service
    pms = list(by.get("PodMonitor", {}).values())
    for s in SERVICES:
        check(area, any(labels_match(p["spec"]["selector"], pod_labels(s)) and
                        any(e.get("port") == "metrics" for e in p["spec"].get("podMetricsEndpoints") or [])
                        for p in pms), f"no PodMonitor scrapes {s}")
    # KEDA: every ScaledObject scales an existing Deployment that has no fixed replicas
    sos = by.get("ScaledObject", {})
    check(area, "trainer" in sos, "no ScaledObject for the trainers")
    tas = by.get("TriggerAuthentication", {})
    for n, so in sos.items():
        target = so["spec"]["scaleTargetRef"]["name"]
        check(area, target in deps, f"ScaledObject {n}: no Deployment {target}")
        if target in deps:
            check(area, "replicas" not in deps[target]["spec"],
                  f"Deployment {target} sets replicas although KEDA scales it")
        check(area, so["spec"].get("minReplicaCount") == 0, f"ScaledObject {n}: does not scale to zero")
        for t in so["spec"]["triggers"]:
            check(area, t["type"] == "postgresql" and "stage_jobs" in t["metadata"].get("query", ""),
                  f"ScaledObject {n}: trigger is not a Postgres queue query")
            ref = (t.get("authenticationRef") or {}).get("name")
            check(area, ref in tas, f"ScaledObject {n}: no TriggerAuthentication {ref}")
    for n, ta in tas.items():
        for r in ta["spec"].get("secretTargetRef") or []:
            check(area, r["key"] in secrets.get(r["name"], {}),
                  f"TriggerAuthentication {n}: Secret {r['name']} has no key {r['key']}")
    # GPUs only in the gpu overlay, for the GPU workers
    for s, d in deps.items():
        ps = pod_spec(d)
        gpu = any("nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {}) for c in ps["containers"])
        if name == "gpu" and s in GPU_SERVICES:
            check(area, gpu, f"{s}: no nvidia.com/gpu limit")
            check(area, any(t.get("key") == "nvidia.com/gpu" for t in ps.get("tolerations") or []),
                  f"{s}: no nvidia.com/gpu toleration")
            check(area, bool(ps.get("nodeSelector")), f"{s}: no GPU node selector")
        else:
            check(area, not gpu, f"{s}: requests a GPU in the {name} overlay")


def kubernetes() -> tuple[dict, list[str], dict[str, list[dict]]]:
    """Renders and checks both overlays; returns the KEDA queries and the
    rendered overlays."""
    crds = load_crd_schemas()
    sec_docs = [d for d in yaml.safe_load_all((ROOT / "deploy/k8s/secrets.example.yaml").read_text()) if d]
    secrets = {}
    for d in sec_docs:
        validate_object("k8s/secrets", d, crds)
        secrets[d["metadata"]["name"]] = {**(d.get("stringData") or {}), **(d.get("data") or {})}
    queries = []
    rendered = {}
    for overlay in ("cpu", "gpu"):
        r = run([KUBECTL, "kustomize", str(ROOT / "deploy/k8s/overlays" / overlay)])
        if not check(f"k8s/{overlay}", r.returncode == 0, f"kubectl kustomize failed: {r.stderr.strip()}"):
            continue
        docs = [d for d in yaml.safe_load_all(r.stdout) if d]
        rendered[overlay] = docs
        check_overlay(overlay, docs, crds, secrets)
        for d in docs:
            if d["kind"] == "ScaledObject":
                for t in d["spec"]["triggers"]:
                    if t["metadata"].get("query"):
                        queries.append(t["metadata"]["query"])
    if "gpu" in rendered:
        schemas_bite(crds, rendered["gpu"])
        identities_bite(rendered["gpu"], secrets)
    n = {o: len(d) for o, d in rendered.items()}
    return n, sorted(set(queries)), rendered


# --------------------------------------------------------------------------
# Grafana, Prometheus
# --------------------------------------------------------------------------

def dashboard() -> dict:
    return json.loads((ROOT / "deploy/grafana/dashboards/deadbolt.json").read_text())


def dashboard_targets(d: dict):
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels") or [])
    for p in walk(d["panels"]):
        for t in p.get("targets") or []:
            yield p, t


GRAFANA_GLOBALS = {"__timeFilter", "__timeFrom", "__timeTo", "__rate_interval", "__interval",
                   "__interval_ms", "__range", "__unixEpochFilter", "__timeGroup", "__timeGroupAlias"}


def grafana() -> tuple[list[str], list[str]]:
    """Checks the dashboard and provisioning; returns its SQL and PromQL."""
    area = "grafana"
    d = dashboard()
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/deadbolt.yml").read_text())
    uids = {s["uid"]: s["type"] for s in ds["datasources"]}
    check(area, bool(d.get("uid")) and bool(d.get("title")), "dashboard without uid or title")
    ids = [p["id"] for p in d["panels"]]
    check(area, len(ids) == len(set(ids)), "duplicate panel ids")
    variables = {v["name"] for v in d["templating"]["list"]}
    sqls, proms = [], []
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            check(area, v["datasource"]["uid"] in uids, f"variable {v['name']}: unknown data source")
            sqls.append(v["query"])
    for p, t in dashboard_targets(d):
        dsrc = t.get("datasource") or p.get("datasource") or {}
        uid = dsrc.get("uid")
        if not check(area, uid in uids, f"panel {p['title']!r}: data source {uid} is not provisioned"):
            continue
        check(area, dsrc.get("type") == uids[uid], f"panel {p['title']!r}: data source type {dsrc.get('type')}")
        text = t.get("rawSql") or t.get("expr") or ""
        for var in re.findall(r"\$\{?(\w+)", text):
            check(area, var in variables or var in GRAFANA_GLOBALS,
                  f"panel {p['title']!r}: unknown variable ${var}")
        if uids[uid] == "grafana-postgresql-datasource":
            check(area, bool(t.get("rawSql")) and t.get("rawQuery") is True and
                  t.get("format") in ("table", "time_series"), f"panel {p['title']!r}: not a raw SQL target")
            sqls.append(t["rawSql"])
        elif uids[uid] == "prometheus":
            check(area, bool(t.get("expr")), f"panel {p['title']!r}: no PromQL")
            proms.append(t["expr"])
    prov = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/deadbolt.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    compose = (ROOT / "docker-compose.yml").read_text()
    check(area, f"./deploy/grafana/dashboards:{path}" in compose,
          f"docker-compose.yml does not mount the dashboards at {path}")
    check(area, bool(sqls) and bool(proms), "the dashboard needs Postgres and Prometheus panels")
    return sqls, proms


def known_metrics() -> set[str]:
    src = (ROOT / "crates/deadbolt-runtime/src/metrics.rs")
    if not src.exists():
        fail("metrics", f"{src.relative_to(ROOT)} (the metric names) is missing")
        return set()
    return set(re.findall(r'"(deadbolt_[a-z0-9_]+)"', src.read_text()))


def prometheus(proms: list[str]) -> None:
    area = "prometheus"
    pdir = ROOT / "deploy/prometheus"
    for cmd in ([PROMTOOL, "check", "rules", "alerts.yml"],
                [PROMTOOL, "test", "rules", "alerts_test.yml"],
                [PROMTOOL, "check", "config", "prometheus.yml"]):
        r = run(cmd, cwd=pdir)
        check(area, r.returncode == 0, f"{' '.join(cmd[1:])}: {(r.stdout + r.stderr).strip()[-2000:]}")
    # the dashboard's PromQL, parsed by promtool as recording rules
    with tempfile.TemporaryDirectory() as tmp:
        rules = {"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:expr_{i}",
             "expr": e.replace("$__rate_interval", "5m").replace("$__interval", "1m")}
            for i, e in enumerate(proms)]}]}
        f = Path(tmp) / "dashboard_rules.yml"
        f.write_text(yaml.safe_dump(rules))
        r = run([PROMTOOL, "check", "rules", str(f)])
        check(area, r.returncode == 0, f"dashboard PromQL: {(r.stdout + r.stderr).strip()[-2000:]}")
    known = known_metrics()
    alerts = (pdir / "alerts.yml").read_text()
    used = set(re.findall(r"\b(deadbolt_[a-z0-9_]+)", alerts + "\n".join(proms)))
    for m in sorted(used):
        base = re.sub(r"_(bucket|sum|count)$", "", m)
        if known:
            check("metrics", m in known or base in known,
                  f"{m} is used by the rules or the dashboard but no service exports it")


# --------------------------------------------------------------------------
# SQL against the schema
# --------------------------------------------------------------------------

def grafana_sql_to_plain(q: str) -> str:
    q = re.sub(r"\$__timeFilter\([^)]*\)", "true", q)
    return q.replace("$run", "00000000-0000-0000-0000-000000000000").replace("$norm", "linf")


def sql(queries: dict[str, list[str]]) -> str:
    """EXPLAINs every query on a scratch database migrated with migrations/postgres."""
    area = "sql"
    admin = os.environ.get("DEADBOLT_TEST_PG_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    if run(["psql", "--version"]).returncode != 0 or \
            run(["psql", admin, "-Atqc", "select 1"]).returncode != 0:
        return "skipped (no Postgres at DEADBOLT_TEST_PG_URL)"
    db = f"deadbolt_deploycheck_{os.getpid()}"
    url = urllib.parse.urlparse(admin)._replace(path=f"/{db}").geturl()
    run(["psql", admin, "-qc", f"DROP DATABASE IF EXISTS {db}"])
    r = run(["psql", admin, "-qc", f"CREATE DATABASE {db}"])
    if not check(area, r.returncode == 0, f"creating a scratch database: {r.stderr.strip()}"):
        return "failed"
    try:
        for m in sorted((ROOT / "migrations/postgres").glob("*.sql")):
            r = run(["psql", url, "-qv", "ON_ERROR_STOP=1", "-f", str(m)])
            if not check(area, r.returncode == 0, f"migration {m.name}: {r.stderr.strip()}"):
                return "failed"
        n = 0
        for what, qs in queries.items():
            for q in qs:
                r = run(["psql", url, "-qv", "ON_ERROR_STOP=1", "-c", "EXPLAIN " + q])
                check(area, r.returncode == 0, f"{what} query does not plan: {r.stderr.strip()}\n{q}")
                n += 1
        return f"{n} queries plan on the migrated schema"
    finally:
        run(["psql", admin, "-qc", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"])


# --------------------------------------------------------------------------
# images by role
# --------------------------------------------------------------------------

# deploy/Dockerfile's targets and the image each is tagged as: the gateway's
# without libtorch, the worker's (stage services, migrate Job) with it.
IMAGES = {"gateway": "deadbolt-gateway", "worker": "deadbolt"}


def image_name(ref: str) -> str:
    """An image reference's name: no registry, path, tag or digest."""
    return ref.split("@")[0].rsplit("/", 1)[-1].split(":")[0]


def workload_images(docs: list[dict]) -> list[tuple[str, str, str]]:
    """(workload, container, the image its role needs) of every container."""
    out = []
    for wname, d in workloads(docs):
        want = IMAGES["gateway" if is_gateway(d) else "worker"]
        ps = pod_spec(d)
        for c in (ps.get("initContainers") or []) + ps["containers"]:
            out.append((f"{wname}/{c['name']}", c["image"], want))
    return out


def image_problems(docs: list[dict]) -> list[str]:
    return [f"{c}: image {img}, not {want}" for c, img, want in workload_images(docs)
            if image_name(img) != want]


def images_bite(docs: list[dict]) -> None:
    """image_problems rejects a gateway on the worker image and a stage on the gateway's."""
    def mutated(name: str, image: str) -> list[dict]:
        b = copy.deepcopy(docs)
        for d in b:
            if d["kind"] == "Deployment" and d["metadata"]["name"] == name:
                pod_spec(d)["containers"][0]["image"] = image
        return b
    check("images", not image_problems(docs), "the rendered overlay fails the image checks")
    for name, image in (("gateway", "deadbolt:latest"), ("trainer", "deadbolt-gateway:latest")):
        check("images", bool(image_problems(mutated(name, image))),
              f"{name} on {image} passes the image checks")


def dockerfile_stages(text: str) -> dict[str, dict]:
    """The named stages of a Dockerfile, in order: base and instructions
    (comments dropped, continuation lines joined)."""
    lines = []
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1] + " " + raw.strip()
        elif raw.strip():
            lines.append(raw.strip())
    stages: dict[str, dict] = {}
    for line in lines:
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?$", line, re.I)
        if m:
            name = m.group(2) or f"#{len(stages)}"
            stages[name] = {"base": m.group(1), "lines": []}
        elif stages:
            stages[list(stages)[-1]]["lines"].append(line)
    return stages


def dockerfile_problems(text: str) -> list[str]:
    stages = dockerfile_stages(text)
    problems = []

    def chain(name: str) -> list[str]:
        """The instructions that make the image of a stage: its bases' first."""
        out = []
        while name in stages:
            out = stages[name]["lines"] + out
            name = stages[name]["base"]
        return out

    def built_by(lines: list[str]) -> str | None:
        """The stage the image's deadbolt binary is copied from."""
        for line in lines:
            m = re.match(r"COPY\s+--from=(\S+)\s+\S*/deadbolt\s+/usr/local/bin/deadbolt$", line)
            if m:
                return m.group(1)
        return None

    if list(stages)[-1:] != ["worker"]:
        problems.append("the last stage (the default target) is not `worker`")
    for target in IMAGES:
        if target not in stages:
            problems.append(f"no `{target}` stage")
            continue
        lines = chain(target)
        users = [l.split()[1] for l in lines if l.startswith("USER ")]
        if not users or users[-1].split(":")[0] in ("0", "root"):
            problems.append(f"{target}: the image runs as root")
        if not any(l.startswith("EXPOSE ") and str(METRICS_PORT) in l.split() for l in lines):
            problems.append(f"{target}: the metrics port {METRICS_PORT} is not exposed")
        src = built_by(lines)
        builds = [l for l in stages.get(src, {}).get("lines", []) if "cargo build" in l]
        if not builds:
            problems.append(f"{target}: its deadbolt is not copied from a stage that builds it")
        no_torch = all("--no-default-features" in l for l in builds)
        if target == "gateway":
            if not no_torch or any("setup.sh" in l for l in stages.get(src, {}).get("lines", [])):
                problems.append("gateway: its deadbolt is not built with --no-default-features alone")
            heavy = [l for l in lines if re.search(r"python|libgomp|torch|/opt/deadbolt", l, re.I)]
            if heavy:
                problems.append(f"gateway: the image brings Python or libtorch: {heavy}")
        elif builds and no_torch:
            problems.append("worker: its deadbolt is built without libtorch")
    return problems


def images(rendered: dict[str, list[dict]]) -> None:
    area = "images"
    text = (ROOT / "deploy/Dockerfile").read_text()
    for p in dockerfile_problems(text):
        fail(area, f"Dockerfile: {p}")
    # the Dockerfile checks reject broken copies
    gw = text.index("\nFROM runtime AS gateway")
    for what, broken in (
            ("the gateway copying the worker's binary",
             text.replace("COPY --from=build-gateway ", "COPY --from=build ")),
            ("the gateway installing Python", text[:gw] + text[gw:].replace(
                "\nUSER 10001:10001", "\nRUN apt-get install -y python3\nUSER 10001:10001", 1)),
            ("the gateway built with libtorch",
             text.replace("cargo build --release -p deadbolt-cli --no-default-features",
                          "cargo build --release -p deadbolt-cli")),
            ("the gateway image running as root", text[:gw] + text[gw:].replace("USER 10001:10001", "USER root", 1)),
            ("the gateway as the default target", text + "\nFROM runtime AS gateway2\n")):
        check(area, broken != text, f"cannot make a Dockerfile with {what} (the check's fixture is stale)")
        check(area, bool(dockerfile_problems(broken)), f"a Dockerfile with {what} passes the checks")
    for overlay, docs in rendered.items():
        for p in image_problems(docs):
            fail(area, f"k8s/{overlay}: {p}")
    if "gpu" in rendered:
        images_bite(rendered["gpu"])
    svcs = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for s in SERVICES:
        role = "gateway" if s == "gateway" else "worker"
        build = svcs.get(s, {}).get("build") or {}
        check(area, build.get("dockerfile") == "deploy/Dockerfile" and build.get("target") == role,
              f"docker-compose.yml: {s} does not build deploy/Dockerfile's {role} target")
        check(area, image_name(str(svcs.get(s, {}).get("image", ""))) == IMAGES[role],
              f"docker-compose.yml: {s} is not tagged {IMAGES[role]}")


# --------------------------------------------------------------------------
# docker-compose
# --------------------------------------------------------------------------

def compose() -> None:
    area = "compose"
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svcs = doc["services"]
    example = {}
    for line in (ROOT / "deploy/compose.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            example[k.strip()] = v.strip()
    # only the gateway publishes a port: 50060
    for name, s in svcs.items():
        check(area, s.get("network_mode") != "host", f"{name}: host networking")
        if name == "gateway":
            ports = [str(p) for p in s.get("ports") or []]
            check(area, len(ports) == 1 and ports[0].split(":")[-1] == "50060",
                  f"gateway publishes {ports}, not only 50060")
        else:
            check(area, not s.get("ports"), f"{name} publishes {s.get('ports')}: only the gateway may")
        # no credential written in the compose file
        env = s.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        for k, v in env.items():
            check(area, not CREDENTIAL.search(k), f"{name}: credential {k} in docker-compose.yml, not the env file")
            check(area, not re.search(r"://[^/@\s]+:[^/@\s]+@", str(v)), f"{name}: {k} holds a password")
        for var in re.findall(r"\$\$\{?(\w+)", json.dumps(s)):
            check(area, var in example, f"{name}: ${var} is not in deploy/compose.env.example")
        # mounted files exist
        for v in s.get("volumes") or []:
            src = str(v).split(":")[0]
            if src.startswith("./"):
                check(area, (ROOT / src).exists(), f"{name}: mounts missing {src}")
    for name in ("postgres", "minio", "createbucket", "grafana") + tuple(SERVICES):
        check(area, "deploy/compose.env" in (svcs.get(name, {}).get("env_file") or []),
              f"{name}: does not read deploy/compose.env")
    for s in SERVICES:
        c = svcs[s]
        check(area, c["command"] == ["serve", "--services", s], f"{s}: command {c['command']}")
        env = c["environment"]
        listen = env[f"DEADBOLT_{s.upper()}_LISTEN"]
        port = listen.rsplit(":", 1)[1]
        check(area, port == str(PORTS[s]), f"{s}: listens on {listen}")
        if s != "gateway":
            peer = env[f"DEADBOLT_{s.upper()}_PEERS"]
            check(area, peer == f"http://{s}:{port}", f"{s}: peers {peer} vs listen {listen}")
        check(area, "DEADBOLT_ARTIFACT_URL" in env and "DEADBOLT_DATABASE_URL" in example,
              f"{s}: no artifact URL or database URL")
        check(area, str(c.get("user", "0")).split(":")[0] not in ("0", "root"), f"{s}: runs as root")
        check(area, c.get("read_only") is True, f"{s}: root filesystem not read-only")
        check(area, "ALL" in (c.get("cap_drop") or []), f"{s}: capabilities not dropped")
        check(area, any("no-new-privileges" in o for o in c.get("security_opt") or []),
              f"{s}: no no-new-privileges")
        check(area, any(str(t).startswith("/tmp") for t in c.get("tmpfs") or []), f"{s}: no tmpfs at /tmp")
        check(area, env.get("DEADBOLT_METRICS_LISTEN", "").endswith(":9464"), f"{s}: no metrics listener")
    for s in ("prometheus", "grafana"):
        check(area, s in svcs, f"no {s} service")
    # the example is consistent: the services' URL uses the Postgres password
    u = urllib.parse.urlparse(example.get("DEADBOLT_DATABASE_URL", ""))
    check(area, u.password == example.get("POSTGRES_PASSWORD") and u.username == example.get("POSTGRES_USER"),
          "compose.env.example: DEADBOLT_DATABASE_URL does not use POSTGRES_USER/POSTGRES_PASSWORD")
    prov = (ROOT / "deploy/grafana/provisioning/datasources/deadbolt.yml").read_text()
    prov = "\n".join(l.split("#")[0] for l in prov.splitlines())
    for var in re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", prov):
        check(area, var in example, f"Grafana provisioning uses ${var}, not in compose.env.example")
    gi = (ROOT / "deploy/.gitignore")
    check(area, gi.exists() and "compose.env" in gi.read_text(), "deploy/compose.env is not git-ignored")
    # the override opens Grafana and Prometheus on loopback only
    obs = yaml.safe_load((ROOT / "deploy/compose.observe.yml").read_text())
    for name, s in obs["services"].items():
        for p in s.get("ports") or []:
            check(area, str(p).startswith("127.0.0.1:"), f"compose.observe.yml: {name} publishes {p} beyond loopback")
    # a real compose parser, where one is installed (the plugin is not, here)
    if run(["docker", "compose", "version"]).returncode == 0:
        with tempfile.TemporaryDirectory() as tmp:
            envf = Path(tmp) / "compose.env"
            envf.write_text((ROOT / "deploy/compose.env.example").read_text())
            text = (ROOT / "docker-compose.yml").read_text().replace("deploy/compose.env]", f"{envf}]")
            (Path(tmp) / "docker-compose.yml").write_text(text)
            r = run(["docker", "compose", "--project-directory", str(ROOT), "-f",
                     str(Path(tmp) / "docker-compose.yml"), "config", "-q"])
            check(area, r.returncode == 0, f"docker compose config: {r.stderr.strip()}")


def main() -> int:
    n, keda, rendered = kubernetes()
    print(f"kubernetes: overlays rendered ({', '.join(f'{o}: {c} objects' for o, c in n.items())}), "
          f"validated against the API and vendored CRD schemas, hardening rules checked")
    sqls, proms = grafana()
    print(f"grafana: {len(sqls)} SQL and {len(proms)} PromQL targets, data sources provisioned")
    prometheus(proms)
    print("prometheus: promtool check rules, test rules, check config; dashboard PromQL; metric names")
    print(f"sql: {sql({'KEDA': keda, 'dashboard': [grafana_sql_to_plain(q) for q in sqls]})}")
    compose()
    print("compose: only the gateway published, credentials from deploy/compose.env, hardened services")
    images(rendered)
    print("images: worker (libtorch, the default target) and gateway (no libtorch, no Python); "
          "each workload on its role's image")
    if failures:
        print(f"\n{len(failures)} deployment check(s) failed:", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
