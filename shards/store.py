"""Open a finished store (docs/format.md) for reading: sites table, zarr arrays, shard paths.

`open_store` checks the manifest (format and version), that sites.csv is the
one the manifest names, and that the zarr arrays have the manifest's shape,
so a reader never silently trains on a store it does not understand; and,
cheaply, that nothing the manifest promises is missing (`check_structure`:
every array with its shape, every pixels chunk file, every shard with its
size and index), so a damaged store is refused before it is trained on or
previewed. Shard contents (sha256) are checked by `prep verify` and by a
re-run of `prep shards`, not here: hashing a full store takes minutes.

    store = open_store("out/tiny")
    store.sites                      # DataFrame, row i = row i of every array
    store.pixels[row]                # (H, W, 6) uint8, read from zarr on demand
    store.stats                      # (n, 6, 5) float32: mean, std, median, min, max
    store.norm("plate")              # (n, 6, 2) float32: mean, std per row and channel
    store.shard_paths("train"), store.index_paths("train")   # for the DALI reader
"""
from __future__ import annotations

from common.errors import BadInput

import itertools
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import zarr

from shards.layout import NORM_MODES, N_CHANNELS, SPLITS, STAT_NAMES
from shards.manifest import (PIXELS_ARRAY, SHARDS_DIR, STATS_ARRAY, STORE_NAME, ManifestError,
                             check_format, norm_array, pixels_chunk_path, read_manifest,
                             sha256_file)
from shards.metadata import SITES_TABLE_COLUMNS

_SITES_DTYPES = {"row": np.int64, "split": str, "id_code": str, "experiment": str,
                 "cell_type": str, "plate": np.int64, "well": str, "site": np.int64,
                 "sirna": np.int64, "well_type": str, "sirna_name": str}
assert tuple(_SITES_DTYPES) == SITES_TABLE_COLUMNS


class StoreError(BadInput):
    """A store is missing, incomplete, of another format version, or inconsistent."""


REPAIR_HINT = "re-run `python -m prep shards --data-dir DATA --out-dir OUT` to repair it"
NORM_ARRAYS = tuple(norm_array(m) for m in NORM_MODES if m != "none")


def array_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    """Every array the manifest promises in store.zarr, with its shape."""
    n = manifest["n_sites"]
    shapes = {PIXELS_ARRAY: (n, *manifest["image_shape"]),
              STATS_ARRAY: (n, N_CHANNELS, len(STAT_NAMES))}
    shapes.update({name: (n, N_CHANNELS, 2) for name in NORM_ARRAYS})
    return shapes


def missing_chunk_rows(root: str, n_sites: int) -> list[int]:
    """Rows whose pixels chunk file is absent or empty (one directory listing, no reads)."""
    folder = os.path.dirname(pixels_chunk_path(root, 0))
    sizes = {}
    if os.path.isdir(folder):
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith("c."):
                    sizes[e.name] = e.stat().st_size
    return [r for r in range(n_sites)
            if sizes.get(os.path.basename(pixels_chunk_path(root, r)), 0) <= 0]


def check_structure(root: str, manifest: dict) -> list[str]:
    """Problems (one line each) with what the manifest promises, found without reading
    any pixels: the sites table, every zarr array (present, with its shape, every chunk
    file present and non-empty) and every shard (present with the manifest's size,
    with its index). Empty if the store is whole as far as sizes can tell."""
    problems = []
    sites = os.path.join(root, manifest["sites_table"]["path"])
    if not os.path.isfile(sites):
        problems.append(f"{sites}: sites table missing")
    store = os.path.join(root, STORE_NAME)
    for name, shape in array_shapes(manifest).items():
        problems += _check_array(os.path.join(store, name), name, shape)
    missing = missing_chunk_rows(root, manifest["n_sites"])
    if missing and os.path.isfile(os.path.join(store, PIXELS_ARRAY, "zarr.json")):
        first = pixels_chunk_path(root, missing[0])
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        problems.append(f"{first}: pixels chunk of row {missing[0]} missing or empty{more}")
    for s in manifest["shards"]:
        tar = os.path.join(root, SHARDS_DIR, s["name"])
        size = os.path.getsize(tar) if os.path.isfile(tar) else None
        if size is None:
            problems.append(f"{tar}: shard missing")
        elif size != s["bytes"]:
            problems.append(f"{tar}: {size} bytes, manifest says {s['bytes']} "
                            "(truncated or replaced)")
        idx = os.path.join(root, SHARDS_DIR, s["index"])
        if not os.path.isfile(idx):
            problems.append(f"{idx}: shard index missing")
    return problems


