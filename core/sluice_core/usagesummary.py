"""The usage summary: each policy's last hour in a few numbers, handed from ``sluice analytics``
to the operator through Redis, for ``status.usage`` (what ``kubectl get rlp`` shows).

The collector computes it from its rollups and writes it whole, at most once an
:data:`INTERVAL_S` (one replica per interval: :data:`~sluice_core.keyschema.USAGE_SUMMARY_LOCK_KEY`),
to the hash :data:`~sluice_core.keyschema.USAGE_SUMMARY_KEY` with a TTL of :data:`TTL_S`: while
no collector runs there is no summary, and the operator leaves ``status.usage`` out. The operator
reads the fields of the policies it serves in one HMGET a thousand, once per resync interval.

The hash::

    @              {"v": 1, "at": <unix s>, "window_s": 3600, "truncated": false}
    <policy ref>   {"requests": n, "limited": n, "top": [[<client>, <limited>], ...]}

A policy is named as usage names it (``namespace/name``; a ClusterRateLimitPolicy by its name);
one absent while ``@`` is there had no traffic in the window, unless ``truncated`` is true: more
than :data:`MAX_POLICIES` policies had traffic and only the busiest are there, so an absent one
is unknown (the operator then leaves its ``status.usage`` as it is, rather than show zeros). ``top`` is at most :data:`TOP`
clients, the most limited first.

A client id comes from requests: an API key's id (a Secret's name, a keys file's entry: whatever
its author typed), a header's digest, an address. It ends up in the policy's status and in
``kubectl`` output, so it is bounded and reduced to a harmless alphabet here
(:func:`display_client`), by the writer and again by the reader, which trusts nothing it reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sluice_core import configstore, keyschema, scripts

ENCODING = 1
WINDOW_S = 3600
"""What "the last hour" covers: the minutes starting in the last 3600 s, the current one included."""
INTERVAL_S = 60.0
"""How often a collector writes the summary (``--summary-interval-s``), and the least time
between two writes of one policy's ``status.usage`` by the operator."""
TTL_S = 180
"""The summary's TTL: three intervals, so one late write never blanks the status, and a stopped
collector's summary is gone three minutes later."""
TOP = 3
MAX_CLIENT = 64
"""The longest client id shown; a longer one is cut to ``MAX_CLIENT - 3`` characters + ``...``."""
CLIENT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/@+=()~-")
"""What a shown client id may hold (every other character becomes ``_``): enough for every
client form (``key:ns/name``, ``header:<base64url>``, ``ip:2001:db8::/48``, ``anonymous``),
nothing a terminal, a shell or a YAML reader would treat specially. The CRDs' pattern says the same."""
MAX_POLICIES = 10_000
"""The most policies one summary holds (the busiest); about 200 bytes each. The collector asks
its database for one more, so that the summary can say it left some out (``truncated``)."""
MAX_FIELD = 1024  # a stored value longer than this is not read
MAX_COUNT = 2**53 - 1
READ_CHUNK = 1000  # policies per HMGET
META = "@"


def display_client(text: str) -> str:
    """``text`` as a status may show it: at most :data:`MAX_CLIENT` characters of
    :data:`CLIENT_CHARS` (others replaced by ``_``; ``_`` alone for an empty one). Looks at a
    bounded prefix only, whatever the length of ``text``."""
    head = text[: MAX_CLIENT + 1]
    safe = "".join(c if c in CLIENT_CHARS else "_" for c in head)
    if len(head) > MAX_CLIENT:
        safe = safe[: MAX_CLIENT - 3] + "..."
    return safe or "_"


@dataclass(frozen=True, slots=True)
class PolicySummary:
    requests: int = 0  # every decision of the policy in the window, whatever its outcome
    limited: int = 0  # refused with 429 (outcome "limited")
    top: tuple[tuple[str, int], ...] = ()  # (client, limited), most limited first, at most TOP

    def encode(self) -> str:
        body = {"requests": self.requests, "limited": self.limited,
                "top": [[display_client(c), n] for c, n in self.top[:TOP]]}
        return json.dumps(body, separators=(",", ":"), ensure_ascii=True)


@dataclass(frozen=True, slots=True)
class Summary:
    """What the operator reads: when the summary was computed, and the policies asked for that
    it holds (a policy asked for and absent had no traffic in the window, or, when
    ``truncated``, is unknown: less busy than the :data:`MAX_POLICIES` it holds)."""

    at: int
    policies: dict[str, PolicySummary]
    truncated: bool = False


