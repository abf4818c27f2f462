"""The images `make image` writes (hack/image/build.sh), read the way a container runtime would,
without one: an OCI archive's index, manifest and config, its layers applied in order to a
directory (whiteouts honoured), and a command run in that root filesystem as the image's user
(``unshare`` with new mount and PID namespaces, ``--root`` for the chroot; the host's network,
so a process in it reaches loopback servers of the test).

- :func:`build_images`: run hack/image/build.sh (a no-op when its stamps say nothing changed).
- :func:`read_image`: an archive's name, config and layer sizes.
- :func:`unpack`: the root filesystem, into a directory.
- :func:`rootfs_command`: the argv that runs a command in it as a user, with the image's env.
- :func:`tree_bytes`: how big an unpacked root filesystem (or a part of it) is.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.paths import ROOT

BUILD_SCRIPT = ROOT / "hack" / "image" / "build.sh"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def images_dir() -> Path:
    cache = os.environ.get("SLUICE_CACHE") or str(Path.home() / ".cache" / "sluice")
    return Path(cache) / "images"


SLUICE_ARCHIVE = "sluice.oci.tar"
REDIS_ARCHIVE = "sluice-redis.oci.tar"


def build_images(timeout: float = 1800) -> str:
    """``make image``'s script; returns its log. It needs root (mmdebstrap, buildah's chroot
    isolation): the caller fails with that message when it is missing rather than skipping."""
    if os.geteuid() != 0:
        raise AssertionError("the image tests need root: hack/image/build.sh (mmdebstrap, buildah "
                             "chroot isolation) and unshare --root to run commands in the rootfs")
    res = subprocess.run(["bash", str(BUILD_SCRIPT)], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise AssertionError(f"hack/image/build.sh failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return res.stderr


@dataclass(frozen=True)
class Image:
    """One image of an OCI archive: the name containerd files it under, its config, its layers."""

    name: str
    ref_name: str
    config: dict[str, Any]  # the OCI image config ("config": User, Entrypoint, Cmd, Env, ...)
    layers: list[tuple[str, int]]  # (media type, compressed size) in order

    @property
    def runtime(self) -> dict[str, Any]:
        return dict(self.config.get("config") or {})

    @property
    def workdir(self) -> str:
        return str(self.runtime.get("WorkingDir") or "/")

    @property
    def env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.runtime.get("Env") or [])


def _blob(tar: tarfile.TarFile, digest: str) -> bytes:
    member = tar.extractfile("blobs/" + digest.replace(":", "/"))
    assert member is not None, digest
    return member.read()


def read_image(archive: Path) -> Image:
    with tarfile.open(archive) as tar:
        index_file = tar.extractfile("index.json")
        assert index_file is not None
        index = json.loads(index_file.read())
        (desc,) = index["manifests"]
        manifest = json.loads(_blob(tar, desc["digest"]))
        config = json.loads(_blob(tar, manifest["config"]["digest"]))
    notes = desc.get("annotations") or {}
    return Image(name=notes.get("io.containerd.image.name", ""),
                 ref_name=notes.get("org.opencontainers.image.ref.name", ""), config=config,
                 layers=[(layer["mediaType"], layer["size"]) for layer in manifest["layers"]])


def _inside(root: Path, path: Path) -> bool:
    return os.path.realpath(path).startswith(str(root) + os.sep) or os.path.realpath(path) == str(root)


def _apply_layer(root: Path, layer: tarfile.TarFile) -> None:
    """One layer onto ``root``: whiteouts delete what lower layers put there; nothing is written
    through a symlink that leads out of ``root`` (a layer is data, not trusted paths)."""
    for member in layer:
        rel = Path(member.name.lstrip("./").lstrip("/"))
        if not rel.parts:
            continue
        parent = root / rel.parent
        if not _inside(root, parent):
            raise ValueError(f"layer entry {member.name!r} leads outside the root filesystem")
        if rel.name == OPAQUE:
            for child in parent.iterdir() if parent.is_dir() else []:
                _remove(child)
            continue
        if rel.name.startswith(WHITEOUT):
            _remove(parent / rel.name[len(WHITEOUT):])
            continue
        target = root / rel
        if (target.exists() or target.is_symlink()) and not (member.isdir() and target.is_dir()):
            _remove(target)
        if member.islnk():
            member = _relinked(member, root)
        layer.extract(member, root, set_attrs=True, numeric_owner=True)


def _relinked(member: tarfile.TarInfo, root: Path) -> tarfile.TarInfo:
    """A hard link's target is a path in the layer; tarfile resolves it against ``root``."""
    member.linkname = member.linkname.lstrip("./").lstrip("/")
    if not _inside(root, root / member.linkname):
        raise ValueError(f"hard link {member.name!r} -> {member.linkname!r} leads outside")
    return member


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def unpack(archive: Path, dest: Path) -> Image:
    """Apply the archive's layers in order to ``dest`` (made, must be empty); return the image."""
    image = read_image(archive)
    dest.mkdir(parents=True, exist_ok=True)
    dest.chmod(0o755)  # it is "/" for the image's user (a pytest tmp dir is 0700)
    root = dest.resolve()
    with tarfile.open(archive) as tar:
        index_file = tar.extractfile("index.json")
        assert index_file is not None
        (desc,) = json.loads(index_file.read())["manifests"]
        manifest = json.loads(_blob(tar, desc["digest"]))
        for layer in manifest["layers"]:
            stream = tar.extractfile("blobs/" + layer["digest"].replace(":", "/"))
            assert stream is not None
            if layer["mediaType"].endswith("+gzip"):
                stream = gzip.GzipFile(fileobj=stream)  # type: ignore[assignment]
            with tarfile.open(fileobj=stream, mode="r|") as layer_tar:
                _apply_layer(root, layer_tar)
    return image


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


