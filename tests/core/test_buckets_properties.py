"""Property tests of the bucket arithmetic (GCRA) on MemoryStore with a fake clock.

MemoryStore is the decision script's arithmetic in Python (``decide.lua``); the store tests
check both against each other and against Redis. Here a fake microsecond clock makes every
property exact: no tolerance anywhere.

Reply layout: ``[allowed, retry_us, (remaining, next_token_us, full_us) per bucket]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sluice_core.gcra import expand
from sluice_core.model import Limit
from sluice_sidecar.stores.memory import MemoryStore

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
T0 = 1_700_000_000_000_000  # a realistic epoch in microseconds


class FakeClock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@dataclass
class Bucket:
    """One bucket as the caller sees it: key + limit, with the store's reply decoded."""

    key: str
    limit: Limit

    @property
    def em(self) -> int:
        return self.limit.emission_us

    @property
    def cap(self) -> int:
        return self.limit.capacity_us


@dataclass(frozen=True)
class Reply:
    """A decision's fields, one tuple per field across its buckets (what the properties compare)."""

    allowed: bool
    retry_us: int
    remaining: tuple[int, ...]
    next_us: tuple[int, ...]
    full_us: tuple[int, ...]


def params(buckets: list[Bucket]) -> tuple[int, ...]:
    return tuple(x for b in buckets for x in (b.em, b.cap))


def decide(store: MemoryStore, buckets: list[Bucket], cost: int) -> Reply:
    d = expand(store.decide_now(tuple(b.key for b in buckets), cost, params(buckets)), cost, params(buckets))
    assert len(d.buckets) == len(buckets)
    assert type(d.allowed) is bool and type(d.retry_us) is int, d
    assert all(type(x) is int for b in d.buckets for x in b), d
    return Reply(d.allowed, d.retry_us, tuple(b.remaining for b in d.buckets),
                 tuple(b.next_us for b in d.buckets), tuple(b.full_us for b in d.buckets))


def peek(store: MemoryStore, buckets: list[Bucket]) -> Reply:
    r = decide(store, buckets, 0)
    assert r.allowed and r.retry_us == 0, "a cost-0 peek is always allowed"
    return r


def snapshot(store: MemoryStore, clock: FakeClock, buckets: list[Bucket],
             at: int | None = None) -> list[tuple[int, int, int]]:
    """(remaining, next_us, full_us) of each bucket at ``at`` (default: now), read-only."""
    saved = clock.now
    if at is not None:
        clock.now = at
    try:
        r = peek(store, buckets)
    finally:
        clock.now = saved
    return list(zip(r.remaining, r.next_us, r.full_us, strict=True))


# Strategies ----------------------------------------------------------------------------------
@st.composite
def limits(draw: st.DrawFn, max_burst: int = 20) -> Limit:
    requests = draw(st.integers(1, 1000))
    period_us = draw(st.one_of(
        st.integers(1, 1000),  # emission of a few microseconds (or 1)
        st.integers(1, 10**9),  # up to ~17 minutes
        st.sampled_from([10**6, 60 * 10**6, 3600 * 10**6]),
    ))
    burst = draw(st.integers(1, max_burst))
    return Limit(requests=requests, period_us=period_us, burst=burst)


@st.composite
def schedules(draw: st.DrawFn, em: int, cap: int, max_cost: int, min_size: int = 1,
              max_size: int = 40) -> list[tuple[int, int]]:
    """(gap_us before the call, cost) pairs: bursts, gaps around the emission interval, idles."""
    gap = st.one_of(st.just(0), st.integers(0, 2 * em), st.integers(0, cap + 2 * em),
                    st.sampled_from([em - 1, em, em + 1]).filter(lambda g: g >= 0))
    return draw(st.lists(st.tuples(gap, st.integers(1, max_cost)), min_size=min_size,
                         max_size=max_size))


