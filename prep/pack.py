"""`python -m prep shards`: pack every site's six PNGs into OUT/store.zarr and OUT/shards/*.tar.

One task per tar shard. A worker decodes its sites' PNGs (checking them),
computes their statistics, writes their zarr chunks and the tar (each through
shards.atomic: a temporary `<stem>.tmp-<pid><ext>`, then renamed; the tar
fsynced), and last a record of what it wrote in OUT/.prep/. A shard whose tar
and record are both final is finished: a killed run started again skips it,
and removes the temporaries of dead processes (shards.atomic.remove_stale_temps).
One run at a time holds OUT/.prep/lock (prep.lock); a second is refused.
Once every shard is finished the parent pools the plate and experiment norms,
writes the stats arrays, sites.csv and, last, the manifest (fsynced). Workers hold one site at a time, so memory does not grow with the
dataset. A re-run on a finished store checks it (shards.store.check_structure
and every shard's sha256) and repacks only what is missing or damaged.

Files written: see docs/format.md. OUT/.prep/ is prep's own bookkeeping
(one record per shard, with the site statistics) and not part of the format.
"""
from __future__ import annotations

import json
import multiprocessing
import numbers
import os
import re
import signal
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import zarr
from tqdm import tqdm
from zarr.codecs import ZstdCodec

from common.errors import BadInput
from prep.lock import out_dir_lock
from prep.plan import plan_shards
from prep.png_io import PngError, read_site, site_paths
from prep.shard_writer import WORK_DIR, init_worker, read_record, shard_files, write_shard
from prep.site_stats import compare_reference, pooled_norm, site_norm
from shards.atomic import remove_stale_temps, write_bytes
from shards.layout import CHANNELS, N_CHANNELS
from shards.manifest import (FORMAT, FORMAT_VERSION, MANIFEST_NAME, PIXELS_ARRAY,
                             PIXELS_CHUNK_SEPARATOR, SHARDS_DIR, SITES_NAME, STATS_ARRAY,
                             STORE_NAME, ManifestError, check_format, fingerprint, norm_array,
                             sha256_file, source_files, write_manifest)
from shards.metadata import load_sites
from shards.source_layout import LOOKED_FOR, detect_layout
from shards.store import check_structure, missing_chunk_rows

# zstd level 1: as small as level 3 on these images and a little cheaper
# (bench/prep.py prints both); PNG decoding dominates either way.
ZSTD_LEVEL = 1
# Test hook: kill this whole process group after N shards finish, as a crash would.
KILL_AFTER_ENV = "CELLSHARD_PREP_KILL_AFTER"


def pack(data_dir, out_dir, workers=None, shard_size_mb=768, seed=0, zstd_level=ZSTD_LEVEL):
    """Pack DATA (either RxRx1 layout: Kaggle files or metadata.csv + images/) into
    OUT; resumable. Returns a short summary
    (the manifest itself is OUT/manifest.json).

    A re-run on a finished store checks it first (every array, chunk file and
    shard present, every shard's sha256 as in the manifest: this re-reads the
    shards, about as long as copying them) and repacks what is missing or damaged."""
    t0 = time.time()
    data_dir, out_dir = os.path.abspath(str(data_dir)), os.path.abspath(str(out_dir))
    workers = _check_options(data_dir, out_dir, workers, shard_size_mb, seed)
    layout = detect_layout(data_dir)
    files = source_files(data_dir, layout)
    fp = fingerprint(files)
    params = {"shard_size_mb": shard_size_mb, "seed": seed, "zstd_level": zstd_level}
    done, damaged = _finished_manifest(out_dir, fp, params)
    if done is not None and damaged is None:
        print(f"{out_dir}: store is complete (every array, chunk and shard checked, shard "
              "sha256s included); nothing to do")
        return _summary(out_dir, done, packed=0, seconds=time.time() - t0)

    sites = load_sites(data_dir)
    _check_files_exist(data_dir, sites, layout)
    # Every site must have the first site's shape.
    height, width = read_site(site_paths(data_dir, sites.iloc[0], layout))[0].shape
    shape = (height, width, N_CHANNELS)
    run = {"format_version": FORMAT_VERSION, "fingerprint": fp, "image_shape": list(shape),
           "n_sites": len(sites), "zstd_level": zstd_level}
    _check_out_dir(out_dir, run)
    with out_dir_lock(os.path.join(out_dir, WORK_DIR)):
        plan = plan_shards(sites, height, width, shard_size_mb, seed)
        if damaged is not None:
            _forget_damaged(out_dir, done, damaged, plan)
        _prepare_out_dir(out_dir, run)
        todo = [s for s in plan if read_record(out_dir, s, run) is None]
        rows = sites.to_dict("records")
        tasks = [dict(shard=s, sites=[rows[r] for r in s["rows"]], data_dir=data_dir,
                      layout=layout, out_dir=out_dir, run=run) for s in todo]
        packed = sum(len(s["rows"]) for s in todo)
        _run_workers(tasks, workers, total=len(sites), initial=len(sites) - packed)
        manifest = _finish(data_dir, layout, out_dir, sites, plan, run, files, params)
    return _summary(out_dir, manifest, packed=packed, seconds=time.time() - t0)


