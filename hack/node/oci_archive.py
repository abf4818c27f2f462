#!/usr/bin/env python3
"""Write a one-layer OCI image archive (an OCI image layout in a tar), with no registry and no
container engine: ``ctr -n k8s.io images import`` takes it as it is.

The layer is assembled from a list of entries rather than a directory on disk, so nothing needs
root and the result is byte-for-byte reproducible (sorted entries, mtime 0, owner 0:0): the same
inputs give the same image digest, and an unchanged image is not re-imported as a new one.

    oci_archive.py OUT.tar --name localhost/pause:3.10.1 --user 65535:65535 \\
        --entrypoint /pause --file /path/on/host/pause:/pause:0755 \\
        [--dir /tmp:1777] [--symlink /bin/sh:busybox] [--env K=V] [--cmd ARG]...

Standard library only (it runs before the project's virtualenv exists).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name.lstrip("/"))
    info.type, info.mode, info.mtime = kind, mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _parents(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def layer_tar(files: list[str], dirs: list[str], symlinks: list[str]) -> bytes:
    """The layer: ``files`` are ``SRC:DEST:MODE``, ``dirs`` ``DEST:MODE``, ``symlinks``
    ``DEST:TARGET``; parent directories are added (0755) as needed."""
    entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
    for spec in dirs:
        dest, mode = spec.rsplit(":", 1)
        entries[dest.strip("/")] = (_info(dest, tarfile.DIRTYPE, int(mode, 8)), None)
    for spec in files:
        src, dest, mode = spec.rsplit(":", 2)
        data = Path(src).read_bytes()
        info = _info(dest, tarfile.REGTYPE, int(mode, 8))
        info.size = len(data)
        entries[dest.strip("/")] = (info, data)
    for spec in symlinks:
        dest, target = spec.split(":", 1)
        info = _info(dest, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        entries[dest.strip("/")] = (info, None)
    for name in list(entries):
        for parent in _parents(name):
            entries.setdefault(parent, (_info(parent, tarfile.DIRTYPE, 0o755), None))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            info, data = entries[name]
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    info = _info(f"blobs/sha256/{digest[7:]}", tarfile.REGTYPE, 0o644)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    return digest


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_archive(out: Path, name: str, layer: bytes, config: dict[str, Any]) -> str:
    """Write the archive; return the manifest digest (the image's identity in containerd)."""
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    image_config = {
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "hack/node/oci_archive.py"}],
    }
    config_bytes = _json(image_config)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        layout = _json({"imageLayoutVersion": "1.0.0"})
        info = _info("oci-layout", tarfile.REGTYPE, 0o644)
        info.size = len(layout)
        tar.addfile(info, io.BytesIO(layout))
        layer_digest = _blob(tar, layer)
        config_digest = _blob(tar, config_bytes)
        manifest = _json({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest,
                       "size": len(config_bytes)},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": len(layer)}],
        })
        manifest_digest = _blob(tar, manifest)
        index = _json({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest),
                "annotations": {"io.containerd.image.name": name,
                                "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]},
            }],
        })
        info = _info("index.json", tarfile.REGTYPE, 0o644)
        info.size = len(index)
        tar.addfile(info, io.BytesIO(index))
    tmp.replace(out)
    return manifest_digest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--name", required=True, help="image reference, e.g. localhost/pause:3.10.1")
    ap.add_argument("--file", action="append", default=[], help="SRC:DEST:MODE")
    ap.add_argument("--dir", action="append", default=[], help="DEST:MODE")
    ap.add_argument("--symlink", action="append", default=[], help="DEST:TARGET")
    ap.add_argument("--user", default="65534:65534")
    ap.add_argument("--entrypoint", action="append", default=[])
    ap.add_argument("--cmd", action="append", default=[])
    ap.add_argument("--env", action="append", default=[])
    args = ap.parse_args()
    if ":" not in args.name.rsplit("/", 1)[-1]:
        ap.error("--name needs an explicit tag (imagePullPolicy IfNotPresent then never pulls)")
    config: dict[str, Any] = {"User": args.user, "Env": [DEFAULT_PATH, *args.env],
                              "WorkingDir": "/"}
    if args.entrypoint:
        config["Entrypoint"] = args.entrypoint
    if args.cmd:
        config["Cmd"] = args.cmd
    digest = write_archive(args.out, args.name, layer_tar(args.file, args.dir, args.symlink),
                           config)
    print(f"{args.name} {digest} {args.out}")


if __name__ == "__main__":
    main()