# (a) never over-admits --------------------------------------------------------------------------
@SETTINGS
@given(data=st.data(), limit=limits())
def test_admitted_cost_over_any_window_is_bounded(data: st.DataObject, limit: Limit) -> None:
    """Over every window [t0, t1]: admitted tokens <= burst + (t1 - t0) / emission, exactly:
    admitted * em <= cap + (t1 - t0)."""
    b = Bucket("k", limit)
    sched = data.draw(schedules(b.em, b.cap, max_cost=limit.burst + 1))
    clock = FakeClock()
    store = MemoryStore(clock_us=clock)
    admitted: list[tuple[int, int]] = []  # (time, cost)
    for gap, cost in sched:
        clock.now += gap
        if decide(store, [b], cost).allowed:
            admitted.append((clock.now, cost))
    for i, (t0, _) in enumerate(admitted):
        total = 0
        for t1, cost in admitted[i:]:
            total += cost
            assert total * b.em <= b.cap + (t1 - t0), (limit, t0, t1, total)


@SETTINGS
@given(data=st.data(), limit=limits(), n_stores=st.integers(2, 4))
def test_tokens_admitted_never_exceed_refill_plus_burst_from_fresh(
        data: st.DataObject, limit: Limit, n_stores: int) -> None:
    """From a fresh bucket at T0, by any time t the total admitted is <= burst + (t - T0) / em,
    however the calls are spread over keys of other clients in between (they do not interfere)."""
    b = Bucket("client-a", limit)
    others = [Bucket(f"client-{i}", limit) for i in range(n_stores)]
    sched = data.draw(schedules(b.em, b.cap, max_cost=limit.burst))
    clock = FakeClock()
    store = MemoryStore(clock_us=clock)
    total = 0
    for gap, cost in sched:
        clock.now += gap
        for o in others:  # noise on other keys must not change client-a's bucket
            decide(store, [o], 1)
        if decide(store, [b], cost).allowed:
            total += cost
        assert total * b.em <= b.cap + (clock.now - T0)


# (b) does not under-admit ---------------------------------------------------------------------
@SETTINGS
@given(limit=limits(), n=st.integers(1, 50), late=st.lists(st.integers(0, 10**6), max_size=50))
def test_client_asking_when_a_token_is_due_is_always_admitted(
        limit: Limit, n: int, late: list[int]) -> None:
    """The full burst at once, then one request each time a token is due (or later): all pass."""
    b = Bucket("k", limit)
    clock = FakeClock()
    store = MemoryStore(clock_us=clock)
    for _ in range(limit.burst):
        assert decide(store, [b], 1).allowed
    r = decide(store, [b], 1)
    assert not r.allowed and r.remaining == (0,)
    for i in range(n):
        clock.now += b.em + (late[i] if i < len(late) else 0)
        r = decide(store, [b], 1)
        assert r.allowed, (limit, i)


@SETTINGS
@given(limit=limits(), extra_gap=st.integers(0, 10**7), data=st.data())
def test_after_idling_the_full_burst_is_available_again(
        limit: Limit, extra_gap: int, data: st.DataObject) -> None:
    b = Bucket("k", limit)
    clock = FakeClock()
    store = MemoryStore(clock_us=clock)
    for gap, cost in data.draw(schedules(b.em, b.cap, max_cost=limit.burst)):
        clock.now += gap
        decide(store, [b], cost)
    # Any history is forgotten after capacity_us of idling (and not one microsecond earlier
    # when the bucket was empty just now).
    clock.now += b.cap + extra_gap
    assert snapshot(store, clock, [b]) == [(limit.burst, 0, 0)]
    for _ in range(limit.burst):
        assert decide(store, [b], 1).allowed
    assert not decide(store, [b], 1).allowed


