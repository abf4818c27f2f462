"""`make bench`, second part: every attack of ``tests/support/attacks.py`` against a real
sidecar process, longer than the tests run them, with what each cost; written into
docs/security.md between the attack markers.

The tests (``tests/sidecar/test_attacks.py``) assert what must hold; this prints how much it cost: the
sidecar's RSS and file descriptors before, at the peak and after, and the latency of a
well-behaved client (the bystander) while the attack ran.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.attacks import Report, run_scenario, scenarios  # noqa: E402

from bench.report import write_block  # noqa: E402

BEGIN, END = "<!-- attacks:begin -->", "<!-- attacks:end -->"


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def _outcome(report: Report) -> str:
    return ", ".join(f"{k} {v}" for k, v in report.outcome.items() if k != "sidecar_log_tail")


def table(reports: list[Report], seconds: float) -> str:
    rows = [
        BEGIN, "",
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, `python -m bench.attacks` (part of "
        f"`make bench`). Each attack runs for at most {seconds:.0f} s and ends early once the "
        "sidecar has closed every connection it opened. The sidecar runs with its defaults except "
        "2 s header, keep-alive and client timeouts (so that they act within the run) and, for the "
        "floods, the per-client connection cap lifted (every attacker is 127.0.0.1; the cap is "
        "tested on its own in tests/sidecar/test_connection_limits.py). RSS in MiB and file descriptors of "
        "the sidecar process: before / peak / after; the bystander (one keep-alive client from "
        "127.0.0.2 with its own key, one request every 20 ms) during the attack.", "",
        "| attack | what was sent | RSS MiB | fds | bystander 200s / failed | bystander p50 / p99 / max ms | what the attack got |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lat = sorted(r.bystander_latencies)
        worst = f"{1000 * lat[-1]:.1f}" if lat else "–"
        rows.append(
            f"| {r.name} | {r.attack} | {_mib(r.rss_before)} / {_mib(r.rss_peak)} / {_mib(r.rss_after)} "
            f"| {r.fds_before} / {r.fds_peak} / {r.fds_after} "
            f"| {r.bystander_ok} / {len(r.bystander_failed)} "
            f"| {r.bystander_p50_ms:.1f} / {r.latency_ms(0.99):.1f} / {worst} | {_outcome(r)} |")
    rows += ["", END]
    return "\n".join(rows)


async def run(seconds: float) -> list[Report]:
    reports = []
    for scenario in scenarios():
        print(f"==> attack: {scenario.name} ({seconds:.0f} s)", flush=True)
        reports.append(await run_scenario(scenario, seconds))
    return reports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "security.md")
    args = parser.parse_args()
    block = table(asyncio.run(run(args.seconds)), args.seconds)
    print(block)
    if BEGIN not in args.out.read_text():
        raise SystemExit(f"{args.out} has no {BEGIN} ... {END} markers")
    write_block(args.out, BEGIN, END, block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