def decode(raw: bytes | str) -> PolicySummary:
    """A stored policy summary, checked; ``ValueError`` for anything else."""
    if len(raw) > MAX_FIELD:
        raise ValueError("usage summary field too long")
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError("usage summary field is not an object")
    top = body.get("top")
    if not isinstance(top, list) or len(top) > TOP:
        raise ValueError(f"usage summary top: a list of at most {TOP}")
    pairs = []
    for item in top:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError("usage summary top: [client, limited] pairs")
        pairs.append((display_client(item[0]), _count(item[1])))
    return PolicySummary(_count(body.get("requests")), _count(body.get("limited")), tuple(pairs))


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ValueError("usage summary count: an integer from 0 to 2^53-1")
    return value


async def claim(client: configstore.Client, holder: str, ttl_s: float) -> bool:
    """May ``holder`` (a collector replica) write the summary now? Yes when no replica wrote it
    in the last ``ttl_s`` (the interval), or ``holder`` did (the lease renewed)."""
    r = client.redis
    ms = max(1, int(ttl_s * 1000))
    try:
        if await r.set(keyschema.USAGE_SUMMARY_LOCK_KEY, holder, nx=True, px=ms):
            return True
        current = await r.get(keyschema.USAGE_SUMMARY_LOCK_KEY)
        if current is not None and (current.decode(errors="replace") if isinstance(current, bytes)
                                    else str(current)) == holder:
            await r.pexpire(keyschema.USAGE_SUMMARY_LOCK_KEY, ms)
            return True
        return False
    except configstore.REDIS_FAILURES as exc:
        raise configstore.ConfigStoreError(f"cannot claim the usage summary: {exc}") from exc


async def write(client: configstore.Client, policies: Mapping[str, PolicySummary], *, at: int,
                ttl_s: float = TTL_S) -> int:
    """Replace the summary with ``policies`` (at most :data:`MAX_POLICIES`: the busiest; marked
    ``truncated`` when there were more), in one script call; the number of policies written."""
    chosen = sorted(policies.items(), key=lambda kv: (-kv[1].requests, kv[0]))[:MAX_POLICIES]
    meta = json.dumps({"v": ENCODING, "at": at, "window_s": WINDOW_S, "truncated": len(policies) > MAX_POLICIES},
                      separators=(",", ":"))
    args: list[str] = [META, meta]
    for ref, summary in chosen:
        args += [ref, summary.encode()]
    script = scripts.write_usage_summary()
    try:
        await client.redis.eval(script.source, 1, keyschema.USAGE_SUMMARY_KEY, int(ttl_s * 1000), *args)
    except configstore.REDIS_FAILURES as exc:
        raise configstore.ConfigStoreError(f"cannot write the usage summary: {exc}") from exc
    return len(chosen)


async def read(client: configstore.Client, refs: Sequence[str]) -> Summary | None:
    """The summaries of ``refs`` (one HMGET per :data:`READ_CHUNK`); None when there is no
    summary (no collector wrote one within its TTL) or it is of an unknown encoding. A field
    that does not decode is left out (as no traffic), never shown."""
    try:
        values = await client.redis.hmget(keyschema.USAGE_SUMMARY_KEY, [META, *refs[:READ_CHUNK - 1]])
        meta, first = values[0], values[1:]
        if meta is None:
            return None
        found = list(first)
        for i in range(READ_CHUNK - 1, len(refs), READ_CHUNK):
            found += await client.redis.hmget(keyschema.USAGE_SUMMARY_KEY, list(refs[i:i + READ_CHUNK]))
    except configstore.REDIS_FAILURES as exc:
        raise configstore.ConfigStoreError(f"cannot read the usage summary: {exc}") from exc
    try:
        head = json.loads(meta) if len(meta) <= MAX_FIELD else None
        if not isinstance(head, dict) or head.get("v") != ENCODING:
            return None
        at = _count(head.get("at"))
    except ValueError:
        return None
    # Absent: a writer from before the flag (absent meant no traffic). Anything but a bool: the safe side.
    truncated = head.get("truncated", False) is not False
    out: dict[str, PolicySummary] = {}
    for ref, raw in zip(refs, found, strict=True):
        if raw is not None:
            try:
                out[ref] = decode(raw)
            except ValueError:
                continue
    return Summary(at, out, truncated)
