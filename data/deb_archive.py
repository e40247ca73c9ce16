"""Read the files inside a Debian `.deb` without dpkg: an `ar` archive whose `data.tar.{xz,gz,zst,bz2}` holds them.

Pure stdlib so the corpus builder runs wherever Python does (and tests can make a fake .deb in a few lines).
zstd members (rare in Debian 12 `main`) are refused with a clear error rather than adding a dependency.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Iterator

_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60  # name 16, mtime 12, uid 6, gid 6, mode 8, size 10, magic 2


class DebArchiveError(ValueError):
    pass


def ar_members(path: Path) -> dict[str, bytes]:
    """The members of an ar archive, by name (a .deb has three: debian-binary, control.tar.*, data.tar.*)."""
    blob = Path(path).read_bytes()
    if not blob.startswith(_AR_MAGIC):
        raise DebArchiveError(f"{path} is not a .deb (no ar header); delete it so it is downloaded again")
    members, pos = {}, len(_AR_MAGIC)
    while pos + _AR_HEADER <= len(blob):
        header = blob[pos : pos + _AR_HEADER]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        pos += _AR_HEADER
        members[name] = blob[pos : pos + size]
        pos += size + (size % 2)  # members are 2-byte aligned
    return members


def iter_deb_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """(path without the leading './', content) of every regular file in the package, in archive order."""
    members = ar_members(path)
    data = [name for name in members if name.startswith("data.tar")]
    if not data:
        raise DebArchiveError(f"{path} has no data.tar.* member; is it a Debian binary package?")
    name = data[0]
    if name.endswith(".zst"):
        raise DebArchiveError(f"{path}: {name} is zstd-compressed, which the stdlib cannot read; pick another version")
    blob = members[name]
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
        for member in tar:
            if member.isfile():
                yield member.name.removeprefix("./"), tar.extractfile(member).read()
