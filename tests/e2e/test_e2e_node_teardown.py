"""Tearing the one-node cluster down leaves the machine as it was found: no process, mount,
link (bridge, veth), network namespace, iptables chain, cgroup, changed sysctl or default path
(/var/lib/cni, /var/lib/kubelet, ...) of the node is left (tests/support/node.py: HostState)."""

from __future__ import annotations

import json

import pytest
from support.node import HostState, NodeSession, node_up

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]


def test_teardown_leaves_the_host_as_found(node_session: NodeSession) -> None:
    node = node_up(node_session)
    # Exercise everything teardown must undo: a Pod (network namespace, veth, IP, mounts for
    # its service-account token, cgroups) behind a Service (kube-proxy's chains).
    ns = node.make_namespace()
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"app": "p"}},
           "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
               "name": "p", "image": "localhost/sluice-e2e-busybox:1",
               "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "p"},
           "spec": {"selector": {"app": "p"}, "ports": [{"port": 80}]}}
    node.kubectl("apply", "-n", ns, "-f", "-",
                 input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [pod, svc]}))
    node.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/p", "--timeout=120s",
                 timeout=150)
    during = HostState.snapshot(node_session.node_dirs)
    assert node_session.baseline is not None
    assert during.changes_since(node_session.baseline), "the node changed nothing on the host?"

    node_session.down()

    after = HostState.snapshot(node_session.node_dirs)
    assert after.changes_since(node_session.baseline) == []
    assert [d for d in node_session.node_dirs if d.exists()] == []
