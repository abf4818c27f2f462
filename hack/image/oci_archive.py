"""Pack an OCI image layout directory (from `buildah push IMAGE oci:DIR`) into an OCI archive
that `ctr -n k8s.io images import` files under IMAGE's full name.

containerd names an imported image by the index's `io.containerd.image.name` annotation (a
full reference, e.g. docker.io/library/sluice:0.1.0, which is what a Pod's `image: sluice:0.1.0`
normalises to); `org.opencontainers.image.ref.name` carries the tag, as OCI tools expect.
The tar is written in a fixed order with fixed owners and times, so equal images give equal
archives.

    python3 oci_archive.py LAYOUT_DIR IMAGE OUT.tar
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path


def annotate_index(layout: Path, image: str) -> bytes:
    index = json.loads((layout / "index.json").read_text())
    manifests = index.get("manifests", [])
    if len(manifests) != 1:
        raise SystemExit(f"{layout}: expected one manifest in index.json, found {len(manifests)}")
    manifests[0]["annotations"] = {
        "io.containerd.image.name": image,
        "org.opencontainers.image.ref.name": image.rsplit(":", 1)[1],
    }
    return json.dumps(index, sort_keys=True).encode()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_archive(layout: Path, image: str, out: Path) -> None:
    index = annotate_index(layout, image)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        add_bytes(tar, "oci-layout", (layout / "oci-layout").read_bytes())
        add_bytes(tar, "index.json", index)
        for blob in sorted((layout / "blobs").rglob("*")):
            if blob.is_file():
                info = tar.gettarinfo(blob, arcname=str(blob.relative_to(layout)))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                info.mode = 0o644
                with blob.open("rb") as stream:
                    tar.addfile(info, stream)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    write_archive(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
