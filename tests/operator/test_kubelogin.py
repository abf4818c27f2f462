"""The operator's login (sluice_operator.kubelogin) with kopf's own credentials vault: a token
the API server rejected is not taken again when the next login reads the same token.

Found on a real cluster (tests/e2e, `helm uninstall`): the ServiceAccount is deleted while the
replicas stop, every API call answers 401, and each re-login made a new session object for the
same token, which kopf's vault took as new credentials: ~40 re-logins a second until SIGKILL."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import kopf
import pytest
import yaml
from kopf._cogs.structs.credentials import LoginError, Vault, VaultKey
from kubernetes.config import kube_config
from sluice_operator import kubelogin

LOG = logging.getLogger("test.kubelogin")


@pytest.fixture
def kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kubeconfig with a bearer token (no server is contacted: logins only read it)."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443",
                                                "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in-cluster
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.setattr(kubelogin, "_last", [], raising=False)  # a fresh login history
    return path


def _rotate(kubeconfig: Path) -> None:
    kubeconfig.write_text(kubeconfig.read_text().replace("t0ken", "n3w-t0ken"))


async def _sessions(vault: Vault) -> list[object]:
    return [info async for _, info in vault]


async def test_a_rejected_token_is_not_logged_in_again(kubeconfig: Path) -> None:
    key = VaultKey("login_pooled")
    vault = Vault()
    await vault.populate({key: await kubelogin.login_pooled(logger=LOG, settings=kopf.OperatorSettings())})
    [first] = await _sessions(vault)

    async def relogin() -> None:  # what kopf's authentication activity does once it is empty
        await vault.wait_for_emptiness()
        await vault.populate({key: await kubelogin.login_pooled(logger=LOG, settings=kopf.OperatorSettings())})

    task = asyncio.create_task(relogin())
    try:
        # An API call answered 401 with these credentials: kopf invalidates them and waits for
        # the re-login, which reads the same token: nothing valid is left.
        with pytest.raises(LoginError):
            await vault.invalidate(key, first, exc=RuntimeError("401 Unauthorized"))
        assert vault.is_empty()
    finally:
        await task
        await first.aiohttp_session.close()  # type: ignore[attr-defined]


async def test_a_rotated_token_is_logged_in(kubeconfig: Path) -> None:
    """The kubelet rewrites a projected token before it expires: new credentials, taken."""
    first = await kubelogin.login_pooled(logger=LOG, settings=kopf.OperatorSettings())
    _rotate(kubeconfig)
    second = await kubelogin.login_pooled(logger=LOG, settings=kopf.OperatorSettings())
    try:
        assert first is not None and second is not None and second != first
        assert second.aiohttp_session.headers["Authorization"] == "Bearer n3w-t0ken"
    finally:
        for context in (first, second):
            if context is not None:
                await context.aiohttp_session.close()
