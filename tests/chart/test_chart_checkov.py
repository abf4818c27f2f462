"""checkov (a scanner people already run on charts) on the rendered chart, in the values sets
people install: every Kubernetes check passes but the few skipped below, each for a reason that
holds for Sluice. A new failure fails the test. checkov lives in its own virtualenv
(.venv-tools, `make setup-tools`, pinned in hack/tools-constraints.txt): its dependencies must
not move the main venv's pins."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support.chart import CHART, helm
from support.paths import ROOT

pytestmark = pytest.mark.k8s  # helm is one of the k8s tools (hack/k8s/build.sh)

CHECKOV = ROOT / ".venv-tools" / "bin" / "checkov"

SKIPPED = {
    # No CPU limit on the operator, the collector or Redis: CFS throttling adds latency to every
    # decision and admission review while the node has CPU to spare; requests are set, and
    # memory limits too (memory is what can take a node down).
    "CKV_K8S_11": "CPU limits",
    # Pull policy Always: images here are imported without a registry (make image) and tags are
    # immutable releases; Always would make every pod start depend on a registry.
    "CKV_K8S_15": "imagePullPolicy Always",
    # Image digests: the chart takes repository and tag values; pinning by digest is the
    # user's choice (a tag of the form `0.1.0@sha256:...` works).
    "CKV_K8S_43": "image digest",
    # Secrets as files: the Redis URL (with its password) and the database URL reach the
    # operator, the collector and redis-cli by environment variable (secretKeyRef), the way
    # every Sluice setting is read (settingsform); they are never logged.
    "CKV_K8S_35": "secrets as environment variables",
    # Service-account token mounted: the operator and the collector talk to the API server
    # (watching policies and Secrets; TokenReview / SubjectAccessReview); Redis has none.
    "CKV_K8S_38": "service-account token",
    # The operator patches its CA bundle into its own two webhook configurations (resourceNames
    # sluice-policies / sluice-injector) and may create them (RBAC cannot name a create).
    "CKV_K8S_155": "webhook configuration ClusterRole",
}

VALUE_SETS = {
    "default": [],
    "external-redis-postgres": ["--set", "redis.enabled=false",
                                "--set", "externalRedis.existingSecret=redis",
                                "--set", "sidecar.redisSecret.name=redis",
                                "--set", "analytics.database.existingSecret=usage-db",
                                "--set", "analytics.replicaCount=2"],
    "redis-persistence": ["--set", "redis.persistence.enabled=true",
                          "--set", "sidecar.redisSecret.namespaces={shop}"],
    # GitOps: the password from a Secret of yours, through Redis's init container
    "gitops-redis-password": ["--set", "redis.auth.existingSecret=redis-pass",
                              "--set", "monitoring.podMonitors.enabled=true"],
}


def checkov(path: Path) -> dict[str, Any]:
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} is missing: run `make setup-tools` (hack/tools.sh)")
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    res = subprocess.run(
        [str(CHECKOV), "-f", str(path), "--framework", "kubernetes", "--skip-download",
         "--compact", "-o", "json", "--skip-check", ",".join(SKIPPED)],
        capture_output=True, text=True, timeout=300, env=env, check=False,
        stdin=subprocess.DEVNULL)
    assert res.returncode in (0, 1), f"checkov exited {res.returncode}: {res.stderr[-2000:]}"
    report = json.loads(res.stdout)
    return dict(report[0] if isinstance(report, list) else report)


@pytest.mark.parametrize("values", list(VALUE_SETS.values()), ids=list(VALUE_SETS))
def test_checkov_passes_the_rendered_chart(values: list[str], tmp_path: Path) -> None:
    out = helm("template", "sluice", str(CHART), "--namespace", "sluice-system", *values).stdout
    path = tmp_path / "rendered.yaml"
    path.write_text(out)
    report = checkov(path)
    failed = [f"{f['check_id']} {f['resource']}: {f['check_name']}"
              for f in report["results"]["failed_checks"]]
    assert not failed, "checkov finds:\n" + "\n".join(failed)
    summary = report["summary"]
    assert summary["parsing_errors"] == 0 and summary["passed"] > 150, summary
    # the NetworkPolicy check (CKV2_K8S_6, a pod without a policy) ran and passed
    passed = {f["check_id"] for f in report["results"]["passed_checks"]}
    assert "CKV2_K8S_6" in passed