def _check_options(data_dir, out_dir, workers, shard_size_mb, seed):
    """Refuse bad arguments before anything is read or written; returns the workers."""
    if not os.path.isdir(data_dir):
        raise BadInput(f"{data_dir}: data directory not found (--data-dir); {LOOKED_FOR}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise BadInput(f"{out_dir}: output directory (--out-dir) is a file, not a directory")
    if isinstance(shard_size_mb, bool) or not isinstance(shard_size_mb, numbers.Real) \
            or not shard_size_mb > 0:
        raise BadInput(f"--shard-size-mb {shard_size_mb!r}: must be a positive number of MiB "
                       "(default 768)")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise BadInput(f"--seed {seed!r}: must be a non-negative integer")
    if workers is None:
        return None
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise BadInput(f"--workers {workers!r}: must be a positive integer (default: one "
                       "per core)")
    return int(workers)


def _summary(out_dir, m, packed, seconds):
    return {"out_dir": out_dir, "sites": m["n_sites"], "image_shape": m["image_shape"],
            "shards": len(m["shards"]), "shard_bytes": sum(s["bytes"] for s in m["shards"]),
            "sites_packed_now": packed, "seconds": round(seconds, 2)}


# ---------------------------------------------------------------- before packing

def _finished_manifest(out_dir, fp, params):
    """(manifest, None) if OUT already holds this exact store, whole; (manifest,
    problems) if it holds this store damaged; (None, None) if it holds no manifest.

    Refuses (ManifestError) a store of another format version, other source
    data or other prep parameters: those are not ours to overwrite.
    """
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: unreadable manifest ({e}); delete it to let prep "
                            "rebuild the store, or use a new output directory") from None
    if not isinstance(m, dict):
        raise ManifestError(f"{path}: manifest is not a JSON object; delete it to let prep "
                            "rebuild the store, or use a new output directory")
    check_format(m, path)
    if m.get("source", {}).get("fingerprint") != fp:
        raise ManifestError(f"{path}: this store was packed from other source CSVs "
                            f"({m.get('source', {}).get('data_dir')}); use a new output "
                            "directory or delete this one")
    if m.get("prep") != params:
        raise ManifestError(f"{path}: this store was packed with {m.get('prep')}, not "
                            f"{params}; use a new output directory or delete this one")
    try:
        problems = check_structure(out_dir, m)
    except (KeyError, TypeError) as e:
        raise ManifestError(f"{path}: manifest lacks or garbles {e}; delete it to let prep "
                            "rebuild the store, or use a new output directory") from None
    shards_dir = os.path.join(out_dir, SHARDS_DIR)
    for s in m["shards"]:  # same size, other bytes: only the sha256 tells
        tar = os.path.join(shards_dir, s["name"])
        if _size(tar) == s["bytes"] and sha256_file(tar) != s["sha256"]:
            problems.append(f"{tar}: sha256 differs from the manifest")
    if not problems:
        return m, None
    return m, problems


