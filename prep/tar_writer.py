"""Write a webdataset tar and its DALI index in one pass.

The tar is plain POSIX ustar with fixed owner and mtime, so the same samples
always give the same bytes (and sha256) — which is what lets a resumed prep be
checked against an uninterrupted one. The sha256 and the member offsets are
taken while writing, so nothing re-reads the file and `wds2idx` (which shells
out to `tar --list` twice) is not needed; the index has its format exactly.
"""
from __future__ import annotations

import hashlib
import tarfile


BLOCK = 512


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


class TarWriter:
    """Stream samples into `path`; `close()` returns (bytes, sha256 hex).

    `index` holds, per sample, its members as (ext, data offset, size, name):
    the content of one line of the DALI index.
    """

    def __init__(self, path: str):
        self._f = open(path, "wb")
        self._sha = hashlib.sha256()
        self.offset = 0
        self.index: list[list[tuple[str, int, int, str]]] = []

    def _write(self, data) -> None:
        self._f.write(data)
        self._sha.update(data)
        self.offset += len(data)

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """One sample: members (ext, bytes) are stored as `<key>.<ext>` in this order."""
        entry = []
        for ext, data in members:
            data = memoryview(data).cast("B")
            name = f"{key}.{ext}"
            self._write(_header(name, len(data)))
            entry.append((ext, self.offset, len(data), name))
            self._write(data)
            if len(data) % BLOCK:
                self._write(bytes(BLOCK - len(data) % BLOCK))
        self.index.append(entry)

    def close(self) -> tuple[int, str]:
        self._write(bytes(2 * BLOCK))  # end-of-archive marker
        self._f.close()
        return self.offset, self._sha.hexdigest()

    def abort(self) -> None:
        self._f.close()
