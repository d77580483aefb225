"""`python -m prep shards`: pack every site's six PNGs into OUT/store.zarr and OUT/shards/*.tar.

One task per tar shard. A worker decodes its sites' PNGs (checking them),
computes their statistics, writes their zarr chunks and the tar (to
`<name>.tmp-<pid>`, then renamed), and last a record of what it wrote in
OUT/.prep/. A shard whose tar and record are both final is finished: a killed
run started again skips it. Once every shard is finished the parent pools the
plate and experiment norms, writes the stats arrays, sites.csv and, last, the
manifest. Workers hold one site at a time, so memory does not grow with the
dataset.

Files written: see docs/format.md. OUT/.prep/ is prep's own bookkeeping
(one record per shard, with the site statistics) and not part of the format.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import zarr
from tqdm import tqdm
from zarr.codecs import ZstdCodec

from prep.plan import plan_shards
from prep.png_io import PngError, read_site, site_paths
from prep.shard_writer import WORK_DIR, init_worker, read_record, write_shard
from prep.site_stats import compare_reference, pooled_norm, site_norm
from shards.layout import CHANNELS, N_CHANNELS
from shards.manifest import (FORMAT, FORMAT_VERSION, MANIFEST_NAME, SHARDS_DIR, SITES_NAME,
                             STORE_NAME, ManifestError, atomic_write, check_format,
                             fingerprint, sha256_file, source_files, write_manifest)
from shards.metadata import load_sites

# zstd level 1: as small as level 3 on these images and a little cheaper
# (bench/prep.py prints both); PNG decoding dominates either way.
ZSTD_LEVEL = 1
# Test hook: kill this whole process group after N shards finish, as a crash would.
KILL_AFTER_ENV = "CELLSHARD_PREP_KILL_AFTER"


def pack(data_dir, out_dir, workers=None, shard_size_mb=768, seed=0, zstd_level=ZSTD_LEVEL):
    """Pack DATA (Kaggle layout) into OUT; resumable. Returns a short summary
    (the manifest itself is OUT/manifest.json)."""
    t0 = time.time()
    data_dir, out_dir = os.path.abspath(str(data_dir)), os.path.abspath(str(out_dir))
    files = source_files(data_dir)
    fp = fingerprint(files)
    params = {"shard_size_mb": shard_size_mb, "seed": seed, "zstd_level": zstd_level}
    done = _finished_manifest(out_dir, fp, params)
    if done is not None:
        print(f"{out_dir}: store is complete; nothing to do")
        return _summary(out_dir, done, packed=0, seconds=time.time() - t0)

    sites = load_sites(data_dir)
    _check_files_exist(data_dir, sites)
    # Every site must have the first site's shape.
    height, width = read_site(site_paths(data_dir, sites.iloc[0]))[0].shape
    shape = (height, width, N_CHANNELS)
    run = {"format_version": FORMAT_VERSION, "fingerprint": fp, "image_shape": list(shape),
           "n_sites": len(sites), "zstd_level": zstd_level}
    _prepare_out_dir(out_dir, run)

    plan = plan_shards(sites, height, width, shard_size_mb, seed)
    todo = [s for s in plan if read_record(out_dir, s, run) is None]
    rows = sites.to_dict("records")
    tasks = [dict(shard=s, sites=[rows[r] for r in s["rows"]], data_dir=data_dir,
                  out_dir=out_dir, run=run) for s in todo]
    packed = sum(len(s["rows"]) for s in todo)
    _run_workers(tasks, workers, total=len(sites), initial=len(sites) - packed)
    manifest = _finish(data_dir, out_dir, sites, plan, run, files, params)
    return _summary(out_dir, manifest, packed=packed, seconds=time.time() - t0)


def _summary(out_dir, m, packed, seconds):
    return {"out_dir": out_dir, "sites": m["n_sites"], "image_shape": m["image_shape"],
            "shards": len(m["shards"]), "shard_bytes": sum(s["bytes"] for s in m["shards"]),
            "sites_packed_now": packed, "seconds": round(seconds, 2)}


# ---------------------------------------------------------------- before packing

def _finished_manifest(out_dir, fp, params):
    """The manifest if OUT already holds this exact store, complete; else None.

    Refuses (ManifestError) a store of another format version, other source
    data or other prep parameters: those are not ours to overwrite.
    """
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: unreadable manifest ({e}); delete it to let prep "
                            "rebuild the store, or use a new output directory") from None
    check_format(m, path)
    if m.get("source", {}).get("fingerprint") != fp:
        raise ManifestError(f"{path}: this store was packed from other source CSVs "
                            f"({m.get('source', {}).get('data_dir')}); use a new output "
                            "directory or delete this one")
    if m.get("prep") != params:
        raise ManifestError(f"{path}: this store was packed with {m.get('prep')}, not "
                            f"{params}; use a new output directory or delete this one")
    shards_dir = os.path.join(out_dir, SHARDS_DIR)
    intact = all(os.path.isfile(os.path.join(shards_dir, s["index"]))
                 and _size(os.path.join(shards_dir, s["name"])) == s["bytes"]
                 for s in m["shards"])
    if intact and os.path.isfile(os.path.join(out_dir, SITES_NAME)):
        return m
    # A damaged store: stop claiming completeness, then repair like a resumed run.
    print(f"{out_dir}: some shard files are missing or resized; rebuilding those")
    os.remove(path)
    return None


def _check_files_exist(data_dir, sites):
    """Every channel file of every site, checked from one listing per plate folder,
    so a missing file is reported before anything is written."""
    for (split, exp, plate), part in sites.groupby(["split", "experiment", "plate"]):
        first = site_paths(data_dir, part.iloc[0])[0]
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


def _prepare_out_dir(out_dir, run):
    """Create or reopen OUT for this run, refusing one that holds something else."""
    work = os.path.join(out_dir, WORK_DIR)
    store = os.path.join(out_dir, STORE_NAME)
    zarr_json = os.path.join(store, "zarr.json")
    if os.path.isfile(zarr_json):
        with open(zarr_json) as f:
            attrs = json.load(f).get("attributes", {})
        if attrs:  # empty only if a run died right after creating the group
            check_format(attrs, store)
    run_path = os.path.join(work, "run.json")
    if os.path.isfile(run_path):
        with open(run_path) as f:
            old = json.load(f)
        if old != run:
            raise ManifestError(f"{out_dir} holds an unfinished store of other source data "
                                f"or image shape ({run_path}); use a new output directory "
                                "or delete this one")
    for d in (out_dir, work, os.path.join(out_dir, SHARDS_DIR)):
        os.makedirs(d, exist_ok=True)
    _remove_stale_temporaries(out_dir)

    group = zarr.open_group(store, mode="a", zarr_format=3)
    group.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION})
    n, shape = run["n_sites"], tuple(run["image_shape"])
    if "pixels" in group:
        px = group["pixels"]
        if px.shape != (n, *shape) or px.dtype != np.uint8:
            raise ManifestError(f"{store}/pixels is {px.shape} {px.dtype}, expected "
                                f"{(n, *shape)} uint8; delete {out_dir} or use a new one")
    else:
        # One flat folder of chunk files ('c.<row>.0.0.0'), not a directory per site.
        group.create_array("pixels", shape=(n, *shape), chunks=(1, *shape), dtype="uint8",
                           compressors=ZstdCodec(level=run["zstd_level"]), fill_value=0,
                           chunk_key_encoding={"name": "default", "separator": "."})
    atomic_write(run_path, json.dumps(run))


_TMP_RE = re.compile(r"\.tmp-(\d+)$")


def _remove_stale_temporaries(out_dir):
    """Half-written files (`<name>.tmp-<pid>`) of processes that no longer run."""
    for d in (os.path.join(out_dir, SHARDS_DIR), os.path.join(out_dir, WORK_DIR), out_dir,
              os.path.join(out_dir, STORE_NAME, "pixels")):
        for entry in os.scandir(d) if os.path.isdir(d) else ():
            m = _TMP_RE.search(entry.name)
            if m and not _pid_alive(int(m.group(1))):
                os.remove(entry.path)


def _pid_alive(pid):
    try:  # a killed worker stays a zombie until reaped: that is dead too
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
        _remove_stale_temporaries(tasks[0]["out_dir"])
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)


# ---------------------------------------------------------------- after every shard

def _finish(data_dir, out_dir, sites, plan, run, files, params):
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
    for name, data in (("stats", stats.astype(np.float32)),
                       ("norm_site", site_norm(stats)),
                       ("norm_plate", pooled_norm(stats, plate)),
                       ("norm_experiment", pooled_norm(stats, sites["experiment"]))):
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
    atomic_write(sites_path, sites.to_csv(index=False))
    _remove_unplanned_shards(out_dir, plan)
    _remove_stale_temporaries(out_dir)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "image_shape": run["image_shape"], "dtype": "uint8", "layout": "HWC",
        "channel_order": list(CHANNELS), "codec": {"store": "zstd", "shards": "raw"},
        "n_sites": n,
        "sites_table": {"path": SITES_NAME, "sha256": sha256_file(sites_path)},
        "source": {"fingerprint": run["fingerprint"], "files": files, "data_dir": data_dir},
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