def _forget_damaged(out_dir, m, problems, plan):
    """Stop claiming completeness, and drop the records of the shards that are
    damaged (or whose sites' chunks are), so the run below repacks exactly those."""
    print(f"{out_dir}: the store is damaged, repairing: {problems[0]}"
          + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    os.remove(os.path.join(out_dir, MANIFEST_NAME))
    shards_dir = os.path.join(out_dir, SHARDS_DIR)
    bad = {s["name"][: -len(".tar")] for s in m["shards"]
           if any(p.startswith(os.path.join(shards_dir, s["name"]) + ":")
                  or p.startswith(os.path.join(shards_dir, s["index"]) + ":") for p in problems)}
    lost = set(missing_chunk_rows(out_dir, m["n_sites"]))
    bad |= {s["name"] for s in plan if lost.intersection(s["rows"])}
    for name in bad:
        for path in shard_files(out_dir, name):
            if os.path.lexists(path):
                os.remove(path)


def _check_files_exist(data_dir, sites, layout):
    """Every channel file of every site, checked from one listing per plate folder,
    so a missing file is reported before anything is written."""
    for (split, exp, plate), part in sites.groupby(["split", "experiment", "plate"]):
        first = site_paths(data_dir, part.iloc[0], layout)[0]
        folder = os.path.dirname(first)
        try:
            present = set(os.listdir(folder))
        except FileNotFoundError:
            raise PngError(f"{first}: channel file is missing (no folder {folder})") from None
        for well, site in zip(part["well"], part["site"]):
            for c in CHANNELS:
                name = f"{well}_s{site}_w{c}.png"
                if name not in present:
                    raise PngError(f"{os.path.join(folder, name)}: channel file is missing")


def _check_out_dir(out_dir, run):
    """Refuse an OUT that holds something else, before anything is written to it."""
    store = os.path.join(out_dir, STORE_NAME)
    zarr_json = os.path.join(store, "zarr.json")
    if os.path.isfile(zarr_json):
        try:
            with open(zarr_json) as f:
                attrs = json.load(f).get("attributes", {})
        except (OSError, ValueError, AttributeError) as e:
            raise ManifestError(f"{zarr_json}: unreadable ({e}); delete {out_dir} or use a "
                                "new output directory") from None
        if attrs:  # empty only if a run died right after creating the group
            check_format(attrs, store)
    run_path = os.path.join(out_dir, WORK_DIR, "run.json")
    if os.path.isfile(run_path):
        try:
            with open(run_path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None  # prep's own bookkeeping, written atomically: unreadable means foreign
        if old != run:
            raise ManifestError(f"{out_dir} holds an unfinished store of other source data "
                                f"or image shape ({run_path}); use a new output directory "
                                "or delete this one")


def _prepare_out_dir(out_dir, run):
    """Create or reopen OUT for this run (checked by _check_out_dir, lock held)."""
    work = os.path.join(out_dir, WORK_DIR)
    store = os.path.join(out_dir, STORE_NAME)
    for d in (out_dir, work, os.path.join(out_dir, SHARDS_DIR)):
        os.makedirs(d, exist_ok=True)
    remove_stale_temps(out_dir)

    group = zarr.open_group(store, mode="a", zarr_format=3)
    group.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION})
    n, shape = run["n_sites"], tuple(run["image_shape"])
    if PIXELS_ARRAY in group:
        px = group[PIXELS_ARRAY]
        if px.shape != (n, *shape) or px.dtype != np.uint8:
            raise ManifestError(f"{store}/pixels is {px.shape} {px.dtype}, expected "
                                f"{(n, *shape)} uint8; delete {out_dir} or use a new one")
    else:
        # One flat folder of chunk files ('c.<row>.0.0.0'), not a directory per site.
        # Only the array's metadata is written: chunk files already there stay.
        group.create_array(PIXELS_ARRAY, shape=(n, *shape), chunks=(1, *shape), dtype="uint8",
                           compressors=ZstdCodec(level=run["zstd_level"]), fill_value=0,
                           chunk_key_encoding={"name": "default",
                                               "separator": PIXELS_CHUNK_SEPARATOR})
    write_bytes(os.path.join(work, "run.json"), json.dumps(run))


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


# ---------------------------------------------------------------- the workers

