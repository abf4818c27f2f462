"""`make bench`: the images `make image` writes (issue #12 §1): how big they are and what takes
the room, and how long the sidecar takes to start from the image's root filesystem.

Sizes: the OCI archive's compressed layers (what a node stores and a registry would send) and
the unpacked root filesystem (file sizes added up), split into the Debian base, Python's
standard library and /opt/sluice (the largest packages named). Start-up: `sluice sidecar` with
a one-policy file, from exec to its first 200 on /readyz, run in the unpacked image as its user
(unshare + chroot, the host's loopback), against the same command from the development
virtualenv in the same run (the baseline). Written into docs/benchmarks.md between the
bench-image markers.

Run alone: ``python -m bench.image [--runs 7] [--out docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.oci_image import (  # noqa: E402
    REDIS_ARCHIVE,
    SLUICE_ARCHIVE,
    Image,
    build_images,
    images_dir,
    kill_process_group,
    read_image,
    rootfs_command,
    start_process_group,
    tree_bytes,
    unpack,
    user_ids,
)
from support.redis_servers import pick_port  # noqa: E402
from support.sidecar_harness import policy_doc, write_file  # noqa: E402

from bench.report import write_block  # noqa: E402

BEGIN, END = "<!-- bench-image:begin -->", "<!-- bench-image:end -->"
MB = 1_000_000
VENV_SLUICE = Path(sys.executable).parent / "sluice"  # the virtualenv running the benchmark


def size_rows(rootfs: Path, image: Image, archive: Path,
              packages: list[str] | None = None) -> list[tuple[str, float]]:
    """The size table; the eight largest packages, or ``packages`` (another image's eight)."""
    rows = [("OCI archive (compressed layers)", sum(size for _, size in image.layers) / MB),
            ("root filesystem, unpacked", tree_bytes(rootfs) / MB)]
    sluice = rootfs / "opt" / "sluice"
    if sluice.is_dir():
        stdlib = next((rootfs / "usr" / "lib").glob("python3.*"))
        (site,) = (sluice / "lib").glob("python3*/site-packages")
        rows += [("  Debian base (libc, coreutils, OpenSSL, dpkg, ...)",
                  (tree_bytes(rootfs) - tree_bytes(sluice) - tree_bytes(stdlib)) / MB),
                 (f"  Python standard library ({stdlib.name})", tree_bytes(stdlib) / MB),
                 ("  /opt/sluice (Sluice and its pinned packages, with bytecode)", tree_bytes(sluice) / MB)]
        if packages is None:
            top = sorted(((tree_bytes(p), p.name) for p in site.iterdir() if p.is_dir()
                          and not p.name.endswith((".dist-info", "__pycache__"))), reverse=True)[:8]
        else:
            top = [(tree_bytes(site / name), name) for name in packages]
        rows += [(f"    {name}", size / MB) for size, name in top]
    return rows


@dataclass(frozen=True)
class Startup:
    wall: float  # seconds from exec to the first 200 on /readyz
    cpu: float  # CPU seconds (user + system) the process tree used until then


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its descendants so far (/proc; unshare's own is noise)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def time_to_ready(argv: list[str], env: dict[str, str], admin_port: int, timeout: float = 30.0) -> Startup:
    """From exec to the first 200 from /readyz; the process is stopped after."""
    start = time.perf_counter()
    proc = start_process_group(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the sidecar exited ({proc.returncode}): {proc.stderr.read()[-2000:]!r}")  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as res:
                    if res.status == 200:
                        return Startup(time.perf_counter() - start, tree_cpu_seconds(proc.pid))
            except OSError:
                pass
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"the sidecar was not ready within {timeout:.0f}s")
            time.sleep(0.005)
    finally:
        kill_process_group(proc)  # unshare alone would leave the sidecar in the image running


def sidecar_args(policy: Path, admin_port: int) -> list[str]:
    return ["sidecar", "--policy-file", str(policy), "--upstream", f"http://127.0.0.1:{pick_port()}",
            "--listen", f"127.0.0.1:{pick_port()}", "--admin-listen", f"127.0.0.1:{admin_port}"]


Launcher = Callable[[int], tuple[list[str], dict[str, str]]]


def startup_times(runs: int, kinds: dict[str, Launcher]) -> dict[str, list[Startup]]:
    """``runs`` start-ups of each kind, interleaved (one of each in turn), so a change in the
    machine's load falls on every kind alike."""
    times: dict[str, list[Startup]] = {label: [] for label in kinds}
    for _ in range(runs):
        for label, make in kinds.items():
            port = pick_port()
            argv, env = make(port)
            times[label].append(time_to_ready(argv, env, port))
    return times


def image_launcher(rootfs: Path, image: Image) -> Launcher:
    """The sidecar in an unpacked image as its user, with a one-policy file in its /tmp."""
    write_file(rootfs / "tmp" / "policy.yaml", policy_doc())
    os.chmod(rootfs / "tmp" / "policy.yaml", 0o644)
    uid, gid = user_ids(image)

    def launch(port: int) -> tuple[list[str], dict[str, str]]:
        argv = [*image.runtime["Entrypoint"], *sidecar_args(Path("/tmp/policy.yaml"), port)]
        return rootfs_command(rootfs, argv, uid=uid, gid=gid), image.env

    return launch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--runs", type=int, default=7, help="start-ups of each kind (median reported)")
    ap.add_argument("--compare", metavar="LABEL=ARCHIVE",
                    help="another build's sluice.oci.tar (e.g. before a change) measured in the same run")
    args = ap.parse_args()
    build_images()
    archive = images_dir() / SLUICE_ARCHIVE
    with tempfile.TemporaryDirectory(prefix="bench-image-") as tmp:
        rootfs = Path(tmp) / "sluice"
        image = unpack(archive, rootfs)
        sizes = size_rows(rootfs, image, archive)
        redis_root = Path(tmp) / "redis"
        redis = unpack(images_dir() / REDIS_ARCHIVE, redis_root)
        redis_sizes = size_rows(redis_root, redis, images_dir() / REDIS_ARCHIVE)
        policy = rootfs / "tmp" / "policy.yaml"

        def in_venv(port: int) -> tuple[list[str], dict[str, str]]:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
            return [str(VENV_SLUICE), *sidecar_args(policy, port)], env

        kinds = {"development virtualenv (baseline)": in_venv,
                 "the image's root filesystem (unshare + chroot, as 65532)": image_launcher(rootfs, image)}
        compared: tuple[str, list[tuple[str, float]]] | None = None
        if args.compare:
            label, _, other = args.compare.partition("=")
            other_root = Path(tmp) / "compared"
            other_image = unpack(Path(other), other_root)
            names = [name.strip() for name, _ in sizes if name.startswith("    ")]
            compared = (label, size_rows(other_root, other_image, Path(other), names))
            kinds[f"{label} (same way)"] = image_launcher(other_root, other_image)
        times = startup_times(args.runs, kinds)
    print_and_write(Path(args.out), read_image(archive), sizes, redis_sizes, times, compared)


def print_and_write(out: Path, image: Image, sizes: list[tuple[str, float]],
                    redis_sizes: list[tuple[str, float]], times: dict[str, list[Startup]],
                    compared: tuple[str, list[tuple[str, float]]] | None) -> None:
    lines = [BEGIN, "",
             f"`python -m bench.image` ({time.strftime('%Y-%m-%d')}, {image.name}, "
             f"{len(image.layers)} layers; 2 shared cores, other work running):", ""]
    if compared is None:
        lines += ["| Sluice image | MB |", "| --- | ---: |"]
        lines += [f"| {name} | {size:.1f} |" for name, size in sizes]
    else:
        other = dict(compared[1])
        lines += [f"| Sluice image | MB | {compared[0]}, MB | ratio |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {name} | {size:.1f} | " + (f"{other[name]:.1f} | {size / other[name]:.2f} |" if name in other
                                                 else "| |") for name, size in sizes]
    lines += ["", "| Redis image (sluice-redis) | MB |", "| --- | ---: |"]
    lines += [f"| {name} | {size:.1f} |" for name, size in redis_sizes[:2]]
    runs = len(next(iter(times.values())))
    baseline = next(iter(times.values()))
    base_wall = statistics.median(t.wall for t in baseline)
    base_cpu = statistics.median(t.cpu for t in baseline)
    lines += ["", f"Sidecar start-up, exec to the first 200 on /readyz (one policy file, memory "
              f"store), median of {runs}, the kinds interleaved; CPU: user + system of the process "
              f"tree until then:", "",
              "| where | wall median | min | max | ratio | CPU median | ratio |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, samples in times.items():
        wall = statistics.median(t.wall for t in samples)
        cpu = statistics.median(t.cpu for t in samples)
        lines.append(f"| {label} | {wall * 1000:.0f} ms | {min(t.wall for t in samples) * 1000:.0f} ms "
                     f"| {max(t.wall for t in samples) * 1000:.0f} ms | {wall / base_wall:.2f} "
                     f"| {cpu * 1000:.0f} ms | {cpu / base_cpu:.2f} |")
    lines += ["", END]
    block = "\n".join(lines)
    print(block)
    write_block(out, BEGIN, END, block)


if __name__ == "__main__":
    main()