def user_ids(image: Image) -> tuple[int, int]:
    """The image's User as numbers (what Kubernetes' runAsNonRoot needs: a name cannot be checked)."""
    user = image.runtime.get("User", "")
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


def rootfs_command(rootfs: Path, argv: list[str], *, uid: int, gid: int, workdir: str = "/") -> list[str]:
    """``argv`` run in ``rootfs`` as ``uid:gid`` from ``workdir``, in its own mount and PID
    namespaces with a fresh /proc; the caller passes the image's environment (its PATH finds
    the entrypoint). Start a long-running one with :func:`start_process_group` and stop it with
    :func:`kill_process_group`: killing unshare alone leaves the command running (``--kill-child``
    sets a parent-death signal that ``--setuid``'s credential change clears)."""
    return ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
            f"--root={rootfs}", f"--wd={workdir}", f"--setuid={uid}", f"--setgid={gid}", "--", *argv]


def start_process_group(cmd: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """``cmd`` (e.g. a :func:`rootfs_command`) started in a process group of its own, so that
    :func:`kill_process_group` reaches every process of it."""
    return subprocess.Popen(cmd, start_new_session=True, **popen)


def kill_process_group(proc: subprocess.Popen[bytes], deadline: float = 30.0) -> None:
    """SIGKILL to ``proc``'s whole process group (for a :func:`rootfs_command`: unshare and the
    command it runs in the image), then wait until none of the group is left; raises if one is."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=deadline)
    end = time.monotonic() + deadline
    while (left := _group_members(proc.pid)) and time.monotonic() < end:
        time.sleep(0.05)  # PID 1 reaps the namespace's orphans on its own schedule
    assert not left, f"processes of the image left running: {left}"


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(") ")[2].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def run_in_rootfs(rootfs: Path, image: Image, argv: list[str], *, timeout: float = 60,
                  uid: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the unpacked image as its user (or ``uid``) with its env; wait for it."""
    image_uid, image_gid = user_ids(image)
    cmd = rootfs_command(rootfs, argv, uid=image_uid if uid is None else uid,
                         gid=image_gid if uid is None else uid, workdir=image.workdir)
    return subprocess.run(cmd, env=image.env, capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)
