"""One prep run per output directory: `OUT/.prep/lock` holds the running run's pid.

Two `prep shards` runs writing one OUT would interleave chunks, shards and
records; the second is refused, naming the first one's pid. The lock file is
created whole by a hard link (which, like O_EXCL, fails if the name exists),
so of two runs starting at once exactly one wins and the file always holds
its pid. A lock
whose pid no longer runs (a run killed with -9) is stale and taken over.
"""
from __future__ import annotations

import contextlib
import os

from common.errors import BadInput
from shards.atomic import pid_alive, temp_path

LOCK_NAME = "lock"


class LockedError(BadInput):
    """Another prep run is writing the same output directory."""


@contextlib.contextmanager
def out_dir_lock(work_dir: str):
    """Hold `work_dir/lock` for the duration of the block (work_dir is created)."""
    os.makedirs(work_dir, exist_ok=True)
    path = os.path.join(work_dir, LOCK_NAME)
    _acquire(path)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _owner(path) == os.getpid():
                os.remove(path)


def _acquire(path: str) -> None:
    tmp = temp_path(path)
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        _link(tmp, path)
    finally:
        os.remove(tmp)


def _link(tmp: str, path: str) -> None:
    for _ in range(3):  # a stale lock removed by a racing run: try again
        try:
            os.link(tmp, path)
        except FileExistsError:
            pid = _owner(path)
            if pid is not None and pid_alive(pid):
                raise LockedError(
                    f"{path}: another prep run (pid {pid}) is writing "
                    f"{os.path.dirname(os.path.dirname(path))}; wait for it to finish or stop "
                    "it, or use another output directory") from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # stale: its run is gone
            continue
        return
    raise LockedError(f"{path}: could not take the lock; another prep run keeps taking it")


def _owner(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None