@SETTINGS
@given(data=st.data(), limit=limits())
def test_conforming_schedule_is_always_admitted(data: st.DataObject, limit: Limit) -> None:
    """A schedule that an ideal token bucket (burst tokens, +1 every em) would allow in full is
    allowed in full: each call's cost fits what an exact reference bucket holds."""
    b = Bucket("k", limit)
    clock = FakeClock()
    store = MemoryStore(clock_us=clock)
    credit = b.cap  # reference: microseconds of credit, capped at cap
    for gap, cost in data.draw(schedules(b.em, b.cap, max_cost=limit.burst)):
        clock.now += gap
        credit = min(b.cap, credit + gap)
        if cost * b.em > credit:  # the client waits instead of calling early
            wait = cost * b.em - credit
            clock.now += wait
            credit += wait
        assert decide(store, [b], cost).allowed
        credit -= cost * b.em


# (c) refill is exact ------------------------------------------------------------------------------
@SETTINGS
@given(limit=limits(), data=st.data())
def test_refill_is_exact(limit: Limit, data: st.DataObject) -> None:
    """After emptying a fresh bucket, k tokens are back after exactly k * em, not a µs sooner."""
    b = Bucket("k", limit)
    clock = FakeClock(T0 + data.draw(st.integers(0, 10**12)))
    store = MemoryStore(clock_us=clock)
    for _ in range(limit.burst):
        assert decide(store, [b], 1).allowed
    assert not decide(store, [b], 1).allowed
    empty_at = clock.now
    k = data.draw(st.integers(1, limit.burst))
    # read-only views first (a peek does not change state, so time may go back for it)
    assert snapshot(store, clock, [b], empty_at + k * b.em - 1)[0][0] == k - 1
    assert snapshot(store, clock, [b], empty_at + k * b.em)[0][0] == k
    clock.now = empty_at + k * b.em - 1
    assert not decide(store, [b], k).allowed  # one microsecond short
    clock.now = empty_at + k * b.em
    assert decide(store, [b], k).allowed
    assert not decide(store, [b], 1).allowed  # and not one token more


# (d) cost ---------------------------------------------------------------------------------------
@SETTINGS
@given(data=st.data(), limit=limits(max_burst=30))
def test_cost_takes_cost_tokens_and_a_refused_cost_takes_nothing(
        data: st.DataObject, limit: Limit) -> None:
    b = Bucket("k", limit)
    clock = FakeClock()
    store = MemoryStore(clock_us=clock)
    for gap, cost in data.draw(schedules(b.em, b.cap, max_cost=limit.burst, max_size=20)):
        clock.now += gap
        decide(store, [b], cost)
    clock.now += data.draw(st.integers(0, b.cap))
    (before,) = snapshot(store, clock, [b])
    remaining = before[0]
    cost = data.draw(st.integers(1, limit.burst + 2))
    r = decide(store, [b], cost)
    assert r.allowed == (cost <= remaining)
    (after,) = snapshot(store, clock, [b])
    if r.allowed:
        assert r.remaining == (remaining - cost,)
        assert after[0] == remaining - cost
        assert after[2] == before[2] + cost * b.em  # full_us grows by exactly cost * em
    else:
        assert after == before  # refused: nothing taken
        assert r.remaining == (remaining,)


# (e) all-or-nothing ---------------------------------------------------------------------------
@SETTINGS
@given(data=st.data(), la=limits(), lb=limits())
def test_two_buckets_all_or_nothing(data: st.DataObject, la: Limit, lb: Limit) -> None:
    a, b = Bucket("tier", la), Bucket("rule", lb)
    clock = FakeClock()
    store = MemoryStore(clock_us=clock)
    em = min(a.em, b.em)
    cap = max(a.cap, b.cap)
    max_cost = max(la.burst, lb.burst)
    history = data.draw(st.lists(
        st.tuples(st.integers(0, cap + em), st.integers(1, max_cost),
                  st.sampled_from(["both", "tier", "rule"])), max_size=40))
    for gap, cost, which in history:
        clock.now += gap
        buckets = {"both": [a, b], "tier": [a], "rule": [b]}[which]
        before = snapshot(store, clock, [a, b])
        r = decide(store, buckets, cost)
        after = snapshot(store, clock, [a, b])
        fits = all(before[i][0] >= cost for i, x in enumerate([a, b]) if x in buckets)
        assert r.allowed == fits
        if not r.allowed:
            assert after == before, "a refused request must change no bucket"
        else:
            for i, x in enumerate([a, b]):
                expect = before[i][0] - cost if x in buckets else before[i][0]
                assert after[i][0] == expect


