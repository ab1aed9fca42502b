"""deployment.yaml and deploy/prometheus-adapter.yaml against the Kubernetes schemas (offline)
and checkov, and the facts the deployment relies on; the Dockerfile's promises as text (the
image itself is built and run by `make container-test`, which needs podman and root)."""

from __future__ import annotations

import json
import os
import re
import subprocess

import kubernetes_validate
import pytest
import yaml

from policy_server.config import ServerConfig
from policy_server.telemetry import metrics
from tests.support.serving import ROOT

MANIFESTS = ("deployment.yaml", "deploy/prometheus-adapter.yaml")
DOCS = [d for d in yaml.safe_load_all((ROOT / "deployment.yaml").read_text()) if d]
BY_KIND = {d["kind"]: d for d in DOCS}
ADAPTER = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter.yaml").read_text())
CHECKOV = os.environ.get("CHECKOV", str(ROOT / ".venv" / "checkov" / "bin" / "checkov"))
# Findings that do not apply, each skipped inline with its reason.
SKIPPED = {"CKV_K8S_43", "CKV_DOCKER_7"}


@pytest.mark.parametrize("doc", [*DOCS, ADAPTER], ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_document_is_valid_against_the_kubernetes_schema(doc):
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_manifest_has_every_piece():
    assert [d["kind"] for d in DOCS] == [
        "Namespace", "Secret", "ServiceAccount", "PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy",
        "HorizontalPodAutoscaler",
    ]
    namespace = BY_KIND["Namespace"]["metadata"]["name"]
    assert namespace != "default"
    assert all(d["metadata"]["namespace"] == namespace for d in DOCS[1:])


def pod():
    return BY_KIND["Deployment"]["spec"]["template"]["spec"]


def container():
    return pod()["containers"][0]


def env():
    return {e["name"]: e for e in container()["env"]}


def mounts():
    return {m["mountPath"]: m for m in container()["volumeMounts"]}


def volumes():
    return {v["name"]: v for v in pod()["volumes"]}


def test_every_pod_shares_one_read_write_many_store():
    pvc = BY_KIND["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert volumes()["model-store"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert mounts()[env()["POLICY_SERVER_MODEL_STORE"]["value"]]["name"] == "model-store"


def test_probes_resources_and_drain_fit_together():
    c = container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = int(env()["POLICY_SERVER_GRACEFUL_TIMEOUT_S"]["value"])
    assert pod()["terminationGracePeriodSeconds"] > pre_stop + drain


def test_keys_are_files_from_the_secret():
    secret = BY_KIND["Secret"]
    keys = volumes()["keys"]["secret"]
    assert keys["secretName"] == secret["metadata"]["name"]
    assert keys["defaultMode"] & ~0o640 == 0  # quiet: the server warns above 0640
    files = {item["path"]: item["key"] for item in keys["items"]}
    mount = next(path for path, m in mounts().items() if m["name"] == "keys")
    assert mounts()[mount]["readOnly"] is True
    for name in ("POLICY_SERVER_API_KEY_FILE", "POLICY_SERVER_ADMIN_KEY_FILE"):
        directory, _, file = env()[name]["value"].rpartition("/")
        assert directory == mount and files[file] in secret["stringData"]
    assert not any("valueFrom" in e for e in container()["env"])  # no key in the environment


def test_the_pod_runs_hardened_and_writes_only_its_volumes():
    spec, context = pod(), container()["securityContext"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == BY_KIND["ServiceAccount"]["metadata"]["name"]
    assert BY_KIND["ServiceAccount"]["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] >= 10000
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert context == {
        "runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
        "privileged": False, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container()["imagePullPolicy"] == "Always"
    # Where the read-only image writes: its two volumes and /tmp (the Dockerfile says the same).
    dockerfile = (ROOT / "Dockerfile").read_text()
    image_volumes = json.loads(re.search(r"^VOLUME (.*)$", dockerfile, re.M).group(1))
    assert set(image_volumes) | {"/tmp"} <= set(mounts())


def test_the_network_policy_admits_robots_and_prometheus_only():
    policy = BY_KIND["NetworkPolicy"]["spec"]
    labels = BY_KIND["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress", "Egress"] and "egress" not in policy  # no egress at all
    port = container()["ports"][0]["containerPort"]
    assert len(policy["ingress"]) == 2
    for rule in policy["ingress"]:
        assert rule["ports"] == [{"protocol": "TCP", "port": port}]
        assert rule["from"] and all(peer for peer in rule["from"])  # no empty peer: that would admit everyone
    prometheus = policy["ingress"][1]["from"][0]
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


def test_the_hpa_scales_on_load_metrics_the_adapter_serves_from_the_servers_metrics():
    hpa = BY_KIND["HorizontalPodAutoscaler"]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", BY_KIND["Deployment"]["metadata"]["name"])
    wanted = {m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"}
    assert len(wanted) == len(hpa["metrics"]) == 2  # load per pod, no CPU utilisation
    rules = yaml.safe_load(ADAPTER["data"]["config.yaml"])["rules"]
    assert {rule["name"]["as"] for rule in rules} == wanted
    exported, _ = metrics.exposition()
    for rule in rules:
        series = rule["seriesQuery"].split("{")[0]
        family = series.removesuffix("_sum")
        assert f"# TYPE {family} ".encode() in exported, family  # the server exports it
        assert re.fullmatch(rule["name"]["matches"].strip("^$"), series)
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    in_flight = next(r for r in rules if r["name"]["as"] == "policy_requests_in_flight")["metricsQuery"]
    routes = re.search(r'route=~"([^"]+)"', in_flight).group(1)
    # HTTP inference routes, and the WebSocket messages observability counts as "ws:" + the rule
    for route in ("/infer", "/models/<name>/infer", "/v2/models/<name>/infer", "ws:/", "ws:/infer"):
        assert re.fullmatch(routes, route), route
    for route in ("/update_model", "/ready", "/models/<name>/load"):
        assert not re.fullmatch(routes, route), route


def test_names_line_up():
    labels = BY_KIND["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert BY_KIND["Service"]["spec"]["selector"].items() <= labels.items()
    assert container()["ports"][0]["containerPort"] == ServerConfig().port
    fields = {f"POLICY_SERVER_{name.upper()}" for name in ServerConfig.__dataclass_fields__}
    assert set(env()) <= fields  # no misspelt setting silently ignored


@pytest.mark.skipif(
    not os.access(CHECKOV, os.X_OK),
    reason=f"checkov is not installed at {CHECKOV} (make install puts it there from deploy/checkov-constraints.txt; "
    "it needs the package index); set CHECKOV to another checkov to use it",
)
def test_checkov_finds_nothing():
    files = [*MANIFESTS, "Dockerfile", "deploy/nginx/Dockerfile"]
    command = [CHECKOV, "--skip-download", "--framework", "kubernetes", "dockerfile", "-o", "json"]
    for path in files:
        command += ["-f", path]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}
    scanned = {c["file_path"].lstrip("/") for r in reports for c in r["results"]["passed_checks"]}
    assert scanned == set(files)  # every file read as what it is (checkov ignores a name it does not know)
    failed = [(c["check_id"], c["file_path"]) for r in reports for c in r["results"]["failed_checks"]]
    assert failed == []
    skipped = {c["check_id"]: c["check_result"].get("suppress_comment") for r in reports
               for c in r["results"]["skipped_checks"]}
    assert set(skipped) == SKIPPED and all(len(reason) > 20 for reason in skipped.values()), skipped
    assert sum(r["summary"]["passed"] for r in reports) > 100


def test_dockerfile_promises():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:0$", text, re.M)  # numeric (runAsNonRoot can check it), group 0
    assert re.search(r'^VOLUME \["/data/model-store", "/app/logs"\]$', text, re.M)
    assert "POLICY_SERVER_MODEL_STORE=/data/model-store" in text and "POLICY_SERVER_LOG_DIR=/app/logs" in text
    assert re.search(r'^CMD \["gunicorn", "--config", "gunicorn.conf.py"\]$', text, re.M)
    assert "ARG BASE=" in text and "TORCH_SPEC" in text  # the CUDA variant by build argument
    for copied in ("server.py", "gunicorn.conf.py", "policy_server", "models"):
        assert copied in text


def test_the_healthcheck_probes_from_the_servers_own_settings():
    """Not a fixed port: the probe reads POLICY_SERVER_* as the server does."""
    text = (ROOT / "Dockerfile").read_text()
    check = re.search(r"^HEALTHCHECK .*\n\s+CMD (.*)$", text, re.M).group(1)
    assert check == '["python3", "-m", "policy_server.healthcheck"]'
    assert "50000/health" not in text


def test_the_image_keeps_nothing_writable_but_its_volumes_and_group_0():
    """Any uid in group 0 writes the store and logs; everything else comes read-only."""
    text = (ROOT / "Dockerfile").read_text()
    assert "chown 10001:0 /data/model-store /app/logs && chmod 0775 /data/model-store /app/logs" in text
    run_stage = text[text.rindex("\nFROM "):]
    assert "COPY --from=build /opt/venv /opt/venv" in run_stage
    assert "pip install" not in run_stage  # no build tools at run time
