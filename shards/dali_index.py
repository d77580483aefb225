"""The tar sample members and the DALI webdataset index format: one home for both.

A sample of a tar shard is three members, `<key>.pixels` (raw uint8 HWC),
`<key>.row` (its row in the sites table, int64 little-endian) and `<key>.json`
(its metadata), in that order; prep writes them, the loader reads the first
two, verify reads all three.

The index: one `v1.2 <n samples>` line, then one line per sample listing
`ext offset size name` for each of its members (what nvidia.dali's wds2idx
writes and `fn.readers.webdataset` reads). A filtered copy of the lines reads a
subset of the tar, which is how the loader selects and orders an epoch.
"""
from __future__ import annotations

PIXELS = "pixels"
ROW = "row"
JSON = "json"
MEMBERS = (PIXELS, ROW, JSON)  # the order of a sample's members in the tar
READ_MEMBERS = (PIXELS, ROW)  # what the loader reads, in the order DALI returns them

DALI_INDEX_VERSION = "v1.2"

Member = tuple[str, int, int, str]  # (ext, data offset, size, member name)
Entry = list[Member]


def format_entry(entry) -> str:
    """One index line: `ext offset size name` for each member of one sample."""
    return " ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in entry)


def join_index(lines: list[str]) -> str:
    """An index file's text from lines made by `format_entry` (the header counts them)."""
    return "".join([f"{DALI_INDEX_VERSION} {len(lines)}\n", *(line + "\n" for line in lines)])


def format_index(index: list[Entry]) -> str:
    """The DALI webdataset index of samples `index` (per sample, its members)."""
    return join_index([format_entry(entry) for entry in index])


def parse_index(text: str) -> list[Entry]:
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