# (f) reply fields ------------------------------------------------------------------------------
@SETTINGS
@given(data=st.data(), ls=st.lists(limits(), min_size=1, max_size=3))
def test_reply_fields_are_consistent(data: st.DataObject, ls: list[Limit]) -> None:
    buckets = [Bucket(f"k{i}", lim) for i, lim in enumerate(ls)]
    clock = FakeClock()
    store = MemoryStore(clock_us=clock)
    em = min(x.em for x in buckets)
    cap = max(x.cap for x in buckets)
    min_burst = min(lim.burst for lim in ls)
    for gap, cost in data.draw(schedules(em, cap, max_cost=min_burst, max_size=30)):
        clock.now += gap
        decide(store, buckets, cost)
    clock.now += data.draw(st.one_of(st.just(0), st.integers(0, cap)))
    now = clock.now

    # Each bucket's fields on their own.
    views = snapshot(store, clock, buckets)
    for x, (remaining, next_us, full_us) in zip(buckets, views, strict=True):
        assert 0 <= remaining <= x.limit.burst
        assert 0 <= full_us <= x.cap
        assert 0 <= next_us <= x.em
        assert (remaining == x.limit.burst) == (full_us == 0) == (next_us == 0)
        if full_us:
            # next_token_us: exactly when one more whole token is there
            assert snapshot(store, clock, [x], now + next_us - 1)[0][0] == remaining
            assert snapshot(store, clock, [x], now + next_us)[0][0] == remaining + 1
            # full_us: exactly when the bucket is full again
            assert snapshot(store, clock, [x], now + full_us - 1)[0][0] == x.limit.burst - 1
            assert snapshot(store, clock, [x], now + full_us)[0] == (x.limit.burst, 0, 0)

    # retry_us: exactly the wait after which the same request passes.
    cost = data.draw(st.integers(1, min_burst))
    r = decide(store, buckets, cost)
    fits = all(v[0] >= cost for v in views)
    assert r.allowed == fits
    assert r.remaining == tuple(v[0] - cost if fits else v[0] for v in views)
    if r.allowed:
        assert r.retry_us == 0
        assert [v[0] for v in snapshot(store, clock, buckets)] == list(r.remaining)
        assert r.full_us == tuple(v[2] + cost * x.em for v, x in zip(views, buckets, strict=True))
    else:
        assert r.retry_us > 0
        assert r.next_us == tuple(v[1] for v in views)
        assert r.full_us == tuple(v[2] for v in views)
        clock.now = now + r.retry_us - 1
        assert not decide(store, buckets, cost).allowed, "retry_us - 1 must not be enough"
        clock.now = now + r.retry_us
        assert decide(store, buckets, cost).allowed, "retry_us must be enough"


