"""The key Secret listing against the real kube-apiserver, as an operator restricted with
``--namespace NAME`` sees it: authenticated as a ServiceAccount that a Role allows to list and
watch Secrets in that namespace only (what namespaced RBAC gives), it lists them, a page at a
time, and refuses a Secret whose key field is absurdly large (a key problem, not a key)."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import config as k8s_config
from sluice_core import configstore
from sluice_operator.keyevents import KeyEvents
from sluice_operator.reconcile import Reconciler
from sluice_operator.resync import Standalone
from sluice_operator.secretwatch import MAX_FIELD, PAGE
from sluice_operator.settings import OperatorSettings
from support.control_plane import ControlPlane

pytestmark = pytest.mark.k8s
SECRETS = PAGE + 10  # more than one page
DEADLINE = 30.0


def secret(ns: str, name: str, key: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": ns, "labels": {"sluice.dev/policy": "api"}},
            "data": {"key": base64.b64encode(key.encode()).decode(), "tier": base64.b64encode(b"free").decode()}}


def namespaced_kubeconfig(cp: ControlPlane, ns: str, tmp_path: Path) -> Path:
    """A ServiceAccount of ``ns`` allowed to list and watch Secrets there, and nothing else."""
    cp.kubectl("create", "serviceaccount", "op", "-n", ns)
    cp.kubectl("create", "role", "keys", "--verb=list,watch", "--resource=secrets", "-n", ns)
    cp.kubectl("create", "rolebinding", "keys", "--role=keys", f"--serviceaccount={ns}:op", "-n", ns)
    token = cp.kubectl("create", "token", "op", "-n", ns, "--duration=1h").stdout.strip()
    path = tmp_path / "op.kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": cp.server, "certificate-authority": str(cp.ca_cert)}}],
        "users": [{"name": "op", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "op"}}], "current-context": "c"}))
    path.chmod(0o600)
    return path


async def test_a_namespaced_operator_lists_its_key_secrets_with_a_role_only(
        control_plane: ControlPlane, redis_server: Any, tmp_path: Path) -> None:
    cp = control_plane
    ns = "sluice-kl-" + uuid.uuid4().hex[:6]
    cp.kubectl("create", "namespace", ns)
    try:
        items = [secret(ns, f"k{i}", f"sk-{uuid.uuid4().hex}") for i in range(SECRETS)]
        items.append(secret(ns, "huge", "x" * (MAX_FIELD + 1)))
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}))
        kubeconfig = namespaced_kubeconfig(cp, ns, tmp_path)
        settings = OperatorSettings(redis=redis_server.url, namespaces=(ns,))
        reconciler = Reconciler(configstore.connect(redis_server.url))

        async def not_called(*_: Any) -> Any:
            raise AssertionError("no policy here: nothing to reconcile")

        events = KeyEvents(settings, reconciler,
                           lambda: k8s_config.new_client_from_config(config_file=str(kubeconfig)),  # type: ignore[no-untyped-call]
                           Standalone(), not_called, not_called, cluster_keys=False)
        events.start({})
        try:
            deadline = time.monotonic() + DEADLINE
            while not all(e.is_set() for e in reconciler.keys_listed):
                assert time.monotonic() < deadline, "the key Secrets were never listed (RBAC: see the log)"
                await asyncio.sleep(0.05)
            records = {k.key_id: k for k in events.records(ns)}
            assert len(records) == SECRETS + 1
            assert all(records[f"{ns}/k{i}"].digest is not None for i in range(SECRETS))
            huge = records[f"{ns}/huge"]
            assert huge.digest is None and huge.problem and "data.key is larger" in huge.problem
        finally:
            await events.stop()
            await reconciler.close()
    finally:
        cp.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")
