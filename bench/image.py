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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.oci_image import (  # noqa: E402
    REDIS_ARCHIVE,
    SLUICE_ARCHIVE,
    Image,
    build_images,
    images_dir,
    read_image,
    rootfs_command,
    unpack,
    user_ids,
)
from support.redis_servers import pick_port  # noqa: E402
from support.sidecar_harness import policy_doc, write_file  # noqa: E402

from bench.report import write_block  # noqa: E402

BEGIN, END = "<!-- bench-image:begin -->", "<!-- bench-image:end -->"
MB = 1_000_000
VENV_SLUICE = Path(sys.executable).parent / "sluice"  # the virtualenv running the benchmark


def tree_bytes(path: Path) -> int:
    """File sizes under ``path`` (symlinks and hard links counted once, as a layer stores them)."""
    seen: set[int] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def size_rows(rootfs: Path, image: Image, archive: Path) -> list[tuple[str, float]]:
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
        top = sorted(((tree_bytes(p), p.name) for p in site.iterdir() if p.is_dir()
                      and not p.name.endswith((".dist-info", "__pycache__"))), reverse=True)[:8]
        rows += [(f"    {name}", size / MB) for size, name in top]
    return rows


def time_to_ready(argv: list[str], env: dict[str, str], admin_port: int, timeout: float = 30.0) -> float:
    """Seconds from exec to the first 200 from /readyz; the process is stopped after."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the sidecar exited ({proc.returncode}): {proc.stderr.read()[-2000:]!r}")  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as res:
                    if res.status == 200:
                        return time.perf_counter() - start
            except OSError:
                pass
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"the sidecar was not ready within {timeout:.0f}s")
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def sidecar_args(policy: Path, admin_port: int) -> list[str]:
    return ["sidecar", "--policy-file", str(policy), "--upstream", f"http://127.0.0.1:{pick_port()}",
            "--listen", f"127.0.0.1:{pick_port()}", "--admin-listen", f"127.0.0.1:{admin_port}"]


def startup_times(runs: int, make: Callable[[int], tuple[list[str], dict[str, str]]]) -> list[float]:
    times = []
    for _ in range(runs):
        port = pick_port()
        argv, env = make(port)
        times.append(time_to_ready(argv, env, port))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--runs", type=int, default=7, help="start-ups of each kind (median reported)")
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
        write_file(rootfs / "tmp" / "policy.yaml", policy_doc())
        os.chmod(rootfs / "tmp" / "policy.yaml", 0o644)
        uid, gid = user_ids(image)

        def in_image(port: int) -> tuple[list[str], dict[str, str]]:
            argv = [*image.runtime["Entrypoint"], *sidecar_args(Path("/tmp/policy.yaml"), port)]
            return rootfs_command(rootfs, argv, uid=uid, gid=gid), image.env

        def in_venv(port: int) -> tuple[list[str], dict[str, str]]:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
            return [str(VENV_SLUICE), *sidecar_args(rootfs / "tmp" / "policy.yaml", port)], env

        image_times = startup_times(args.runs, in_image)
        venv_times = startup_times(args.runs, in_venv)
    print_and_write(Path(args.out), read_image(archive), sizes, redis_sizes, image_times, venv_times)


def print_and_write(out: Path, image: Image, sizes: list[tuple[str, float]],
                    redis_sizes: list[tuple[str, float]], image_times: list[float],
                    venv_times: list[float]) -> None:
    med_image, med_venv = statistics.median(image_times), statistics.median(venv_times)
    lines = [BEGIN, "",
             f"`python -m bench.image` ({time.strftime('%Y-%m-%d')}, {image.name}, "
             f"{len(image.layers)} layers; 2 shared cores, other work running):", "",
             "| Sluice image | MB |", "| --- | ---: |"]
    lines += [f"| {name} | {size:.1f} |" for name, size in sizes]
    lines += ["", "| Redis image (sluice-redis) | MB |", "| --- | ---: |"]
    lines += [f"| {name} | {size:.1f} |" for name, size in redis_sizes[:2]]
    lines += ["", f"Sidecar start-up, exec to the first 200 on /readyz (one policy file, memory "
              f"store), median of {len(image_times)}:", "",
              "| where | median | min | max | ratio |", "| --- | ---: | ---: | ---: | ---: |",
              f"| development virtualenv (baseline) | {med_venv * 1000:.0f} ms | {min(venv_times) * 1000:.0f} ms "
              f"| {max(venv_times) * 1000:.0f} ms | 1.00 |",
              f"| the image's root filesystem (unshare + chroot, as 65532) | {med_image * 1000:.0f} ms "
              f"| {min(image_times) * 1000:.0f} ms | {max(image_times) * 1000:.0f} ms "
              f"| {med_image / med_venv:.2f} |", "", END]
    block = "\n".join(lines)
    print(block)
    write_block(out, BEGIN, END, block)


if __name__ == "__main__":
    main()
