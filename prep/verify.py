"""`python -m prep verify OUT [--full] [--data-dir DATA]`: is the store what the manifest says?

Checks the store's structure (shards.store.check_structure: every array with
its shape, every pixels chunk file present, every shard and index present with
the manifest's size), every shard's sha256 and sample count against the
manifest and its DALI index against the tar's own headers; then, for a sample of sites (all
with --full), decodes the source PNGs again and compares them with the zarr
pixels and with the tar sample (found through the index, the way DALI finds
it). Exits non-zero (SystemExit) listing every difference found.
"""
from __future__ import annotations

import json
import os
import tarfile

import numpy as np

from prep.png_io import PngError, read_site, site_paths
from shards.dali_index import JSON, PIXELS, ROW, parse_index
from shards.layout import sample_key
from shards.manifest import ManifestError, fingerprint, read_manifest, sha256_file, source_files
from shards.source_layout import MetadataError, detect_layout
from shards.store import StoreError, check_structure, open_store

N_SAMPLED = 64
MAX_LISTED = 20


def verify(out_dir, full=False, data_dir=None, n_sampled=N_SAMPLED, seed=0):
    root = os.path.abspath(str(out_dir))
    try:
        problems = check_structure(root, read_manifest(root))
    except ManifestError as e:
        raise StoreError(str(e)) from None
    try:
        store = open_store(root, check=False)
    except StoreError:
        if not problems:
            raise
        _report(out_dir, problems)  # what is missing explains why it does not open
    where = {}  # sample key -> (tar path, index entry)
    for entry, tar, idx in zip(store.shards(), store.shard_paths(), store.index_paths()):
        problems += _check_shard(entry, tar, idx, where)

    data_dir = os.path.abspath(str(data_dir or store.manifest["source"]["data_dir"]))
    layout, rows = None, []
    if not os.path.isdir(data_dir):
        problems.append(f"{data_dir}: source data directory not found; pass --data-dir")
    else:
        try:
            layout = detect_layout(data_dir)
        except MetadataError as e:
            problems.append(f"{e}; pass --data-dir")
    if layout is not None:
        if fingerprint(source_files(data_dir, layout)) != store.manifest["source"]["fingerprint"]:
            packed = store.manifest["source"].get("files", {})
            problems.append(f"{data_dir}: source CSVs ({layout} layout) differ from those the "
                            f"store was packed from ({', '.join(packed)}; manifest "
                            "source.fingerprint)")
        n = len(store.sites)
        rows = (np.arange(n) if full else
                np.sort(np.random.default_rng(seed).choice(n, min(n_sampled, n), replace=False)))
    for row in rows:
        problems += _check_site(store, int(row), data_dir, layout, where)

    if problems:
        _report(out_dir, problems)
    result = {"out_dir": store.root, "shards": len(store.shards()), "sites": len(store.sites),
              "sites_compared_to_png": len(rows), "ok": True}
    print(f"verify {out_dir}: OK ({result['shards']} shards; {len(rows)} of {len(store.sites)} "
          "sites match their PNGs in zarr and tar)")
    return result


def _report(out_dir, problems):
    """Exit 1 listing the problems: a verdict on the store, not an error in the command."""
    shown = problems[:MAX_LISTED]
    more = f"\n... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise SystemExit(f"verify {out_dir}: {len(problems)} problem(s)\n" + "\n".join(shown) + more)


def _check_shard(entry, tar, idx, where) -> list[str]:
    if not os.path.isfile(tar) or os.path.getsize(tar) != entry["bytes"]:
        return []  # check_structure reported it
    problems = []
    sha = sha256_file(tar)
    if sha != entry["sha256"]:
        problems.append(f"{tar}: sha256 {sha[:16]}... differs from the manifest's "
                        f"{entry['sha256'][:16]}... (file changed or corrupt)")
    try:
        with open(idx) as f:
            index = parse_index(f.read())
    except (OSError, ValueError) as e:
        return problems + [f"{idx}: unreadable DALI index ({e})"]
    # The tar's own headers, independently of the index.
    try:
        with tarfile.open(tar) as tf:
            members = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    except (tarfile.TarError, OSError) as e:
        return problems + [f"{tar}: not a readable tar ({e})"]
    listed = [(name, off, size) for sample in index for _, off, size, name in sample]
    if listed != members:
        problems.append(f"{idx}: does not match the members of {tar}")
    keys = {name.split(".", 1)[0] for name, _, _ in members}
    if len(index) != entry["count"] or len(keys) != entry["count"]:
        problems.append(f"{tar}: {len(keys)} samples ({len(index)} in its index), manifest "
                        f"says {entry['count']}")
    for sample in index:
        where[sample[0][3].split(".", 1)[0]] = (tar, {ext: (off, size) for ext, off, size, _ in
                                                      sample})
    return problems


def _check_site(store, row, data_dir, layout, where) -> list[str]:
    r = store.sites.iloc[row]
    key = sample_key(r["id_code"], r["site"])
    try:
        source = np.stack(read_site(site_paths(data_dir, r, layout), store.image_shape[:2]),
                          axis=-1)
    except PngError as e:
        return [f"row {row} ({key}): {e}"]
    problems = []
    try:
        stored = store.read_site(row)
    except StoreError:
        problems.append(f"row {row} ({key}): zarr chunk missing")
    except Exception as e:  # a damaged chunk fails in the zstd decoder
        problems.append(f"row {row} ({key}): zarr chunk unreadable ({e})")
    else:
        if not np.array_equal(stored, source):
            problems.append(f"row {row} ({key}): zarr pixels differ from the source PNGs")
    if key not in where:
        return problems + [f"row {row} ({key}): no sample with this key in any shard index"]
    tar, members = where[key]
    with open(tar, "rb") as f:
        def member(ext):
            off, size = members.get(ext, (0, 0))
            f.seek(off)
            return f.read(size)
        pixels, row_bytes, meta = member(PIXELS), member(ROW), member(JSON)
    if pixels != source.tobytes():
        problems.append(f"{tar}: sample {key} pixels differ from the source PNGs")
    if row_bytes != np.array(row, "<i8").tobytes():
        problems.append(f"{tar}: sample {key} has row member {row_bytes!r}, expected {row}")
    try:
        meta_row = json.loads(meta)["row"]
    except (ValueError, KeyError, TypeError):
        meta_row = None
    if meta_row != row:
        problems.append(f"{tar}: sample {key} JSON is unreadable or names row {meta_row}")
    return problems
