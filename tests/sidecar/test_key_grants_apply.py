"""End to end, the two halves of keys-in-Redis together: ``sluice apply --api-keys-file`` writes
grants and a document without keys, and a running cluster-mode sidecar serves those keys; a
re-apply that no longer lists a key revokes it on that sidecar, without a restart. Real
redis-server, ``sluice apply`` and the sidecar as subprocesses."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

from support.key_sidecar import DEADLINE, call, start, status
from support.keys_files import POLICY, sluice_apply
from support.polling import wait_until
from support.processes import SidecarProcess, UpstreamProcess, http_get
from support.redis_servers import RedisServer


def apply(redis_server: RedisServer, policy: Path, keys: Path) -> None:
    done = subprocess.run(sluice_apply("-f", str(policy), "--redis", redis_server.url, "--api-keys-file", str(keys)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_applied_keys_work_and_a_reapply_revokes_the_dropped_one(redis_server: RedisServer, upstream_process: UpstreamProcess,
                                                                 tmp_path: Path, labels: Path) -> None:
    ns = "ka-" + uuid.uuid4().hex[:8]
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(name="api", namespace=ns).replace(
        "apiKeys: {header: X-API-Key}", "apiKeys: {header: X-API-Key, required: true}"))
    kept, dropped = "sk-kept-" + uuid.uuid4().hex, "sk-dropped-" + uuid.uuid4().hex
    keys = tmp_path / "keys.yaml"
    keys.write_text(f'keys:\n  "{kept}": pro\n  "{dropped}": free\n')
    apply(redis_server, policy, keys)
    sidecar: SidecarProcess = start(upstream_process, redis_server.url, ns, labels)
    try:
        assert status(sidecar, kept) == 200
        # Served from Redis grants, not from keys embedded in the document.
        assert json.loads(http_get(sidecar.admin + "/admin/config")[1])["apiKeys"]["source"] == "redis"
        assert '"pro";' in call(sidecar, kept)[1]["RateLimit-Policy"]
        assert '"free";' in call(sidecar, dropped)[1]["RateLimit-Policy"]
        assert status(sidecar, "sk-never-" + uuid.uuid4().hex) == 401
        keys.write_text(f'keys:\n  "{kept}": pro\n')
        apply(redis_server, policy, keys)
        wait_until(lambda: status(sidecar, dropped) == 401, DEADLINE, what="the dropped key refused")
        assert status(sidecar, kept) == 200
    finally:
        sidecar.close()
