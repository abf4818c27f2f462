"""Rule paths: regexes run in linear time (RE2), and variant spellings of a path can neither
dodge a limiting rule nor reach a limited route through a skip rule (sluice_core.paths)."""

from __future__ import annotations

import asyncio
import contextlib
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sluice_core import paths
from sluice_core.errors import PolicyErrors
from sluice_core.model import CompiledPolicy
from sluice_core.parse import parse_policy
from sluice_core.paths import MAX_REGEX_RULES
from support.processes import SidecarProcess, UpstreamProcess, http_get
from support.sidecar_harness import RunningSidecar, Upstream, policy_doc, raw_request, start_sidecar

# Backtracks exponentially in Python's re: 6.4 s for a 31-character path, and about twice as
# long for every character more.
CATASTROPHIC = "/v1/([a-z0-9-]+/?)*export"
ADVERSARIAL = "/v1/" + "a" * 60 + "!"

RULES: list[dict[str, Any]] = [
    {"name": "health", "match": {"path": {"exact": "/healthz"}}, "skip": True},
    {"name": "public", "match": {"path": {"prefix": "/public/"}}, "skip": True},
    {"name": "login", "match": {"path": {"exact": "/api/login"}}, "limit": {"requests": 1, "period": "1m"}},
    {"name": "admin", "match": {"path": {"prefix": "/admin/"}}, "cost": 2},
    {"name": "export", "match": {"path": {"regex": CATASTROPHIC}}, "cost": 3},
]


def policy(rules: list[dict[str, Any]] = RULES, burst: int = 10) -> dict[str, Any]:
    return policy_doc(tiers=[{"name": "free", "requests": burst, "period": "1m"}], rules=rules)


def rule_of(p: CompiledPolicy, path: str, method: str = "GET") -> str | None:
    r = p.match_rule(method, path)
    return r.name if r is not None else None


# Regexes ---------------------------------------------------------------------------------------
@pytest.mark.timeout(20)  # the backstop: Python's re would take hours on this path
def test_catastrophic_regex_is_accepted_and_matches_in_linear_time() -> None:
    p = parse_policy(policy())
    assert rule_of(p, ADVERSARIAL) is None
    assert rule_of(p, "/v1/" + "a-b/" * 2000 + "x!") is None
    assert rule_of(p, "/v1/a/b-c/export") == "export"


@pytest.mark.parametrize("regex,why", [
    (r"/(\w+)/\1", "invalid escape sequence: \\1"),
    ("/(?=admin)a.*", "invalid perl operator: (?="),
    ("/(?<!x)y", "invalid perl operator: (?<!"),
    ("/a++", "bad repetition operator: ++"),
])
def test_regex_re2_cannot_run_is_refused_with_the_field_and_the_reason(regex: str, why: str) -> None:
    doc = policy([{"name": "r", "match": {"path": {"regex": regex}}, "cost": 1}])
    with pytest.raises(PolicyErrors) as info:
        parse_policy(doc)
    [err] = info.value.errors
    assert err.path == "spec.rules[0].match.path.regex"
    assert err.reason.startswith("is not a valid regular expression for RE2"), err.reason
    assert err.reason.endswith(why), err.reason


def test_regex_whose_program_is_too_large_is_refused() -> None:
    """Each rule regex gets a bounded memory budget (sluice_core.paths.MAX_REGEX_MEMORY)."""
    doc = policy([{"name": "r", "match": {"path": {"regex": r"/(\pL{100}){10}"}}, "cost": 1}])
    with pytest.raises(PolicyErrors) as info:
        parse_policy(doc)
    [err] = info.value.errors
    assert err.path == "spec.rules[0].match.path.regex"
    assert err.reason.endswith("pattern too large - compile failed"), err.reason


def test_regex_rules_share_one_memory_budget_per_policy() -> None:
    """RE2's memory is bounded per policy, not per pattern: the regexes of a policy share
    POLICY_REGEX_MEMORY, so a pattern that fits alone is refused among many, and there are at
    most MAX_REGEX_RULES of them (each keeps 256 KiB)."""
    big = {"name": "big", "match": {"path": {"regex": r"/\pL{20}"}}, "cost": 1}  # needs 512 KiB
    assert rule_of(parse_policy(policy([big])), "/" + "é" * 20) == "big"
    small = [{"name": f"r{i}", "match": {"path": {"regex": f"/r{i}/[0-9]+"}}, "cost": 1}
             for i in range(MAX_REGEX_RULES - 1)]
    with pytest.raises(PolicyErrors) as info:
        parse_policy(policy([big, *small]))
    [err] = info.value.errors
    assert err.path == "spec.rules[0].match.path.regex"
    assert "(each of this policy's 32 regex rules may use 256 KiB)" in err.reason, err.reason
    assert rule_of(parse_policy(policy(small)), "/r7/12") == "r7"
    extra = {"name": "one-more", "match": {"path": {"regex": "/x"}}, "cost": 1}
    with pytest.raises(PolicyErrors) as info:
        parse_policy(policy([*small, extra, {**extra, "name": "two-more"}]))
    [err] = info.value.errors
    assert err.path == "spec.rules"
    assert err.reason.startswith(f"must have at most {MAX_REGEX_RULES} regex rules, got 33"), err.reason