def _run_workers(tasks, workers, total, initial):
    if not tasks:
        return
    workers = max(1, min(int(workers or os.cpu_count() or 1), len(tasks)))
    kill_after = int(os.environ.get(KILL_AFTER_ENV, 0))
    # spawn, not fork: zarr runs an asyncio loop thread that a fork would copy half-alive.
    ctx = multiprocessing.get_context("spawn")
    bar = tqdm(total=total, initial=initial, unit="site", desc="prep shards", smoothing=0.1)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker)
    try:
        futures = [pool.submit(write_shard, t) for t in tasks]
        for finished, fut in enumerate(as_completed(futures), 1):
            bar.update(fut.result())
            if kill_after and finished >= kill_after:
                os.killpg(os.getpgrp(), signal.SIGKILL)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        remove_stale_temps(tasks[0]["out_dir"])
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)


# ---------------------------------------------------------------- after every shard

def _finish(data_dir, layout, out_dir, sites, plan, run, files, params):
    n = len(sites)
    stats = np.zeros((n, N_CHANNELS, 5), np.float64)
    entries = []
    for shard in plan:
        rec = read_record(out_dir, shard, run)
        if rec is None:  # a worker returned, so its record must be there
            raise RuntimeError(f"shard {shard['name']}: record missing after packing")
        stats[rec["rows"]] = rec["stats"]
        entries.append({"name": shard["name"] + ".tar", "index": shard["name"] + ".idx",
                        "split": shard["split"], "count": rec["count"],
                        "bytes": rec["bytes"], "sha256": rec["sha256"]})

    group = zarr.open_group(os.path.join(out_dir, STORE_NAME), mode="a")
    plate = sites["experiment"] + "_" + sites["plate"].astype(str)
    for name, data in ((STATS_ARRAY, stats.astype(np.float32)),
                       (norm_array("site"), site_norm(stats)),
                       (norm_array("plate"), pooled_norm(stats, plate)),
                       (norm_array("experiment"), pooled_norm(stats, sites["experiment"]))):
        group.create_array(name, data=data, chunks=(min(n, 1 << 16), *data.shape[1:]),
                           compressors=ZstdCodec(level=3), overwrite=True)

    check = None
    ref_path = os.path.join(data_dir, "pixel_stats.csv")
    if os.path.isfile(ref_path):
        check = compare_reference(stats, sites, ref_path)
        if check.get("largest"):
            w = check["largest"]
            print(f"pixel_stats.csv vs computed: largest difference {w['diff']:.4g} "
                  f"({w['stat']} of {w['id_code']} s{w['site']} w{w['channel']}: "
                  f"ours {w['ours']:.6g}, reference {w['reference']:.6g}); per statistic "
                  + ", ".join(f"{k} {v:.3g}" for k, v in check["max_abs_diff"].items()))
    else:
        print("no pixel_stats.csv in the data directory: statistics computed from the pixels")

    sites_path = os.path.join(out_dir, SITES_NAME)
    write_bytes(sites_path, sites.to_csv(index=False))
    _remove_unplanned_shards(out_dir, plan)
    remove_stale_temps(out_dir)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "image_shape": run["image_shape"], "dtype": "uint8", "layout": "HWC",
        "channel_order": list(CHANNELS), "codec": {"store": "zstd", "shards": "raw"},
        "n_sites": n,
        "sites_table": {"path": SITES_NAME, "sha256": sha256_file(sites_path)},
        "source": {"fingerprint": run["fingerprint"], "files": files, "layout": layout,
                   "data_dir": data_dir},
        "shards": entries,
        "pixel_stats_check": check,
        "prep": params,
    }
    write_manifest(out_dir, manifest)
    return manifest


def _remove_unplanned_shards(out_dir, plan):
    """Shards of an earlier, interrupted plan (other size or seed) that this one replaced."""
    keep = {s["name"] for s in plan}
    pattern = re.compile(r"^(train|test)-\d{5}\.(tar|idx|json)$")
    for d in (os.path.join(out_dir, SHARDS_DIR), os.path.join(out_dir, WORK_DIR)):
        for name in os.listdir(d):
            if pattern.match(name) and name.rsplit(".", 1)[0] not in keep:
                os.remove(os.path.join(d, name))
