"""Resident memory of a process and all its descendants, read from /proc
(getrusage cannot see workers that are still running)."""
from __future__ import annotations

import os


def tree_rss(root: int | None = None) -> tuple[int, int]:
    """RSS bytes of `root` (default: this process) and its descendants:
    (sum — shared pages counted in each —, largest single process)."""
    root = root or os.getpid()
    parent, rss = {}, {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/statm") as f:
                rss[int(d)] = int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier += kids
    sizes = [rss.get(p, 0) for p in tree]
    return sum(sizes), max(sizes)
