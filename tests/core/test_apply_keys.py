"""``sluice apply --api-keys-file`` (``sluice_core.keysapply``): the keys file becomes the
policy's grants in Redis, not part of the config document; a re-apply revokes exactly the keys
it no longer lists; a bad file changes nothing; memory does not grow with the file. Real
redis-server (single and 3-master Cluster), ``sluice apply`` as a subprocess."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from sluice_core import configdoc, configstore, grants, keyschema
from sluice_core.apikeys import parse_grants
from sluice_core.errors import PolicyErrors
from sluice_core.keysfile import MAX_ERRORS, KeyEntry, KeysFile, default_key_id
from sluice_core.model import KeyGrant, Limit
from sluice_core.parse import parse_policy
from support.key_notices import KeyNotices
from support.keys_files import (
    POLICY,
    Measured,
    entry,
    key,
    run_measured,
    sluice_apply,
    write_keys_file,
)
from support.redis_servers import RedisClusterProcs, RedisServer
from support.store_calls import store_call

TOPOLOGIES = ["redis_server", pytest.param("redis_cluster", marks=pytest.mark.cluster)]


class Setup:
    """A policy of its own namespace, its keys files, and direct reads of what Redis holds."""

    def __init__(self, server: RedisServer | RedisClusterProcs, tmp_path: Path) -> None:
        self.url = server.url
        self.nodes = server.nodes if isinstance(server, RedisClusterProcs) else [server]
        self.tmp = tmp_path
        self.ns, self.salt = f"ak-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
        self.ref = f"{self.ns}/api"
        self.pid = keyschema.policy_id(self.ref)
        self.index_key = keyschema.grant_index_key(self.pid)  # where bulk notices leave from
        self.policy = tmp_path / "policy.yaml"
        self.policy.write_text(POLICY.format(name="api", namespace=self.ns))
        self.redis: Any = (redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port)
                           if len(self.nodes) > 1 else self.nodes[0].client())

    def apply(self, keys: Path, *, timeout: float = 120) -> Measured:
        return run_measured(sluice_apply("-f", str(self.policy), "--redis", self.url, "--api-keys-file", str(keys)),
                            timeout=timeout)

    def keys_file(self, name: str, indices: range | list[int], extra: str = "") -> Path:
        path = write_keys_file(self.tmp / name, self.salt, range(0))
        with path.open("a") as f:
            for i in indices:
                f.write(entry(self.salt, i))
            f.write(extra)
        return path

    def cid(self, i: int) -> str:
        return keyschema.client_for_api_key(bytes.fromhex(keyschema.hash_api_key(key(self.salt, i))))

    def grant(self, i: int) -> grants.StoredGrant | None:
        value = self.redis.get(keyschema.grant_key(self.pid, self.cid(i)))
        return grants.decode(value) if value is not None else None

    def index(self) -> set[str]:
        return {m.decode() for m in self.redis.smembers(keyschema.grant_index_key(self.pid))}

    def snapshot(self) -> dict[str, Any]:
        """Every key of this policy and namespace (grants and buckets in its hash tags, its key
        index, staging set, lease, its config document) with its value (DUMP) and expiry: what
        "nothing changed" compares. Only these: the session's Redis also holds other tests'
        buckets, which expire whenever their TTL says."""
        out: dict[str, Any] = {}
        patterns = (f"sl:{{{self.pid}:*", f"sluice:keys:{{{self.pid}}}*", keyschema.config_key(self.ns))
        for node in self.nodes:
            c = node.client()
            for pattern in patterns:
                for k in c.scan_iter(match=pattern, count=1000):
                    out[k.decode()] = (c.dump(k), c.pexpiretime(k))
        return out


def expected(salt: str, i: int) -> grants.StoredGrant:
    """What :func:`support.keys_files.entry` grants key ``i``."""
    digest = keyschema.hash_api_key(key(salt, i))
    if i % 50 == 0:
        return grants.StoredGrant(KeyGrant("pro"), f"cust-{i}", 4_070_908_800_000)
    if i % 10 == 0:
        return grants.StoredGrant(KeyGrant("free", Limit(20, 60_000_000, 20)), default_key_id(digest))
    return grants.StoredGrant(KeyGrant("pro" if i % 2 else "free"), default_key_id(digest))


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_reapply_revokes_exactly_the_keys_it_no_longer_lists(topology: str, request: pytest.FixtureRequest,
                                                            tmp_path: Path) -> None:
    s = Setup(request.getfixturevalue(topology), tmp_path)
    first = s.apply(s.keys_file("a.yaml", range(3_000)))  # three batches
    assert first.returncode == 0, first.stderr
    assert f"keys: policy {s.ref}: 3000 granted (3000 new or changed), 0 revoked" in first.stdout
    assert s.index() == {s.cid(i) for i in range(3_000)}
    for i in (0, 1, 2, 10, 50, 999, 1000, 2999):
        assert s.grant(i) == expected(s.salt, i)
    doc = json.loads(s.redis.hget(keyschema.config_key(s.ns), "doc"))
    assert doc["apiKeys"] == {} and [p["metadata"]["name"] for p in doc["policies"]] == ["api"]

    dropped = [*range(100, 200), *range(2_900, 3_000)]
    kept = [i for i in range(3_000) if i not in dropped]
    changed = f'  "{key(s.salt, 5)}": {{tier: free, id: moved}}\n'
    expired = f'  "{key(s.salt, 7)}": {{tier: pro, expiresAt: "2001-01-01T00:00:00Z"}}\n'
    later = [i for i in kept if i not in (5, 7)] + list(range(5_000, 5_050))
    second = s.apply(s.keys_file("b.yaml", later, changed + expired))
    assert second.returncode == 0, second.stderr
    assert (f"keys: policy {s.ref}: {len(later) + 1} granted (51 new or changed), 201 revoked, "
            "1 expired entries skipped") in second.stdout
    assert s.index() == {s.cid(i) for i in [*later, 5]}
    assert all(s.grant(i) is None for i in [*dropped, 7])
    assert s.grant(5) == grants.StoredGrant(KeyGrant("free"), "moved")
    for i in (4, 6, 99, 200, 2899, 5_000, 5_049):
        assert s.grant(i) == expected(s.salt, i)
    assert s.redis.pexpiretime(keyschema.grant_key(s.pid, s.cid(50))) == -1  # no TTL: the value has the expiry

    (tmp_path / "empty.yaml").write_text("keys: {}\n")
    empty = s.apply(tmp_path / "empty.yaml")  # every key revoked
    assert empty.returncode == 0, empty.stderr
    assert s.index() == set() and s.grant(4) is None


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_a_reapply_that_changes_one_key_announces_that_key_alone(topology: str, request: pytest.FixtureRequest,
                                                                  tmp_path: Path) -> None:
    """Sidecars keep what they cached of the 1,999 other keys; nothing changed: no notice."""
    s = Setup(request.getfixturevalue(topology), tmp_path)
    assert s.apply(s.keys_file("a.yaml", range(2_000))).returncode == 0
    with KeyNotices(s.nodes) as listen:
        changed = f'  "{key(s.salt, 1_234)}": {{tier: free, id: moved}}\n'
        res = s.apply(s.keys_file("b.yaml", [i for i in range(2_000) if i != 1_234], changed))
        assert res.returncode == 0, res.stderr
        assert listen.until_marker(s.index_key) == [keyschema.keys_notice(s.pid, s.cid(1_234))]
        assert s.apply(s.keys_file("b.yaml", [i for i in range(2_000) if i != 1_234], changed)).returncode == 0
        assert listen.until_marker(s.index_key) == []


def test_switching_from_embedded_keys_never_drops_a_kept_key(redis_server: RedisServer, tmp_path: Path) -> None:
    """An install whose document embeds its keys (the previous `sluice apply`, the operator) runs
    the new `sluice apply`: at every moment a key listed before and after works, read as a
    sidecar reads it (the document's embedded keys while it has them for the policy, else the
    grant). The document is read first, then the grant: the order that cannot see a grant
    that is not written yet next to a document that needs it."""
    s = Setup(redis_server, tmp_path)
    policy = parse_policy(yaml.safe_load(POLICY.format(name="api", namespace=s.ns)))
    embedded = {keyschema.hash_api_key(key(s.salt, i)): KeyGrant("pro") for i in range(3_000)}
    store_call(s.url, configstore.publish, s.ns, configdoc.build_doc(s.ns, [policy], {"api": embedded}))
    kept = list(range(500, 3_000, 50))
    proc = subprocess.Popen(sluice_apply("-f", str(s.policy), "--redis", s.url, "--api-keys-file",
                                         str(s.keys_file("b.yaml", range(300, 4_000)))),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            doc = json.loads(s.redis.hget(keyschema.config_key(s.ns), "doc"))
            if "api" in doc["apiKeys"]:
                seen.add("embedded")
                missing = [i for i in kept if keyschema.hash_api_key(key(s.salt, i)) not in doc["apiKeys"]["api"]]
            else:
                seen.add("grants")
                missing = [i for i in kept if s.grant(i) is None]
            assert missing == [], f"kept keys {missing[:5]} did not work ({seen})"
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "embedded" in seen  # the loop ran before the switch (and after it, below)
    assert "api" not in json.loads(s.redis.hget(keyschema.config_key(s.ns), "doc"))["apiKeys"]
    assert all(s.grant(i) is not None for i in kept) and s.grant(299) is None and s.grant(3_999) is not None


BAD = {
    "a bad tier at the end": ("", '  "{k}": gold\n', "keys[2500].tier: must name a tier"),
    "the same key twice": ("", '  "sha256:{d0}": pro\n', "keys[2500]: the same key is listed twice"),
    "an alias": ('  "{k}": &a {{tier: pro}}\n', '  "{k2}": *a\n', "keys[2501]: anchors and aliases"),
    "broken YAML at the end": ("", '  "{k}": [pro\n', "is not valid YAML"),
    "a bad expiry": ("", '  "{k}": {{tier: pro, expiresAt: "2027-01-31"}}\n', "keys[2500].expiresAt: must be"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_a_bad_keys_file_changes_nothing(case: str, topology: str, request: pytest.FixtureRequest,
                                         tmp_path: Path) -> None:
    """Whole batches of good entries come first (read, staged): still nothing is written, the
    errors name the entry and its line, never a key."""
    s = Setup(request.getfixturevalue(topology), tmp_path)
    assert s.apply(s.keys_file("good.yaml", range(0, 3_000, 3))).returncode == 0
    before = s.snapshot()
    head, tail, message = BAD[case]
    secret, secret2 = f"sk-secret-{uuid.uuid4().hex}", f"sk-secret-{uuid.uuid4().hex}"
    fill = {"k": secret, "k2": secret2, "d0": keyschema.hash_api_key(key(s.salt, 0))}
    bad = s.keys_file("bad.yaml", range(2_500), head.format(**fill) + tail.format(**fill))
    res = s.apply(bad)
    assert res.returncode == 1, res.stdout + res.stderr
    assert message in res.stderr
    assert secret not in res.stderr + res.stdout and secret2 not in res.stderr + res.stdout
    assert s.salt not in res.stderr + res.stdout  # no key of the file either
    assert s.snapshot() == before


def test_a_missing_keys_file_changes_nothing(redis_server: RedisServer, tmp_path: Path) -> None:
    s = Setup(redis_server, tmp_path)
    assert s.apply(s.keys_file("good.yaml", range(10))).returncode == 0
    before = s.snapshot()
    res = s.apply(tmp_path / "nope.yaml")
    assert res.returncode == 1 and "(keys file): cannot be read" in res.stderr
    assert s.snapshot() == before


@pytest.mark.slow
def test_apply_memory_does_not_grow_with_the_keys(fresh_redis: RedisServer, tmp_path: Path) -> None:
    """A keys file of 200,000 keys takes no more memory than one of 10,000 (within a few MB:
    batches, buffers), where holding the file took ~200 MB per 100,000 keys (~400 MB here: the
    bound below is 15). 1,000,000 keys: ``make bench`` (docs/benchmarks.md)."""
    s = Setup(fresh_redis, tmp_path)
    small = s.apply(s.keys_file("small.yaml", range(10_000)))
    assert small.returncode == 0, small.stderr
    big = s.apply(s.keys_file("big.yaml", range(200_000)), timeout=600)
    assert big.returncode == 0, big.stderr
    assert "200000 granted (190000 new or changed), 0 revoked" in big.stdout  # 10,000 were there
    assert len(s.index()) == 200_000
    grown_mb = (big.peak_rss_kb - small.peak_rss_kb) / 1024
    assert grown_mb < 15, f"peak RSS {small.peak_rss_kb // 1024} MB at 10k keys, {big.peak_rss_kb // 1024} MB at 200k"


# The reader alone (no Redis): what a keys file may hold, and how it is refused.

def read(tmp_path: Path, text: str) -> tuple[list[KeyEntry], list[str]]:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    reader = KeysFile(path, parse_policy(yaml.safe_load(POLICY.format(name="api", namespace="shop"))))
    entries = list(reader)
    return entries, [f"{e.path}: {e.reason}" for e in reader.all_errors()]


def test_the_reader_grants_what_the_entries_say(tmp_path: Path) -> None:
    entries, errors = read(tmp_path, 'keys:\n  "sk-1": pro\n  "sha256:' + "ab" * 32 + '": {tier: free, id: x-1}\n'
                           '  "sk-3": {tier: pro, limit: {requests: 5, period: 1m, burst: 2}, '
                           'expiresAt: 2030-01-01T00:00:00+01:00}\nother: [1, 2]\n')
    assert errors == []
    assert [(e.index, e.sha256.hex(), e.stored) for e in entries] == [
        (0, keyschema.hash_api_key("sk-1"),
         grants.StoredGrant(KeyGrant("pro"), default_key_id(keyschema.hash_api_key("sk-1")))),
        (1, "ab" * 32, grants.StoredGrant(KeyGrant("free"), "x-1")),
        (2, keyschema.hash_api_key("sk-3"), grants.StoredGrant(KeyGrant("pro", Limit(5, 60_000_000, 2)),
                                                               default_key_id(keyschema.hash_api_key("sk-3")),
                                                               1_893_452_400_000)),
    ]


@pytest.mark.parametrize(("text", "error"), [
    ("", "keys: is required"),
    ("keys:\n", "keys: is required"),
    ("- a\n", "(keys file): must be an object with a `keys` field"),
    ("keys: [a]\n", "keys: must be an object"),
    ("keys: {}\n---\nkeys: {}\n", "(keys file): holds more than one YAML document"),
    ("keys: {}\nkeys: {}\n", "keys: is given twice (line 2)"),
    ('keys:\n  "sk-secret-1": {tier: pro, tier: free}\n', "keys[0]: a field is given twice (line 2)"),
    ('keys:\n  "sk-secret-1": {tier: pro, x: [' + "1, " * 100 + "1]}\n", "keys[0]: is too large"),
    ('keys:\n  "sk-secret-1": !!binary aGk=\n', "keys[0]: holds a YAML tag a keys file does not use (line 2)"),
    ("keys:\n  12345: pro\n", "keys[0]: key must be a non-empty string"),
    ('keys:\n  "sk-secret-1": {tier: pro, id: "a b"}\n', "keys[0].id: key id must be"),
    ('keys:\n  "sk-secret-1": {tier: pro, expiresAt: "2030-01-01T00:00:00"}\n', "keys[0].expiresAt: must be"),
    ('keys:\n  "sk-secret-1": {tier: pro, limit: {requests: 0, period: 1m}}\n', "keys[0].limit.requests"),
])
def test_the_reader_refuses_by_index_and_line(tmp_path: Path, text: str, error: str) -> None:
    entries, errors = read(tmp_path, text)
    assert entries == []
    assert any(error in e for e in errors), errors
    assert not any("sk-secret" in e for e in errors)


def test_the_reader_keeps_the_first_errors_and_counts_the_rest(tmp_path: Path) -> None:
    entries, errors = read(tmp_path, "keys:\n" + "".join(f'  "sk-{i}": gold\n' for i in range(250)))
    assert entries == [] and len(errors) == MAX_ERRORS + 1
    assert errors[-1] == f"(keys file): {250 - MAX_ERRORS} more errors not shown"


def test_the_standalone_keys_file_refuses_an_expiry_it_would_not_enforce(tmp_path: Path) -> None:
    policy = parse_policy(yaml.safe_load(POLICY.format(name="api", namespace="shop")))
    with pytest.raises(PolicyErrors, match=r"keys\[0\]\.expiresAt: is not supported"):
        parse_grants({"keys": {"sk-1": {"tier": "pro", "expiresAt": "2030-01-01T00:00:00Z"}}}, policy)
    assert parse_grants({"keys": {"sk-1": {"tier": "pro", "id": "a"}}}, policy) == {
        keyschema.hash_api_key("sk-1"): KeyGrant("pro")}