# An independent model -------------------------------------------------------------------------
@SETTINGS
@given(data=st.data(), ls=st.lists(limits(), min_size=1, max_size=3))
def test_matches_a_classic_token_bucket_model(data: st.DataObject, ls: list[Limit]) -> None:
    """GCRA equals a textbook token bucket that counts credit in microseconds (burst * em at
    most, +1 per elapsed microsecond, a token costs em), reply fields included."""
    buckets = [Bucket(f"k{i}", lim) for i, lim in enumerate(ls)]
    clock = FakeClock()
    store = MemoryStore(clock_us=clock)
    credit = [x.cap for x in buckets]
    em = min(x.em for x in buckets)
    cap = max(x.cap for x in buckets)
    calls = data.draw(st.lists(
        st.tuples(st.integers(0, cap + em), st.integers(0, max(lim.burst for lim in ls) + 1),
                  st.sets(st.integers(0, len(buckets) - 1), min_size=1)), max_size=50))
    for gap, cost, chosen in calls:
        clock.now += gap
        idx = sorted(chosen)
        credit = [min(x.cap, c + gap) for x, c in zip(buckets, credit, strict=True)]
        need = [cost * buckets[i].em for i in idx]
        ok = all(credit[i] >= n for i, n in zip(idx, need, strict=True))
        r = decide(store, [buckets[i] for i in idx], cost)
        assert r.allowed == ok
        assert r.retry_us == (0 if ok else max(n - credit[i] for i, n in zip(idx, need, strict=True)))
        if ok:
            for i, n in zip(idx, need, strict=True):
                credit[i] -= n
        for j, i in enumerate(idx):
            x, c = buckets[i], credit[i]
            assert r.remaining[j] == c // x.em
            assert r.full_us[j] == x.cap - c
            assert r.next_us[j] == (0 if c == x.cap else x.em - c % x.em)


# Bounded memory ------------------------------------------------------------------------------
@SETTINGS
@given(data=st.data(), limit=limits(max_burst=5))
def test_sweeping_never_changes_a_decision(data: st.DataObject, limit: Limit) -> None:
    """Dropping buckets whose TAT has passed (they are full) is invisible to clients."""
    keys = [Bucket(f"k{i}", limit) for i in range(4)]
    clock = FakeClock()
    swept = MemoryStore(clock_us=clock)
    swept._sweep_every = 1  # sweep after every write
    kept = MemoryStore(clock_us=clock)
    kept._sweep_every = 10**9  # never sweep
    calls = data.draw(st.lists(st.tuples(st.integers(0, limit.capacity_us + limit.emission_us),
                                         st.integers(0, limit.burst), st.sampled_from(keys)),
                               max_size=60))
    for gap, cost, b in calls:
        clock.now += gap
        assert decide(swept, [b], cost) == decide(kept, [b], cost)
        assert len(swept) <= len(kept)
    clock.now += limit.capacity_us
    assert decide(swept, [keys[0]], 1).allowed
    assert len(swept) == 1  # everything else was full again, hence dropped


def test_idle_buckets_are_swept_incrementally() -> None:
    clock = FakeClock()
    store = MemoryStore(clock_us=clock)
    lim = Limit(requests=1, period_us=1000, burst=1)
    for i in range(1024):
        decide(store, [Bucket(f"a{i}", lim)], 1)
    assert len(store) == 1024
    clock.now += lim.capacity_us  # all of them are full again
    for i in range(1024):
        decide(store, [Bucket(f"b{i}", lim)], 1)
    assert len(store) <= 1024  # the a* buckets went in the sweep at the 2048th write


def test_the_cap_drops_the_least_recently_written_bucket() -> None:
    clock = FakeClock()
    store = MemoryStore(clock_us=clock, max_buckets=5)
    lim = Limit(requests=1, period_us=3600 * 10**6, burst=3)
    bs = [Bucket(f"k{i}", lim) for i in range(12)]
    for b in bs[:10]:
        assert decide(store, [b], 1).allowed
        assert len(store) <= 5
    assert len(store) == 5
    # k5..k9 are kept (2 tokens left), k0..k4 were dropped (a full bucket again).
    assert [peek(store, [b]).remaining[0] for b in bs[:10]] == [3] * 5 + [2] * 5
    assert decide(store, [bs[5]], 1).allowed  # k5 written again: now the most recent
    assert decide(store, [bs[10]], 1).allowed  # a new bucket: k6 goes, not k5
    assert [peek(store, [b]).remaining[0] for b in bs[5:11]] == [1, 3, 2, 2, 2, 2]
    assert not decide(store, [bs[11]], 4).allowed  # refused: nothing written, nothing dropped
    assert len(store) == 5 and peek(store, [bs[7]]).remaining == (2,)
