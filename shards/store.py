"""Open a finished store (docs/format.md) for reading: sites table, zarr arrays, shard paths.

`open_store` checks the manifest (format and version), that sites.csv is the
one the manifest names, and that the zarr arrays have the manifest's shape,
so a reader never silently trains on a store it does not understand.

    store = open_store("out/tiny")
    store.sites                      # DataFrame, row i = row i of every array
    store.pixels[row]                # (H, W, 6) uint8, read from zarr on demand
    store.stats                      # (n, 6, 5) float32: mean, std, median, min, max
    store.norm("plate")              # (n, 6, 2) float32: mean, std per row and channel
    store.shard_paths("train"), store.index_paths("train")   # for the DALI reader
"""
from __future__ import annotations

from common.errors import BadInput

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import zarr

from shards.layout import NORM_MODES, N_CHANNELS, SPLITS
from shards.manifest import (SHARDS_DIR, STORE_NAME, ManifestError, check_format,
                             read_manifest, sha256_file)

_SITES_DTYPES = {"row": np.int64, "split": str, "id_code": str, "experiment": str,
                 "cell_type": str, "plate": np.int64, "well": str, "site": np.int64,
                 "sirna": np.int64, "well_type": str}


class StoreError(BadInput):
    """A store is missing, incomplete, of another format version, or inconsistent."""


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
        return self.group[f"norm_{mode}"][:]

    def shards(self, split: str | None = None) -> list[dict]:
        """Manifest entries of the shards of `split` (all if None), in manifest order."""
        if split is not None and split not in SPLITS:
            raise StoreError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
        return [s for s in self.manifest["shards"] if split is None or s["split"] == split]

    def shard_paths(self, split: str | None = None) -> list[str]:
        return [os.path.join(self.root, SHARDS_DIR, s["name"]) for s in self.shards(split)]

    def index_paths(self, split: str | None = None) -> list[str]:
        return [os.path.join(self.root, SHARDS_DIR, s["index"]) for s in self.shards(split)]


def open_store(out_dir) -> Store:
    """Open the store prep wrote to `out_dir`; StoreError saying what is wrong if it cannot."""
    root = os.path.abspath(str(out_dir))
    try:
        m = read_manifest(root)
    except ManifestError as e:
        raise StoreError(str(e)) from None

    sites_path = os.path.join(root, m["sites_table"]["path"])
    if not os.path.isfile(sites_path):
        raise StoreError(f"{sites_path}: sites table missing")
    if sha256_file(sites_path) != m["sites_table"]["sha256"]:
        raise StoreError(f"{sites_path}: sha256 differs from the manifest; the sites table was "
                         "edited or replaced, re-run prep into a new output directory")
    sites = pd.read_csv(sites_path, dtype=_SITES_DTYPES, keep_default_na=False)
    if len(sites) != m["n_sites"] or not np.array_equal(sites["row"], np.arange(len(sites))):
        raise StoreError(f"{sites_path}: {len(sites)} rows, manifest says {m['n_sites']}, "
                         "or rows not numbered 0..n-1")

    store_path = os.path.join(root, STORE_NAME)
    try:
        group = zarr.open_group(store_path, mode="r")
        check_format(dict(group.attrs), store_path)
        pixels, stats = group["pixels"], group["stats"][:]
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