def test_each_rule_regex_is_compiled_once(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[str] = []
    real = paths._compile

    def counting(pattern: str, **kw: Any) -> Any:
        compiled.append(pattern)
        return real(pattern, **kw)

    monkeypatch.setattr(paths, "_compile", counting)
    parse_policy(policy())
    assert compiled == [CATASTROPHIC]


@pytest.fixture
def processes(tmp_path: Path) -> Any:
    up = UpstreamProcess()
    started: list[SidecarProcess] = []

    def sidecar(doc: dict[str, Any]) -> SidecarProcess:
        f = tmp_path / "policy.yaml"
        f.write_text(yaml.safe_dump(doc))
        started.append(SidecarProcess(up.url, "--policy-file", str(f)))
        return started[-1]

    yield sidecar
    for s in started:
        s.close()
    up.close()


def test_sidecar_answers_an_adversarial_path_and_keeps_serving(processes: Any) -> None:
    """A real ``sluice sidecar`` process: the path that would backtrack for hours gets its answer
    (the regex did not match: the tier decides), and so does the next client."""
    sidecar = processes(policy())
    status, _ = http_get(sidecar.url + ADVERSARIAL, timeout=15)
    assert status == 200
    assert http_get(sidecar.url + "/v1/a/export", timeout=15)[0] == 200
    assert sidecar.metric("sluice_decisions_total", rule="export", decision="allowed") == 1
    assert sidecar.metric("sluice_decisions_total", rule="", decision="allowed") == 1


# Normalisation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", [
    "/api/login", "/api/login/", "/API/Login", "/api/login;jsessionid=1", "/api/%6Cogin",
    "/api/x/..;/login", "/api%2Flogin", "/api\\login", "//api/./login", "/api/%2e%2e/api/login",
])
def test_a_limiting_rule_matches_every_spelling(spelling: str) -> None:
    assert rule_of(parse_policy(policy()), spelling) == "login"


@pytest.mark.parametrize("spelling,rule", [
    ("/admin", "admin"), ("/admin/", "admin"), ("/ADMIN/users", "admin"), ("/admin;x/users", "admin"),
    ("/V1/A/EXPORT", "export"), ("/v1/a/export/", "export"), ("/v1/a/export;x", "export"),
])
def test_prefix_and_regex_limiting_rules_match_every_spelling(spelling: str, rule: str) -> None:
    assert rule_of(parse_policy(policy()), spelling) == rule


def test_an_anchored_regex_matches_with_and_without_the_trailing_slash() -> None:
    p = parse_policy(policy([
        {"name": "end", "match": {"path": {"regex": "^/items/[0-9]+$"}}, "cost": 1},
        {"name": "slash", "match": {"path": {"regex": "/dirs/[a-z]+/"}}, "cost": 1},
    ]))
    assert [rule_of(p, x) for x in ("/items/7", "/items/7/", "/Items/7;v=2")] == ["end"] * 3
    assert [rule_of(p, x) for x in ("/dirs/a", "/dirs/a/", "/DIRS/a//")] == ["slash"] * 3


def test_a_skip_rule_matches_only_the_plain_canonical_spelling() -> None:
    p = parse_policy(policy())
    assert rule_of(p, "/healthz") == "health"
    assert rule_of(p, "/public/app.js") == "public"
    for variant in ("/healthz/", "/HEALTHZ", "/healthz;x", "/%68ealthz", "//healthz", "/./healthz",
                    "/x/../healthz", "/healthz\\"):
        assert rule_of(p, variant) is None, variant


@pytest.mark.parametrize("escape", [
    "/public/..;/api/login", "/public/%2e%2e/api/login", "/public%2F..%2Fapi/login",
    "/public/..%2Fapi/login", "/public/..\\api/login", "/public/x/..;/..;/api/login",
])
def test_a_skip_rule_cannot_be_used_to_reach_a_limited_route(escape: str) -> None:
    """Servlet containers read ``..;`` as ``..``, some upstreams decode ``%2F`` or read ``\\``
    as ``/``: each of these reaches /api/login there, so it must be charged as /api/login."""
    assert rule_of(parse_policy(policy()), escape) == "login"


@pytest.mark.parametrize("kind,text,spellings", [
    ("exact", "/files/%7Euser", ["/files/%7Euser", "/files/~user", "/FILES/%7eUSER/"]),
    ("prefix", "/api//v2/", ["/api//v2/x", "/api/v2/x", "/api/v2"]),
    ("prefix", "/x;v=1", ["/x;v=1/y", "/x/y", "/x;v=2"]),
    ("prefix", "/docs/./internal", ["/docs/./internal/a", "/docs/internal/a", "/docs//internal"]),
    ("exact", "/a\\b/../c", ["/a\\b/../c", "/a/c", "/a/b/../c"]),
])
def test_a_limiting_rule_text_is_read_like_a_request_target(kind: str, text: str,
                                                            spellings: list[str]) -> None:
    """The rule's text goes through the same normalisation as the request: a request spelled
    like the rule, or any other spelling of the same path, matches it."""
    p = parse_policy(policy([{"name": "r", "match": {"path": {kind: text}}, "cost": 1}]))
    for spelling in spellings:
        assert rule_of(p, spelling) == "r", spelling


