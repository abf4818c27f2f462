"""The sidecar's grant cache (:mod:`sluice_sidecar.grantcache`): bounded LRU tables of known and
unknown keys (a flood of unknown keys cannot push known ones out), a known key's entry never used
past its grant's expiry, and an answer from before a change notice never cached."""

from __future__ import annotations

import time

from sluice_sidecar.grantcache import MAX_DROPS, UNKNOWN, GrantCache


def test_tables_are_bounded_and_least_recently_used_goes_first() -> None:
    cache: GrantCache[str] = GrantCache(3)
    for c in ("a", "b", "c"):
        cache.put(c, "pro", 0, cache.ticket(c))
    assert cache.get("a") == "pro"  # now the most recently used
    cache.put("d", "pro", 0, cache.ticket("d"))
    assert cache.get("b") is None and [cache.get(c) for c in "acd"] == ["pro"] * 3
    for i in range(100):  # a flood of unknown keys: their own table
        cache.put(f"x{i}", None, 0, cache.ticket(f"x{i}"))
    assert [cache.get(c) for c in "acd"] == ["pro"] * 3
    assert cache.get("x99") is UNKNOWN and cache.get("x0") is None
    assert len(cache) == 6


def test_a_known_key_is_not_used_past_its_expiry() -> None:
    cache: GrantCache[str] = GrantCache(10)
    now_ms = time.time_ns() // 1_000_000
    cache.put("soon", "pro", now_ms + 60_000, cache.ticket("soon"))
    cache.put("gone", "pro", now_ms - 1, cache.ticket("gone"))
    assert cache.get("soon") == "pro"
    assert cache.get("gone") is None and len(cache) == 1


def test_answers_from_before_a_notice_are_not_cached() -> None:
    cache: GrantCache[str] = GrantCache(10)
    ticket = cache.ticket("k")  # a resolve is sent
    cache.drop("k")  # a notice arrives before its answer
    cache.put("k", "pro", 0, ticket)
    assert cache.get("k") is None
    cache.put("k", "pro", 0, cache.ticket("k"))
    cache.put("u", None, 0, cache.ticket("u"))
    cache.drop("k")
    assert cache.get("k") is None and cache.get("u") is UNKNOWN
    cache.clear()
    assert cache.get("u") is None and len(cache) == 0


def test_a_key_moves_between_tables() -> None:
    cache: GrantCache[str] = GrantCache(10)
    cache.put("k", None, 0, cache.ticket("k"))
    cache.put("k", "pro", 0, cache.ticket("k"))
    assert cache.get("k") == "pro" and len(cache) == 1
    cache.put("k", None, 0, cache.ticket("k"))
    assert cache.get("k") is UNKNOWN and len(cache) == 1


def test_a_notice_voids_only_its_own_keys_resolves() -> None:
    """A stream of single-key notices must not keep every other key from being cached."""
    cache: GrantCache[str] = GrantCache(10)
    ticket = cache.ticket("k")  # a resolve of "k" is sent
    for i in range(100):
        cache.drop(f"other-{i}")  # notices of other keys arrive before its answer
    cache.put("k", "pro", 0, ticket)
    assert cache.get("k") == "pro"


def test_a_drop_forgotten_past_the_bound_still_voids_the_answer() -> None:
    cache: GrantCache[str] = GrantCache(10)
    cache.drop("k")
    ticket = cache.ticket("k")
    cache.drop("k")  # voids the ticket ...
    for i in range(MAX_DROPS):
        cache.drop(f"other-{i}")  # ... and "k"'s count is then forgotten
    cache.put("k", "pro", 0, ticket)
    assert cache.get("k") is None
