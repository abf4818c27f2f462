"""Sluice's image as `make image` writes it (hack/image/build.sh, the Dockerfile on Python bases
made from Debian's packages), checked without a node: the OCI archive unpacked, its config read,
its commands run in the root filesystem as the image's user (unshare + chroot).

What a cluster relies on: containerd files it under the name the chart and the injector use;
the user is a number and not root (runAsNonRoot can only check a number); the entrypoint is
`sluice` and every command the chart runs (operator, sidecar, analytics) starts; the packages
are the versions CI tested; nothing in it can build or install code (no compiler, no pip); the
code is not writable by the user that runs it."""

from __future__ import annotations

import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.oci_image import (
    SLUICE_ARCHIVE,
    Image,
    build_images,
    images_dir,
    run_in_rootfs,
    unpack,
    user_ids,
)
from support.paths import ROOT

pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(1800)]

VERSION = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)  # type: ignore[union-attr]
BUILD_TOOLS = ("gcc", "cc", "c++", "g++", "clang", "cpp", "ld", "as", "make", "strip", "pip",
               "pip3", "apt-get", "dpkg-buildpackage")


@pytest.fixture(scope="module")
def sluice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Image, Path]]:
    build_images()
    rootfs = tmp_path_factory.mktemp("sluice-rootfs")
    yield unpack(images_dir() / SLUICE_ARCHIVE, rootfs), rootfs


def site_packages(rootfs: Path) -> Path:
    (path,) = (rootfs / "opt/sluice/lib").glob("python3*/site-packages")
    return path


def test_containerd_files_it_under_the_name_pods_use(sluice: tuple[Image, Path]) -> None:
    image, _ = sluice
    # a Pod's `image: sluice:<version>` (the chart's and the injector's default) normalises to this
    assert image.name == f"docker.io/library/sluice:{VERSION}"
    assert image.ref_name == VERSION


def test_runs_as_a_numeric_non_root_user_with_sluice_as_entrypoint(sluice: tuple[Image, Path]) -> None:
    image, rootfs = sluice
    assert image.runtime["User"] == "65532:65532"
    assert user_ids(image) == (65532, 65532)
    assert image.runtime["Entrypoint"] == ["sluice"]
    assert image.runtime["Cmd"] == ["--help"]
    assert set(image.runtime["ExposedPorts"]) == {"8080/tcp", "9090/tcp"}
    passwd = (rootfs / "etc/passwd").read_text()
    assert "sluice:x:65532:65532:" in passwd


@pytest.mark.parametrize("command", [[], ["analytics"], ["sidecar"], ["operator"], ["keys"],
                                     ["analytics", "migrate"]])
def test_every_command_starts_in_the_image_as_its_user(sluice: tuple[Image, Path], command: list[str]) -> None:
    image, rootfs = sluice
    res = run_in_rootfs(rootfs, image, [*image.runtime["Entrypoint"], *command, "--help"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "usage: sluice" in res.stdout, res.stdout
    if not command:
        for name in ("sidecar", "operator", "analytics", "keys", "services"):
            assert name in res.stdout, (name, res.stdout)


def test_the_runtime_finds_its_tls_roots_and_native_modules(sluice: tuple[Image, Path]) -> None:
    # the operator and the collector talk TLS (the API server, rediss://, PostgreSQL): the
    # bundle must be where Debian's OpenSSL looks; the sidecar's speed rests on uvloop, hiredis,
    # httptools and re2 importing (compiled modules, stripped in the build)
    image, rootfs = sluice
    code = ("import ssl, uvloop, hiredis, httptools, re2, asyncpg, sqlalchemy, cryptography, yaml;"
            "ctx = ssl.create_default_context(); print(len(ctx.get_ca_certs()))")
    res = run_in_rootfs(rootfs, image, ["python3", "-c", code])
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout) > 50  # Debian's ca-certificates: ~140 roots; the host's extra CA not among them


def test_the_build_hosts_extra_roots_stay_out_of_the_image(sluice: tuple[Image, Path]) -> None:
    # the build mounts the host's CA store for pip (a TLS-inspecting proxy's CA may be in it);
    # the image must trust Debian's roots only, never a build machine's
    _, rootfs = sluice
    shipped = set()
    for crt in (rootfs / "usr/share/ca-certificates").rglob("*.crt"):
        shipped |= pem_blocks(crt.read_text())
    bundle = pem_blocks((rootfs / "etc/ssl/certs/ca-certificates.crt").read_text())
    assert bundle and bundle <= shipped, f"{len(bundle - shipped)} roots not from Debian's ca-certificates"


def pem_blocks(text: str) -> set[str]:
    return {"".join(block.split()) for block in re.findall(
        r"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", text, re.S)}


def test_installed_packages_are_the_tested_pins(sluice: tuple[Image, Path]) -> None:
    _, rootfs = sluice
    pins = {}
    for line in (ROOT / "hack/constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[normalise(name)] = version.strip()
    installed = {}
    for dist in site_packages(rootfs).glob("*.dist-info"):
        meta = (dist / "METADATA").read_text(errors="replace")
        name = re.search(r"^Name: (.+)$", meta, re.M).group(1)  # type: ignore[union-attr]
        installed[normalise(name)] = re.search(r"^Version: (.+)$", meta, re.M).group(1).strip()  # type: ignore[union-attr]
    assert installed.pop("sluice") == VERSION
    unpinned = {n: v for n, v in installed.items() if pins.get(n) != v}
    assert not unpinned, f"not the version CI tested (hack/constraints.txt): {unpinned}"
    # the collector's stack is in the one image
    assert {"sqlalchemy", "alembic", "aiosqlite", "asyncpg", "kopf", "aiohttp", "uvloop"} <= set(installed)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_nothing_in_it_builds_or_installs_code(sluice: tuple[Image, Path]) -> None:
    _, rootfs = sluice
    found = [f"{d}/{tool}" for d in ("usr/bin", "usr/sbin", "usr/local/bin", "opt/sluice/bin")
             for tool in BUILD_TOOLS if (rootfs / d / tool).exists()]
    found += [str(p.relative_to(rootfs)) for p in (rootfs / "usr/bin").glob("*gcc*")]
    found += [str(p.relative_to(rootfs)) for p in (rootfs / "usr/include").glob("**/Python.h")]
    found += [str(p.relative_to(rootfs)) for name in ("pip", "setuptools", "wheel")
              for p in site_packages(rootfs).glob(name)]
    found += [str(p.relative_to(rootfs)) for p in (rootfs / "usr/lib/python3/dist-packages").glob("pip")]
    assert not found, f"build tools in the final image: {found}"


def test_its_user_cannot_change_the_code(sluice: tuple[Image, Path]) -> None:
    _, rootfs = sluice
    writable = []
    for path in [rootfs / "opt/sluice", *(rootfs / "opt/sluice").rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        if st.st_uid == 65532 or st.st_mode & stat.S_IWOTH:
            writable.append(str(path.relative_to(rootfs)))
    assert not writable, writable[:20]


def test_imports_read_the_bytecode_compiled_in_the_build(sluice: tuple[Image, Path]) -> None:
    # the user cannot write __pycache__: without compiled bytecode every start compiles every
    # module again (the kubernetes client alone is ~700 modules)
    _, rootfs = sluice
    packages = site_packages(rootfs)
    missing = [str(py.relative_to(packages)) for pkg in ("sluice_core", "sluice_sidecar", "kubernetes/client/models")
               for py in (packages / pkg).glob("*.py")
               if not list((py.parent / "__pycache__").glob(py.stem + ".cpython-*.pyc"))]
    assert not missing, missing[:20]
