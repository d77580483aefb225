"""The one atomic write: a file appears under its final name whole or not at all.

Every file cellshard writes (manifest, index, tar shard, chunk record, CSV,
checkpoint, config, metrics, plot, prediction) goes through `write_atomic`:
the content is written to `temp_path(path)` in the same directory and
renamed over `path`. One naming scheme, `<stem>.tmp-<pid><ext>` (the
extension kept, since np.save and savefig look at it), so one cleanup rule
finds the leftovers of a killed process: `remove_stale_temps`.

`durable=True` also fsyncs the file before the rename and the directory
after it, for files whose loss after a machine crash would cost work
(checkpoints, the manifest, finished shards); a killed process alone never
needs it, since the rename is atomic either way.
"""
from __future__ import annotations

import errno
import os
import re
from typing import Callable

_NOT_WRITABLE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
_TEMP_RE = re.compile(r"\.tmp-(\d+)(\.[^./]*)?$")


def temp_path(path: str | os.PathLike) -> str:
    """`dir/best.pth` -> `dir/best.tmp-<pid>.pth` (this process's temporary name)."""
    root, ext = os.path.splitext(str(path))
    return f"{root}.tmp-{os.getpid()}{ext}"


def temp_owner(name: str) -> int | None:
    """The pid that wrote temporary file `name`, or None if `name` is not a temporary."""
    m = _TEMP_RE.search(os.path.basename(str(name)))
    return int(m.group(1)) if m else None


def write_atomic(path: str | os.PathLike, write: Callable[[str], object], *,
                 durable: bool = False) -> str:
    """Call `write(tmp)` to fill the temporary file, then rename it to `path`.

    On any error (or a KeyboardInterrupt) the temporary is removed and the
    error re-raised: nothing is left under either name."""
    path = str(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in _NOT_WRITABLE:
            # Name the file the user asked for, not our temporary.
            raise OSError(e.errno, e.strerror, path) from e
        raise
    if durable:
        _fsync_dir(os.path.dirname(path) or ".")
    return path


def write_bytes(path: str | os.PathLike, data: bytes | str, *, durable: bool = False) -> str:
    """Atomically write `data` (str is UTF-8 encoded) to `path`."""
    blob = data.encode() if isinstance(data, str) else data

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(blob)
    return write_atomic(path, write, durable=durable)


def check_writable(directory: str | os.PathLike) -> None:
    """Raise OSError (EROFS or EACCES, naming `directory`) when files cannot be created in it
    or, where it does not exist yet, in its nearest existing parent; creates nothing, so a
    command can refuse before hours of work whose results it could not keep."""
    directory = os.path.abspath(str(directory))
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if os.statvfs(probe).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), directory)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), directory)


def remove_stale_temps(directory: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Remove temporaries (`*.tmp-<pid>*`) whose writing process no longer runs.

    A live pid's temporary belongs to a run still going and is left alone."""
    removed = []
    for root, dirs, files in os.walk(str(directory)):
        for name in files:
            pid = temp_owner(name)
            if pid is not None and not pid_alive(pid):
                p = os.path.join(root, name)
                os.remove(p)
                removed.append(p)
        if not recursive:
            break
    return removed


def pid_alive(pid: int) -> bool:
    """True while process `pid` runs (a killed worker left as a zombie counts as dead)."""
    if pid == os.getpid():
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename still happened
    finally:
        os.close(fd)
