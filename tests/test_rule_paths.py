"""Rule paths: regexes run in linear time (RE2), and variant spellings of a path can neither
dodge a limiting rule nor reach a limited route through a skip rule (sluice_core.paths)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sluice_core.errors import PolicyErrors
from sluice_core.model import CompiledPolicy
from sluice_core.parse import parse_policy
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
