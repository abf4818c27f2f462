"""A kubernetes client for what kopf does not do itself (CLI commands, webhook configurations,
namespace labels): in-cluster credentials when running in a pod, else the kubeconfig."""

from __future__ import annotations

from typing import Any


def default_api_client() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()
