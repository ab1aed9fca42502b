"""deployment.yaml against the Kubernetes schemas (offline), and the facts the deployment relies on;
the Dockerfile's promises (checked as text: this machine has no container runtime)."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml

from policy_server.config import ServerConfig
from tests.serving import ROOT

DOCS = [d for d in yaml.safe_load_all((ROOT / "deployment.yaml").read_text()) if d]
BY_KIND = {d["kind"]: d for d in DOCS}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_document_is_valid_against_the_kubernetes_schema(doc):
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_manifest_has_every_piece():
    assert set(BY_KIND) == {"Secret", "PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler"}


def container():
    return BY_KIND["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def env():
    return {e["name"]: e for e in container()["env"]}


def test_every_pod_shares_one_read_write_many_store():
    pvc = BY_KIND["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = BY_KIND["Deployment"]["spec"]["template"]["spec"]
    volume = {v["name"]: v for v in pod["volumes"]}["model-store"]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    mount = {m["name"]: m for m in container()["volumeMounts"]}["model-store"]
    assert env()["POLICY_SERVER_MODEL_STORE"]["value"] == mount["mountPath"]


def test_probes_resources_and_drain_fit_together():
    c = container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = int(env()["POLICY_SERVER_GRACEFUL_TIMEOUT_S"]["value"])
    grace = BY_KIND["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + drain


def test_keys_come_from_the_secret_and_names_line_up():
    secret = BY_KIND["Secret"]
    for name in ("POLICY_SERVER_API_KEY", "POLICY_SERVER_ADMIN_KEY"):
        ref = env()[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    labels = BY_KIND["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert BY_KIND["Service"]["spec"]["selector"].items() <= labels.items()
    target = BY_KIND["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", BY_KIND["Deployment"]["metadata"]["name"])
    port = container()["ports"][0]["containerPort"]
    assert port == ServerConfig().port
    fields = {f"POLICY_SERVER_{name.upper()}" for name in ServerConfig.__dataclass_fields__}
    assert set(env()) <= fields  # no misspelt setting silently ignored


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
