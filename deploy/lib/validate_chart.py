#!/usr/bin/env python3
"""Renders helm/kms-cluster with the real Helm engine and checks the output.

Called by deploy/validate.sh inside the tools venv (deploy/install-tools.sh):

    validate_chart.py CHART_DIR OUT_DIR [--kube-versions 1.27.0,1.34.0]
                      [--node-modules DIR] [--promtool PATH]

- Helm: helm-python-sdk (Helm v4's Go SDK through ctypes): `helm lint --strict`,
  values.schema.json validation and offline rendering, the same code path as `helm template`.
- Kubernetes: every rendered object is validated in strict mode (unknown fields are errors)
  against the JSON schemas of each Kubernetes version given (kubernetes-validate bundles them).
- Prometheus Operator objects: against the CRD schemas (node + @kubernetes-models), and the
  PrometheusRule's groups with `promtool check rules`.
- Chart behaviour: per-scenario assertions (replicas, quorum PDB, per-pod configuration,
  join lists, probes, security context, scale-down Job, ...), and failure scenarios that
  must be refused with a clear message (even replicaCount, bad values).

Prints one line per check and exits 1 when anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any, Callable

import yaml

import helm_python as helm
import kubernetes_validate

FAILURES: list[str] = []


def ok(msg: str) -> None:
    print(f"  ok   {msg}")


def fail(msg: str) -> None:
    print(f"  FAIL {msg}")
    FAILURES.append(msg)


def check(cond: bool, msg: str) -> None:
    (ok if cond else fail)(msg)


RELEASE = "kms"
NAMESPACE = "kms-system"


def fullname(values: dict[str, Any]) -> str:
    if values.get("fullnameOverride"):
        return values["fullnameOverride"]
    return f"{RELEASE}-kms-cluster"


# --- scenarios ----------------------------------------------------------------------------

FAKE_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

# A scenario may carry "_kube": the Kubernetes versions it targets (default: --kube-versions).
SCENARIOS: list[tuple[str, dict[str, Any]]] = [
    ("default", {}),
    ("single-node", {"replicaCount": 1, "networkPolicy": {"enabled": False}}),
    (
        "five-nodes-loadbalancer",
        {
            "replicaCount": 5,
            "service": {
                "type": "LoadBalancer",
                "externalTrafficPolicy": "Local",
                "loadBalancerSourceRanges": ["10.0.0.0/8"],
                "annotations": {"example.com/lb": "internal"},
            },
            "config": {
                "kms": {"allowNetworks": ["10.0.0.0/8", "192.168.0.0/16"]},
                "policy": {"renewal_interval": 10080, "product_policy": "strict",
                           "licensed_csvlks": ["2e7a9ad1-a849-4b56-babe-17d5a29fe4b4"]},
            },
            "preStopSleepSeconds": 5,
            "networkPolicy": {
                "kmsFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
            },
            "_kube": ["1.30.0", "1.34.0"],  # the preStop sleep action exists from 1.30
        },
    ),
    (
        "all-features",
        {
            "image": {"repository": "registry.example.com/kms-cluster", "tag": "0.1.0"},
            "imagePullSecrets": [{"name": "regcred"}],
            "raftTls": {"enabled": True, "cert": FAKE_PEM, "key": FAKE_PEM, "ca": FAKE_PEM},
            "dns": {
                "publish": [{"zone": "corp.example.com", "server": "10.0.0.53:53",
                             "tsigKeyName": "kms-update", "ttl": 60, "priority": 0, "weight": 100}],
                "advertiseHostTemplate": "{pod}.kms.corp.example.com",
                "tsig": {"secret": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"},
            },
            "metrics": {
                "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                "prometheusRule": {"enabled": True},
                "grafanaDashboard": {"enabled": True},
            },
            "networkPolicy": {"enabled": True,
                              "adminFrom": [{"namespaceSelector": {"matchLabels": {"name": "ops"}}}]},
            "admin": {"token": "0123456789abcdef0123456789abcdef"},
        },
    ),
    (
        "existing-secrets-nodeport",
        {
            "fullnameOverride": "kms",
            "cluster": {"bootstrap": False},
            "admin": {"existingSecret": "kms-admin-token"},
            "raftTls": {"enabled": True, "existingSecret": "kms-raft-tls"},
            "dns": {"publish": [{"zone": "corp.example.com", "server": "10.0.0.53:53",
                                 "tsigKeyName": "kms-update"}],
                    "tsig": {"existingSecret": "kms-tsig"}},
            "metrics": {"separateListener": False, "serviceMonitor": {"enabled": True}},
            "service": {"type": "NodePort", "nodePort": 31688},
            "persistence": {"storageClass": "fast-ssd", "size": "10Gi"},
            "test": {"enabled": False},
            "podDisruptionBudget": {"enabled": False},
        },
    ),
    ("scale-down-5-to-3", {"replicaCount": 3, "scaleDown": {"currentReplicas": 5}}),
]

# (name, values, text the error must contain)
FAILING: list[tuple[str, dict[str, Any], str]] = [
    ("even-replicas-4", {"replicaCount": 4}, "replicaCount must be an odd number (1, 3, 5, 7, 9), got 4"),
    ("even-replicas-2", {"replicaCount": 2}, "replicaCount must be an odd number"),
    ("zero-replicas", {"replicaCount": 0}, "replicaCount"),
    ("replicas-not-a-number", {"replicaCount": "three"}, "replicaCount"),
    ("etp-local-on-clusterip", {"service": {"externalTrafficPolicy": "Local"}},
     "externalTrafficPolicy=Local needs service.type LoadBalancer or NodePort"),
    ("tls-without-certificates", {"raftTls": {"enabled": True}}, "raftTls.enabled needs"),
    ("dns-without-tsig", {"dns": {"publish": [{"zone": "z", "server": "1.2.3.4:53", "tsigKeyName": "k"}]}},
     "dns.publish needs the TSIG secret"),
    ("unknown-value-key", {"replicas": 3}, "replicas"),
    ("short-admin-token", {"admin": {"token": "short"}}, "token"),
    ("scale-down-from-below", {"replicaCount": 5, "scaleDown": {"currentReplicas": 3}},
     "scaleDown.currentReplicas (3) is below replicaCount (5)"),
]


# --- rendering ------------------------------------------------------------------------------

def render(chart_dir: Path, values: dict[str, Any]) -> dict[str, str]:
    with helm.Chart.load(str(chart_dir)) as chart:
        chart.validate_schema(values)
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def objects_of(manifests: dict[str, str]) -> list[dict[str, Any]]:
    objs = []
    for path, text in sorted(manifests.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("_source", path)
                objs.append(doc)
    return objs


def strip(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "_source"}


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


# --- schema checks ---------------------------------------------------------------------------

CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def validate_schemas(objs: list[dict[str, Any]], versions: list[str], node_modules: str | None,
                     promtool: str | None, workdir: Path) -> None:
    crds = []
    for obj in objs:
        ident = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            crds.append(strip(obj))
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(strip(obj), version, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{ident} is not a valid {obj['kind']} for Kubernetes {version}: {e}")
                break
            except kubernetes_validate.SchemaNotFoundError as e:
                fail(f"{ident}: no Kubernetes {version} schema: {e}")
                break
        else:
            ok(f"{ident} valid for Kubernetes {', '.join(versions)} (strict)")
    if crds:
        if not node_modules:
            fail("Prometheus Operator objects rendered but no CRD schemas (--node-modules)")
        else:
            script = Path(__file__).with_name("crd-validate.mjs")
            res = subprocess.run(["node", str(script), node_modules], input=json.dumps(crds),
                                 capture_output=True, text=True)
            for line in res.stdout.splitlines():
                (ok if line.startswith("ok") else fail)(line[5:] + " (Prometheus Operator CRD schema)")
            if res.returncode != 0 and "FAIL" not in res.stdout:
                fail(f"crd-validate.mjs failed: {res.stderr.strip()}")
    for rule in [o for o in crds if o["kind"] == "PrometheusRule"]:
        if not promtool:
            fail("PrometheusRule rendered but promtool is missing")
            continue
        f = workdir / f"{rule['metadata']['name']}-rules.yml"
        f.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
        res = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True)
        check(res.returncode == 0,
              f"PrometheusRule groups pass `promtool check rules`" + ("" if res.returncode == 0 else f": {res.stdout}{res.stderr}"))


# --- behaviour checks ------------------------------------------------------------------------

def merged(chart_dir: Path, values: dict[str, Any]) -> dict[str, Any]:
    with helm.Chart.load(str(chart_dir)) as chart:
        return chart.merge_values(values)


def check_behaviour(name: str, objs: list[dict[str, Any]], v: dict[str, Any]) -> None:
    n = int(v["replicaCount"])
    full = fullname(v)
    headless = f"{full}-peers"
    domain = v["cluster"]["clusterDomain"]

    sts_list = find(objs, "StatefulSet", full)
    if len(sts_list) != 1:
        fail(f"exactly one StatefulSet {full} (found {len(sts_list)})")
        return
    sts = sts_list[0]
    spec = sts["spec"]
    check(spec["replicas"] == n, f"StatefulSet replicas = {n}")
    check(spec["serviceName"] == headless, "StatefulSet uses the headless Service for pod DNS")
    check(spec["podManagementPolicy"] == "Parallel", "podManagementPolicy Parallel (cold restart of a whole cluster works)")
    check(spec["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == v["persistence"]["retentionPolicy"]["whenScaled"],
          "PVC retention on scale-down as configured")
    vct = spec["volumeClaimTemplates"]
    check(len(vct) == 1 and vct[0]["metadata"]["name"] == "data"
          and vct[0]["spec"]["resources"]["requests"]["storage"] == v["persistence"]["size"],
          "one PVC per pod with the configured size")
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    c = pod["containers"][0]
    sc = c["securityContext"]
    psc = pod["securityContext"]
    check(sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
          and sc.get("capabilities", {}).get("drop") == ["ALL"] and psc.get("runAsNonRoot") is True,
          "container: non-root, read-only root filesystem, no privilege escalation, all capabilities dropped")
    check(pod.get("automountServiceAccountToken") is False, "no service account token in the pods")
    check(c["args"][:2] == ["--config", "/etc/kmsd/nodes/$(POD_NAME).toml"], "each pod reads its own config file")
    env = {e["name"]: e for e in c["env"]}
    check(env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
          "POD_NAME from the downward API")
    tok = env.get("KMSD_ADMIN_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    want_secret = v["admin"]["existingSecret"] or f"{full}-admin"
    check(tok.get("name") == want_secret, f"admin token from Secret {want_secret}")
    health_port = "metrics" if v["metrics"]["separateListener"] else "admin"
    check(c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": health_port}, f"liveness GET /healthz on {health_port}")
    check(c["readinessProbe"]["httpGet"]["path"].startswith("/readyz"), "readiness on /readyz")
    check(c["startupProbe"]["httpGet"]["path"] == "/readyz", "startup waits for a caught-up member (/readyz)")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check(ports.get("kms") == 1688 and ports.get("raft") == 7688 and ports.get("admin") == 8688, "ports 1688, 8688, 7688")
    check(pod["terminationGracePeriodSeconds"] >= 30, "grace period for leader step-down")

    # Services
    svcs = {s["metadata"]["name"]: s for s in find(objs, "Service")}
    hl = svcs.get(headless)
    check(hl is not None and hl["spec"]["clusterIP"] == "None" and hl["spec"]["publishNotReadyAddresses"] is True,
          "headless Service publishes not-ready addresses")
    kms = svcs.get(full)
    check(kms is not None and kms["spec"]["ports"][0]["port"] == v["service"]["port"]
          and kms["spec"]["type"] == v["service"]["type"], f"KMS Service {v['service']['type']}:{v['service']['port']}")
    if kms and v["service"]["externalTrafficPolicy"]:
        check(kms["spec"].get("externalTrafficPolicy") == v["service"]["externalTrafficPolicy"],
              "externalTrafficPolicy passed through")
    check(f"{full}-admin" in svcs, "admin Service")
    for s in svcs.values():
        sel = s["spec"].get("selector", {})
        check(all(labels.get(k) == val for k, val in sel.items()), f"Service {s['metadata']['name']} selects the kmsd pods")

    # Memory limit: kmsd derives its registry bound from it (docs/security.md).
    check(bool(c.get("resources", {}).get("limits", {}).get("memory")),
          "container memory limit set (the registry bound is derived from it)")

    # NetworkPolicy (on by default): KMS from anywhere or kmsFrom, Raft only from this
    # StatefulSet's own pods, admin and metrics only from the configured peers.
    nps = find(objs, "NetworkPolicy")
    npv = v["networkPolicy"]
    if npv["enabled"]:
        check(len(nps) == 1, "one NetworkPolicy")
        if nps:
            np = nps[0]["spec"]
            own = spec["selector"]["matchLabels"]
            check(np["podSelector"]["matchLabels"] == own and np["policyTypes"] == ["Ingress"],
                  "NetworkPolicy covers the kmsd pods' ingress")
            rules = np.get("ingress", [])

            def ports_of(rule: dict[str, Any]) -> set[Any]:
                return {p["port"] for p in rule.get("ports", [])}

            raft = [r for r in rules if "raft" in ports_of(r)]
            check(bool(raft) and all(r.get("from") == [{"podSelector": {"matchLabels": own}}] for r in raft),
                  "Raft port only from this StatefulSet's pods")
            kms_rules = [r for r in rules if "kms" in ports_of(r)]
            want_kms = npv["kmsFrom"] or None
            check(len(kms_rules) == 1 and kms_rules[0].get("from") == want_kms,
                  "KMS port from anywhere (or kmsFrom)")
            admin_rules = [r for r in rules if "admin" in ports_of(r)]
            check(bool(admin_rules) and all(r.get("from") for r in admin_rules),
                  "admin port only from listed peers")
            check(all(peer in [p for r in admin_rules for p in r["from"]] for peer in npv["adminFrom"]),
                  "adminFrom peers may reach the admin port")
            metric_rules = [r for r in rules if "metrics" in ports_of(r)]
            if v["metrics"]["separateListener"]:
                check(len(metric_rules) == 1 and metric_rules[0].get("from") == (npv["metricsFrom"] or None),
                      "metrics port from metricsFrom (empty = anywhere)")
            check(all(ports_of(r) <= {"kms", "raft", "admin", "metrics"} for r in rules),
                  "no other port open")
    else:
        check(not nps, "no NetworkPolicy when disabled")

    # PDB from the quorum
    pdbs = find(objs, "PodDisruptionBudget")
    if n >= 3 and v["podDisruptionBudget"]["enabled"]:
        check(len(pdbs) == 1 and pdbs[0]["spec"].get("maxUnavailable") == (n - 1) // 2,
              f"PDB maxUnavailable = {(n - 1) // 2} (quorum of {n} is {n // 2 + 1})")
    else:
        check(not pdbs, "no PDB (single node or disabled)")

    # Per-pod configuration
    cms = find(objs, "ConfigMap", f"{full}-nodes")
    if len(cms) != 1:
        fail("node ConfigMap present")
        return
    data = cms[0]["data"]
    check(sorted(data) == sorted(f"{full}-{i}.toml" for i in range(n)), f"{n} node config files, one per pod")
    fqdn = lambda i: f"{full}-{i}.{headless}.{NAMESPACE}.svc.{domain}"
    for i in range(n):
        key = f"{full}-{i}.toml"
        try:
            cfg = tomllib.loads(data.get(key, ""))
        except tomllib.TOMLDecodeError as e:
            fail(f"{key} is valid TOML: {e}")
            continue
        check(cfg["node"]["id"] == i + 1, f"{key}: node id {i + 1}")
        check(cfg["raft"]["advertise"] == f"{fqdn(i)}:7688" and cfg["admin"]["advertise"] == f"{fqdn(i)}:8688",
              f"{key}: advertises its stable pod name")
        join = cfg["raft"].get("join")
        if i == 0 and v["cluster"]["bootstrap"]:
            check(join is None, f"{key}: no join list (pod 0 bootstraps)")
        else:
            if v["raftTls"]["enabled"]:
                want = [f"http://{fqdn(j)}:8688" for j in range(n) if j != i]
            else:
                # Built-in cluster PKI: the members' Raft ports, with the shared secret.
                want = [f"{fqdn(j)}:7688" for j in range(n) if j != i]
            check(join == want, f"{key}: joins through the other {n - 1} pod(s)")
        check(("metrics_listen" in cfg["admin"]) == bool(v["metrics"]["separateListener"]), f"{key}: metrics listener as configured")
        check(("tls" in cfg["raft"]) == bool(v["raftTls"]["enabled"]), f"{key}: Raft TLS as configured")
        pubs = cfg.get("dns", {}).get("publish", [])
        check(len(pubs) == len(v["dns"]["publish"]), f"{key}: {len(pubs)} DNS publish target(s)")
        if v["dns"]["advertiseHostTemplate"]:
            want_host = v["dns"]["advertiseHostTemplate"].replace("{pod}", f"{full}-{i}")
            check(cfg["node"]["advertise_host"] == want_host, f"{key}: SRV target {want_host}")
        if v["config"]["policy"]:
            check(cfg.get("policy") == v["config"]["policy"], f"{key}: replicated policy written")

    # Scale-down Job: only when shrinking.
    jobs = find(objs, "Job")
    cur = int(v["scaleDown"]["currentReplicas"])
    if cur > n and v["scaleDown"]["enabled"]:
        if len(jobs) != 1:
            fail(f"scale-down Job rendered (found {len(jobs)})")
        else:
            job = jobs[0]
            ann = job["metadata"].get("annotations", {})
            check(ann.get("helm.sh/hook") == "pre-upgrade", "scale-down Job is a pre-upgrade hook")
            inits = job["spec"]["template"]["spec"]["initContainers"]
            ids = [ic["args"][2] for ic in inits]
            want_ids = [str(i) for i in range(cur, n, -1)]
            check(ids == want_ids, f"removes members {', '.join(want_ids)} one at a time, highest first")
            check(all(ic["args"][:2] == ["cluster", "remove"] and "--ignore-missing" in ic["args"] for ic in inits),
                  "uses `kmsctl cluster remove ID --ignore-missing` (idempotent re-runs)")
            jl = job["spec"]["template"]["metadata"]["labels"]
            check(not all(jl.get(k) == val for k, val in kms["spec"]["selector"].items()),
                  "Job pods are not selected by the Services")
    else:
        check(not jobs, "no scale-down Job (not shrinking; restarts never remove members)")

    # helm test hook
    tests = [o for o in objs if o["kind"] == "Pod" and o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    if v["test"]["enabled"]:
        if len(tests) != 1:
            fail("one helm test Pod")
        else:
            t = tests[0]
            tc = t["spec"]["containers"][0]
            check(tc["command"] == ["/usr/local/bin/kmsctl"] and tc["args"][0] == "activate"
                  and tc["args"][2].startswith(f"{full}.{NAMESPACE}.svc."), "helm test activates through the KMS Service")
            tl = t["metadata"]["labels"]
            check(not all(tl.get(k) == val for k, val in kms["spec"]["selector"].items()),
                  "test Pod is not selected by the Services or the PDB")
    else:
        check(not tests, "no helm test Pod (disabled)")


# --- main ------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("chart", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--kube-versions", default="1.27.0,1.34.0")
    ap.add_argument("--node-modules")
    ap.add_argument("--promtool")
    args = ap.parse_args()
    versions = [s for s in args.kube_versions.split(",") if s]
    args.out.mkdir(parents=True, exist_ok=True)

    print(f"Helm engine: helm-python-sdk, Helm SDK {helm.helm_sdk_version()}")
    print("== helm lint --strict")
    report = helm.lint(str(args.chart), strict=True, namespace=NAMESPACE)
    for m in report.get("messages", []):
        sev = {1: "info", 2: "warning", 3: "error"}.get(m["severity"], "unknown")
        line = f"lint {sev}: {m['path']}: {m['error']}"
        (fail if m["severity"] >= 2 else ok)(line)
    for e in report.get("errors", []) or []:
        fail(f"lint: {e}")

    for name, values in SCENARIOS:
        values = dict(values)
        kube = values.pop("_kube", versions)
        print(f"== render: {name} (Kubernetes {', '.join(kube)})")
        try:
            manifests = render(args.chart, values)
        except Exception as e:  # the engine's errors are the message we need
            fail(f"{name}: render failed: {e}")
            continue
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.yaml").write_text(
            "".join(f"# Source: {p}\n{t.strip()}\n---\n" for p, t in sorted(manifests.items()) if t.strip()))
        objs = objects_of(manifests)
        ok(f"{len(objs)} objects rendered -> {out / 'manifest.yaml'}")
        notes = [t for p, t in manifests.items() if p.endswith("NOTES.txt")]
        check(bool(notes) and "slmgr" in notes[0] and "_vlmcs._tcp" in notes[0], "NOTES.txt tells how to point clients and DNS")
        validate_schemas(objs, kube, args.node_modules, args.promtool, out)
        check_behaviour(name, objs, merged(args.chart, values))

    print("== values that must be refused")
    for name, values, needle in FAILING:
        try:
            render(args.chart, values)
        except Exception as e:
            msg = str(e)
            check(needle in msg, f"{name}: refused: {' '.join(msg.split())[:240]}")
        else:
            fail(f"{name}: rendered, but must be refused")

    print(f"chart checks: {len(FAILURES)} failed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
