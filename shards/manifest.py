"""`OUT/manifest.json`: what a store holds and how to check it (docs/format.md, "Manifest").

Prep writes the manifest last, so its presence means the store is complete;
readers call `read_manifest`, which refuses anything but this format version.
"""
from __future__ import annotations

from common.errors import BadInput

import hashlib
import json
import os

from shards.atomic import write_bytes
from shards.source_layout import detect_layout, source_csvs

FORMAT = "cellshard"
# 2: sites.csv gained `sirna_name` and the manifest `source.layout` (docs/format.md).
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
SITES_NAME = "sites.csv"
STORE_NAME = "store.zarr"
SHARDS_DIR = "shards"
# The arrays of store.zarr (docs/format.md): pixels (one chunk file per site, zarr v3
# "default" chunk keys with a "." separator), stats and one norm_<mode> per norm mode.
PIXELS_ARRAY = "pixels"
STATS_ARRAY = "stats"
PIXELS_CHUNK_SEPARATOR = "."


def norm_array(mode: str) -> str:
    return f"norm_{mode}"


def pixels_chunk_path(out_dir: str, row: int) -> str:
    """File of zarr chunk (row, 0, 0, 0) of the pixels array of the store in `out_dir`."""
    key = PIXELS_CHUNK_SEPARATOR.join(("c", str(int(row)), "0", "0", "0"))
    return os.path.join(out_dir, STORE_NAME, PIXELS_ARRAY, key)
REQUIRED_KEYS = ("format", "format_version", "image_shape", "dtype", "layout",
                 "channel_order", "codec", "n_sites", "sites_table", "source", "shards")


class ManifestError(BadInput):
    """A manifest is missing, unreadable, or of another format or version."""


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_files(data_dir: str, source_layout: str | None = None) -> dict[str, str]:
    """{csv name: sha256} of the source CSVs of `data_dir`'s layout (detected unless
    given) that are present: only the files that were read name the source."""
    source_layout = source_layout or detect_layout(data_dir)
    return {name: sha256_file(os.path.join(data_dir, name))
            for name in source_csvs(source_layout)
            if os.path.isfile(os.path.join(data_dir, name))}


def fingerprint(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def check_format(m: dict, where: str) -> None:
    """Refuse a manifest (or store attributes) of another format or version."""
    if m.get("format") != FORMAT:
        raise ManifestError(f"{where}: not a {FORMAT} store (format {m.get('format')!r}); "
                            "use a new output directory or delete this one")
    if m.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{where}: store format version {m.get('format_version')!r}, but this {FORMAT} "
            f"reads and writes version {FORMAT_VERSION}; re-run prep into a new output "
            "directory, or delete this one")


def read_manifest(out_dir: str) -> dict:
    """The manifest of a complete store; ManifestError if absent, unreadable or of
    another format version."""
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: no manifest; {out_dir} is not a finished store "
                            "(run `python -m prep shards` into it, it resumes where it stopped)")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(m, dict):
        raise ManifestError(f"{path}: manifest is not a JSON object")
    check_format(m, path)
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise ManifestError(f"{path}: manifest lacks {', '.join(missing)}")
    return m


def write_manifest(out_dir: str, m: dict) -> None:
    # durable: the manifest is what says the store is complete; a crash must not lose it.
    write_bytes(os.path.join(out_dir, MANIFEST_NAME), json.dumps(m, indent=1) + "\n",
                durable=True)