def test_a_limiting_prefix_keeps_its_trailing_slash() -> None:
    p = parse_policy(policy([{"name": "r", "match": {"path": {"prefix": "/api%2Fv2/"}}, "cost": 1}]))
    assert [rule_of(p, x) for x in ("/api/v2", "/api/v2/x", "/api/v2x")] == ["r", "r", None]


@pytest.mark.parametrize("kind,text,instead", [
    ("exact", "/health%7Az", None), ("exact", "//healthz", "/healthz"),
    ("exact", "/./healthz", "/healthz"), ("exact", "/healthz;v=1", "/healthz"),
    ("prefix", "/static\\img/", "/static/img/"), ("prefix", "/a/../public/", "/public/"),
    ("prefix", "/public//", "/public/"),
])
def test_a_skip_rule_text_that_could_never_match_is_refused(kind: str, text: str,
                                                             instead: str | None) -> None:
    """A skip rule matches only a path sent in plain canonical form (compared exactly), so any
    other text is a rule that silently never applies."""
    doc = policy([{"name": "s", "match": {"path": {kind: text}}, "skip": True}])
    with pytest.raises(PolicyErrors) as info:
        parse_policy(doc)
    [err] = info.value.errors
    assert err.path == f"spec.rules[0].match.path.{kind}"
    assert err.reason.startswith(f"{text!r} can never match: a skip rule matches only"), err.reason
    assert err.reason.endswith(f"; write {instead!r}" if instead else ")"), err.reason


def test_a_skip_prefix_may_end_in_a_partial_dot_segment() -> None:
    p = parse_policy(policy([{"name": "s", "match": {"path": {"prefix": "/docs/."}}, "skip": True}]))
    assert rule_of(p, "/docs/.well-known/x") == "s"


def test_matching_a_cached_path_allocates_nothing() -> None:
    """The forms a rule compares (slashed, UTF-8) are built once per distinct path, not once per
    rule and request: matching a long path again allocates no copy of it."""
    p = parse_policy(policy([
        {"name": "pre", "match": {"path": {"prefix": "/zzz/"}}, "cost": 1},
        {"name": "re", "match": {"path": {"regex": "/zzz/[0-9]+"}}, "cost": 1},
    ]))
    path = "/" + "a" * 50_000
    assert rule_of(p, path) is None  # builds and caches its forms
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(10):
            p.match_rule("GET", path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - before < 10_000, peak - before


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[tuple[RunningSidecar, Upstream]]:
    up = await Upstream().start()
    sc = await start_sidecar(tmp_path, policy(burst=3), upstream=up)
    yield sc, up
    await sc.stop()
    await up.close()


async def get(sc: RunningSidecar, path: str) -> tuple[int, str | None]:
    r = await raw_request(sc.data_port, f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    assert r is not None
    return r.status, (r.json().get("rule") if r.status == 429 else None)


@pytest.mark.parametrize("spelling", ["/api/login/", "/API/Login", "/api/login;a=1", "/public/..;/api/login"])
async def test_sidecar_charges_a_variant_spelling_to_the_rule(
        spelling: str, sidecar: tuple[RunningSidecar, Upstream]) -> None:
    sc, up = sidecar
    assert (await get(sc, spelling))[0] == 200
    assert await get(sc, "/api/login") == (429, "login")  # the variant took the rule's one token
    assert await get(sc, spelling) == (429, "login")
    assert [s.raw_path for s in up.seen] == [spelling]  # forwarded exactly as spelled


async def test_sidecar_skips_the_canonical_path_and_limits_its_variants(
        sidecar: tuple[RunningSidecar, Upstream]) -> None:
    sc, _ = sidecar
    for _ in range(5):
        assert (await get(sc, "/healthz"))[0] == 200
    # Variants are not skipped: they take from the tier (burst 3) like any other path.
    variants = ("//healthz", "/x/../healthz", "/healthz;x", "/HEALTHZ")
    assert [(await get(sc, v))[0] for v in variants] == [200, 200, 200, 429]
    assert (await get(sc, "/healthz"))[0] == 200


async def test_sidecar_refuses_a_fragment_instead_of_deciding_without_it(
        sidecar: tuple[RunningSidecar, Upstream]) -> None:
    """``/healthz#/../api/login`` would be decided as /healthz (skipped) but forwarded whole, to
    an upstream that may read it as /api/login: a fragment is not origin-form, it is refused
    (400, connection closed) and nothing reaches the upstream or takes a token."""
    sc, up = sidecar
    for target in ("/healthz#/../api/login", "/healthz#", "/api/login?x=1#y"):
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.data_port)
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 400 "), (target, head)
            await asyncio.wait_for(reader.read(), 10)  # returns at EOF: the sidecar closed it
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()
    assert up.seen == []
    assert (await get(sc, "/api/login"))[0] == 200  # the rule's one token was still there
