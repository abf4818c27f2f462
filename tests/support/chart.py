"""The Helm chart in charts/sluice as the tests drive it: ``helm`` (built into the k8s tools
directory; a missing binary fails the test with what to build) and ``render`` (helm template,
CRDs included, as YAML documents)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from typing import Any

import pytest
import yaml
from sluice_operator.webhook_config import Endpoint

from support.control_plane import require_binaries
from support.paths import ROOT

CHART = ROOT / "charts" / "sluice"
KOPF_CRD = "kopf.dev_clusterkopfpeerings.yaml"  # kopf's, not Sluice's: only in the chart


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = require_binaries(names=("helm",)) / "helm"
    env = {**os.environ, "HELM_CACHE_HOME": str(ROOT / ".pytest_cache" / "helm"),
           "HELM_CONFIG_HOME": str(ROOT / ".pytest_cache" / "helm"),
           "HELM_DATA_HOME": str(ROOT / ".pytest_cache" / "helm")}
    res = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120,
                         env=env, check=False, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} exited {res.returncode}\n--- stdout\n{res.stdout}"
                    f"--- stderr\n{res.stderr}")
    return res


def render(*set_args: str, namespace: str = "sluice-system") -> list[dict[str, Any]]:
    out = helm("template", "sluice", str(CHART), "--namespace", namespace, "--include-crds",
               *set_args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def operator_webhook_configurations(endpoint: Endpoint, ca_pem: bytes) -> dict[str, dict[str, Any]]:
    """What the operator writes for ``endpoint`` (webhook_config), by kind."""
    from sluice_operator import webhook_config
    from sluice_operator.settings import OperatorSettings

    skip = next(f.default for f in dataclasses.fields(OperatorSettings) if f.name == "skip_namespaces")
    return {"ValidatingWebhookConfiguration": webhook_config.validating(endpoint, ca_pem),
            "MutatingWebhookConfiguration": webhook_config.mutating(endpoint, ca_pem,
                                                                    skip_namespaces=skip)}


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one rendered object of ``kind`` named ``name`` (fails the test when missing)."""
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    """The one container of a Deployment's or StatefulSet's pod template."""
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(c)


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    """A container's env by name: the value, or the valueFrom object."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def secret_ref(name: str, key: str) -> dict[str, Any]:
    return {"secretKeyRef": {"name": name, "key": key}}
