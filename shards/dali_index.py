"""The DALI webdataset index format: written by prep, read by the loader and verify.

One `v1.2 <n samples>` line, then one line per sample listing
`ext offset size name` for each of its members (what nvidia.dali's wds2idx
writes and `fn.readers.webdataset` reads). A filtered copy of the lines reads a
subset of the tar.
"""
from __future__ import annotations

DALI_INDEX_VERSION = "v1.2"

Entry = list[tuple[str, int, int, str]]


def format_index(index: list[list[tuple[str, int, int, str]]]) -> str:
    """The DALI webdataset index: a `v1.2 <n samples>` line, then one line per sample
    listing `ext offset size name` for each of its members."""
    lines = [f"{DALI_INDEX_VERSION} {len(index)}"]
    lines += [" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in entry)
              for entry in index]
    return "\n".join(lines) + "\n"


def parse_index(text: str) -> list[list[tuple[str, int, int, str]]]:
    """Inverse of `format_index`; ValueError if the text is not a v1.2 index."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != DALI_INDEX_VERSION or not head[1].isdigit():
        raise ValueError(f"first line {lines[0] if lines else ''!r} is not "
                         f"'{DALI_INDEX_VERSION} <count>'")
    out = []
    for line in lines[1:]:
        f = line.split()
        if not f or len(f) % 4:
            raise ValueError(f"index line {line!r} is not groups of 'ext offset size name'")
        out.append([(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f), 4)])
    if len(out) != int(head[1]):
        raise ValueError(f"index announces {head[1]} samples but lists {len(out)}")
    return out