def _check_array(path: str, name: str, shape: tuple[int, ...]) -> list[str]:
    """One zarr v3 array: its metadata, shape and every chunk file, from the file system."""
    meta_path = os.path.join(path, "zarr.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        have = tuple(meta["shape"])
        chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
    except FileNotFoundError:
        return [f"{path}: array {name} missing"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{meta_path}: unreadable metadata of array {name} ({e})"]
    if have != tuple(shape):
        return [f"{path}: array {name} has shape {have}, manifest says {tuple(shape)}"]
    if name == PIXELS_ARRAY:
        return []  # one chunk per site: checked from one listing by missing_chunk_rows
    grid = [range(math.ceil(n / c)) for n, c in zip(have, chunks)]
    for idx in itertools.product(*grid):
        chunk = os.path.join(path, *("c" + sep + sep.join(map(str, idx))).split("/"))
        if not (os.path.isfile(chunk) and os.path.getsize(chunk) > 0):
            return [f"{chunk}: chunk of array {name} missing or empty"]
    return []


@dataclass
class Store:
    root: str
    manifest: dict
    sites: pd.DataFrame
    pixels: zarr.Array
    stats: np.ndarray
    group: zarr.Group = field(repr=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])

    def norm(self, mode: str) -> np.ndarray:
        """(n, 6, 2) float32 mean and std per row and channel for normalization `mode`."""
        if mode not in NORM_MODES:
            raise StoreError(f"normalization mode {mode!r}: choose one of {', '.join(NORM_MODES)}")
        if mode == "none":  # pixel / 255
            out = np.zeros((len(self.sites), N_CHANNELS, 2), np.float32)
            out[..., 1] = 255.0
            return out
        try:
            return self.group[norm_array(mode)][:]
        except KeyError:
            raise StoreError(f"{os.path.join(self.root, STORE_NAME, norm_array(mode))}: array "
                             f"{norm_array(mode)} missing; {REPAIR_HINT}") from None

    def read_site(self, row: int) -> np.ndarray:
        """(H, W, 6) uint8 pixels of `row`; StoreError if its chunk file is gone (zarr
        would return zeros for a missing chunk, silently)."""
        chunk = pixels_chunk_path(self.root, row)
        if not os.path.isfile(chunk):
            raise StoreError(f"{chunk}: pixels chunk of row {row} missing; {REPAIR_HINT}")
        return self.pixels[int(row)]

    def shards(self, split: str | None = None) -> list[dict]:
        """Manifest entries of the shards of `split` (all if None), in manifest order."""
        if split is not None and split not in SPLITS:
            raise StoreError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
        return [s for s in self.manifest["shards"] if split is None or s["split"] == split]

    def shard_paths(self, split: str | None = None) -> list[str]:
        return [os.path.join(self.root, SHARDS_DIR, s["name"]) for s in self.shards(split)]

    def index_paths(self, split: str | None = None) -> list[str]:
        return [os.path.join(self.root, SHARDS_DIR, s["index"]) for s in self.shards(split)]


def open_store(out_dir, check: bool = True) -> Store:
    """Open the store prep wrote to `out_dir`; StoreError saying what is wrong if it cannot.

    `check` runs `check_structure` and refuses a damaged store (naming the first
    missing or damaged thing); `prep verify` passes False to list every problem."""
    root = os.path.abspath(str(out_dir))
    try:
        m = read_manifest(root)
    except ManifestError as e:
        raise StoreError(str(e)) from None
    if check:
        problems = check_structure(root, m)
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise StoreError(f"{problems[0]}{more}: the store at {root} is damaged; "
                             f"{REPAIR_HINT}")

    sites_path = os.path.join(root, m["sites_table"]["path"])
    if not os.path.isfile(sites_path):
        raise StoreError(f"{sites_path}: sites table missing")
    if sha256_file(sites_path) != m["sites_table"]["sha256"]:
        raise StoreError(f"{sites_path}: sha256 differs from the manifest; the sites table was "
                         "edited or replaced, re-run prep into a new output directory")
    sites = pd.read_csv(sites_path, dtype=_SITES_DTYPES, keep_default_na=False)
    if tuple(sites.columns) != SITES_TABLE_COLUMNS:  # what this version reads, nothing else
        raise StoreError(f"{sites_path}: columns {', '.join(sites.columns)}, expected "
                         f"{', '.join(SITES_TABLE_COLUMNS)}; re-run prep into a new output "
                         "directory")
    if len(sites) != m["n_sites"] or not np.array_equal(sites["row"], np.arange(len(sites))):
        raise StoreError(f"{sites_path}: {len(sites)} rows, manifest says {m['n_sites']}, "
                         "or rows not numbered 0..n-1")

    store_path = os.path.join(root, STORE_NAME)
    try:
        group = zarr.open_group(store_path, mode="r")
        check_format(dict(group.attrs), store_path)
        pixels, stats = group[PIXELS_ARRAY], group[STATS_ARRAY][:]
    except ManifestError as e:
        raise StoreError(str(e)) from None
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise StoreError(f"{store_path}: not a readable zarr store with pixels and stats ({e})") \
            from None
    want = (m["n_sites"], *m["image_shape"])
    if pixels.shape != want or pixels.dtype != np.uint8:
        raise StoreError(f"{store_path}/pixels is {pixels.shape} {pixels.dtype}, "
                         f"manifest says {want} uint8")
    return Store(root=root, manifest=m, sites=sites, pixels=pixels, stats=stats, group=group)
