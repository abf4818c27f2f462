"""The keys-changed channel (``keyschema.KEYS_CHANNEL``) as tests read it: every notice up to a
marker the test sends after its action, so "exactly these notices" needs no waiting for
messages that may never come. The marker is sent with ``announce_keys.lua`` from the node of a
key the test names (on a Cluster, messages published on different nodes may overtake each
other: name a key on the node the notices came from, the policy's index for bulk notices)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import redis
from sluice_core import keyschema, scripts

from support.redis_servers import RedisServer


class KeyNotices:
    """Subscribed from construction to :meth:`close` (or the ``with`` block): a test subscribes
    before its action, then reads what the action sent with :meth:`until_marker`."""

    def __init__(self, nodes: Sequence[RedisServer]) -> None:
        """``nodes``: one server (single Redis, a Sentinel's master) or every primary of a Cluster."""
        first = nodes[0]
        self.redis: Any = (redis.RedisCluster(host=first.host, port=first.port) if len(nodes) > 1
                           else redis.Redis(host=first.host, port=first.port))
        self.sub = self.redis.pubsub()
        self.sub.subscribe(keyschema.KEYS_CHANNEL)

    def __enter__(self) -> KeyNotices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sub.close()
        self.redis.close()

    def until_marker(self, route_key: str, timeout: float = 10.0) -> list[str]:
        """The notices received before the marker sent now from ``route_key``'s node."""
        marker = f"marker {uuid.uuid4().hex}"
        self.redis.eval(scripts.announce_keys().source, 1, route_key, keyschema.KEYS_CHANNEL, marker)
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.sub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if m is None:
                continue
            text = m["data"].decode()
            if text == marker:
                return out
            out.append(text)
        raise AssertionError(f"no marker within {timeout} s; got {out}")
