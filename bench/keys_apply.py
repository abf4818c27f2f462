"""`make bench`, keys part: ``sluice apply --api-keys-file`` of 10k / 100k / 1M keys, written into
docs/benchmarks.md between the keys-apply markers.

For each size, on a fresh local redis-server: the apply's wall time and peak RSS (the process's
own, wait4, through a small launcher), a re-apply of the file less its first key plus a new one
(what an edit costs), the config document's size in Redis, and Redis memory per key (grants and
index: ``used_memory`` before and after, once lazy frees are done; the index alone: ``MEMORY
USAGE``). The baseline
is the previous release's ``sluice apply``, which embeds every key digest in the config document
(the commit before the grants, run from a ``git archive`` copy), on the same file and Redis.
It holds the whole file and the whole document in memory: 1M keys is not run there (it took
~10 s and ~200 MB per 100k keys, linear).

Keys files: one entry per line, 1 in 10 with its own limit, plaintext keys (hashed on reading);
no ``id`` or ``expiresAt``, which the baseline does not read.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.keys_files import POLICY, Measured, run_measured, write_keys_file  # noqa: E402
from support.polling import poll  # noqa: E402
from support.redis_servers import RedisServer  # noqa: E402

from bench.report import scaled_args, write_block  # noqa: E402

BEGIN, END = "<!-- bench-keys-apply:begin -->", "<!-- bench-keys-apply:end -->"
BASELINE_COMMIT = "a046dce"  # the grants contract, before `sluice apply` wrote grants
SIZES = (10_000, 100_000, 1_000_000)
BASELINE_MAX = 100_000
NS = "bench"


@dataclass
class Row:
    keys: int
    what: str
    apply: Measured
    reapply: Measured | None
    doc_bytes: int
    redis_bytes_per_key: float
    index_bytes_per_key: float | None


def apply_cmd(src: Path, policy: Path, url: str, keys: Path) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(src / p) for p in ("core", "sidecar", "operator"))}
    return [sys.executable, "-m", "sluice_core.cli", "apply", "-f", str(policy), "--redis", url,
            "--api-keys-file", str(keys)], env


def used_memory(server: RedisServer) -> int:
    c = server.client()
    poll(lambda: int(c.info("memory")["lazyfree_pending_objects"]) == 0, "lazy frees", 60, interval=0.05)
    return int(c.info("memory")["used_memory"])


def measure(src: Path, label: str, n: int, files: tuple[Path, Path], policy: Path, *, new: bool) -> Row:
    with RedisServer() as server:
        base = used_memory(server)
        cmd, env = apply_cmd(src, policy, server.url, files[0])
        first = run_measured(cmd, timeout=900, env=env)
        if first.returncode != 0:
            raise RuntimeError(f"{label} apply of {n} keys failed: {first.stderr[-2000:]}")
        c = server.client()
        doc_bytes = int(c.hstrlen(f"sluice:cfg:{{{NS}}}", "doc"))
        grown = used_memory(server) - base
        index_bytes = None
        if new:
            from sluice_core import keyschema
            index = keyschema.grant_index_key(keyschema.policy_id(f"{NS}/api"))
            index_bytes = int(c.memory_usage(index, samples=0) or 0) / n
        cmd, env = apply_cmd(src, policy, server.url, files[1])
        again = run_measured(cmd, timeout=900, env=env)
        if again.returncode != 0:
            raise RuntimeError(f"{label} re-apply of {n} keys failed: {again.stderr[-2000:]}")
    return Row(n, label, first, again, doc_bytes, grown / n, index_bytes)


def table(rows: list[Row]) -> list[str]:
    out = ["| keys | `sluice apply` | time | peak RSS | re-apply (1 key revoked, 1 added) | config document "
           "| Redis per key (grant + index) | of which index |",
           "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        reapply = f"{r.reapply.seconds:.1f} s" if r.reapply else "–"
        index = f"{r.index_bytes_per_key:.0f} B" if r.index_bytes_per_key is not None else "–"
        out.append(f"| {r.keys:,} | {r.what} | {r.apply.seconds:.1f} s | {r.apply.peak_rss_kb / 1024:.0f} MB "
                   f"| {reapply} | {_size(r.doc_bytes)} | {r.redis_bytes_per_key:.0f} B | {index} |")
    return out


def ratios(rows: list[Row]) -> list[str]:
    out = []
    for new in rows_new(rows):
        n = new.keys
        old = next((r for r in rows if r.keys == n and r.index_bytes_per_key is None), None)
        if old is not None:
            out.append(f"- {n:,} keys: time {new.apply.seconds / old.apply.seconds:.2f}× the embedded "
                       f"document's, peak RSS {new.apply.peak_rss_kb / old.apply.peak_rss_kb:.2f}×, config "
                       f"document {old.doc_bytes / new.doc_bytes:,.0f}× smaller.")
    first, last = rows_new(rows)[0], rows_new(rows)[-1]
    out.append(f"- Peak RSS from {first.keys:,} to {last.keys:,} keys: {first.apply.peak_rss_kb / 1024:.0f} → "
               f"{last.apply.peak_rss_kb / 1024:.0f} MB (bounded: batches of 1,000, one entry parsed at a time).")
    return out


def rows_new(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.index_bytes_per_key is not None]


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def baseline_copy(tmp: Path) -> Path:
    dest = tmp / "baseline"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE_COMMIT], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def main() -> int:
    args = scaled_args(__doc__, ROOT / "docs" / "benchmarks.md", "the key counts", 1000)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="sluice-bench-keys-") as d:
        tmp = Path(d)
        old_src = baseline_copy(tmp)
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY.format(name="api", namespace=NS))
        for size in SIZES:
            n = max(size // args.scale, 10)
            files = (write_keys_file(tmp / f"keys-{n}.yaml", "bench", range(n), fields=False),
                     write_keys_file(tmp / f"keys-{n}-b.yaml", "bench", range(1, n + 1), fields=False))
            if size <= BASELINE_MAX:
                rows.append(measure(old_src, "embedded document (before)", n, files, policy, new=False))
            rows.append(measure(ROOT, "grants (now)", n, files, policy, new=True))
            print(table(rows)[-1], flush=True)
            for f in files:
                f.unlink()
    lines = [BEGIN, "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC on {os.cpu_count()} cores, "
             f"Python {platform.python_version()}, redis-server on loopback, a fresh one per row; "
             f"{time.monotonic() - started:.0f} s in all, load average {load_before:.1f} before and "
             f"{os.getloadavg()[0]:.1f} after (times are only as steady as the machine is quiet; RSS and "
             "bytes do not depend on it). Command: `make bench` (`python -m bench.keys_apply`). "
             f"Before: `sluice apply` of commit {BASELINE_COMMIT} (keys embedded in the config document; "
             "not run at 1M keys). Re-apply: the same file less its first key plus a new one.", "",
             *table(rows), "", *ratios(rows), "", END]
    block = "\n".join(lines)
    print(block)
    write_block(Path(args.out), BEGIN, END, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
