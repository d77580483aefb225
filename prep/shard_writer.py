"""The prep worker: write one tar shard, its DALI index, its sites' zarr chunks and its record.

Runs in a spawned process, so it imports only what it uses (no pandas, no
zarr): a worker starts in a fraction of a second.

Order of writes, each under a temporary name then renamed: the zarr chunks,
the index, the tar, last the record (OUT/.prep/<name>.json, with the sites'
statistics). A shard is finished when its record is there and agrees with its
tar; anything less is rewritten by the next run.
"""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numcodecs import Zstd

from prep.png_io import read_site, site_paths
from prep.site_stats import channel_stats
from prep.tar_writer import TarWriter
from shards.dali_index import JSON, PIXELS, ROW, format_index
from shards.layout import N_CHANNELS, STAT_NAMES, sample_key
from shards.atomic import write_atomic, write_bytes
from shards.manifest import SHARDS_DIR, pixels_chunk_path

WORK_DIR = ".prep"  # prep's bookkeeping inside OUT; not part of the store format
# The sites-table columns each sample's .json holds, in this order (docs/format.md).
TAR_JSON_COLUMNS = ("row", "split", "id_code", "experiment", "cell_type", "plate", "well",
                    "site", "sirna", "well_type")


def shard_files(out_dir, name):
    """(tar, DALI index, record) paths of shard `name`."""
    shards = os.path.join(out_dir, SHARDS_DIR)
    return (os.path.join(shards, name + ".tar"), os.path.join(shards, name + ".idx"),
            os.path.join(out_dir, WORK_DIR, name + ".json"))


def read_record(out_dir, shard, run):
    """The record of a finished shard, or None if the shard must be (re)written."""
    tar, idx, rec_path = shard_files(out_dir, shard["name"])
    try:
        with open(rec_path) as f:
            rec = json.load(f)
        tar_bytes = os.path.getsize(tar)
    except (OSError, ValueError):
        return None
    ok = (rec.get("run") == run and rec.get("rows") == shard["rows"]
          and os.path.isfile(idx) and tar_bytes == rec.get("bytes")
          and np.shape(rec.get("stats")) == (len(shard["rows"]), N_CHANNELS, len(STAT_NAMES)))
    return rec if ok else None


def init_worker():
    # A worker whose parent was killed (kill -9) exits instead of lingering.
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def write_shard(task):
    """task: shard {name, split, rows}, sites (sites-table rows as dicts, in shard
    order), data_dir, layout (of data_dir: kaggle or release), out_dir, run
    (image_shape, zstd_level, ...). Returns the site count."""
    shard, run, out_dir = task["shard"], task["run"], task["out_dir"]
    shape = tuple(run["image_shape"])
    tar, idx, rec_path = shard_files(out_dir, shard["name"])
    zstd = Zstd(level=run["zstd_level"])
    stats = []
    written = {}

    def write_tar(tmp):
        writer = TarWriter(tmp)
        # Site i is compressed and written on a thread while site i+1 decodes: PNG
        # decoding, zstd, sha256 and file writes all release the GIL, and a write the
        # kernel throttles no longer stalls decoding. One site in flight bounds memory.
        io = ThreadPoolExecutor(1)
        pending = None
        try:
            for row in task["sites"]:
                channels = read_site(site_paths(task["data_dir"], row, task["layout"]),
                                     shape[:2])
                stats.append([channel_stats(ch) for ch in channels])
                pixels = np.stack(channels, axis=-1)
                if pending is not None:
                    pending.result()
                pending = io.submit(_write_site, out_dir, zstd, writer, row, pixels)
            if pending is not None:
                pending.result()
            written["bytes"], written["sha256"] = writer.close()
        except BaseException:
            io.shutdown(wait=True)  # the file must be closed before write_atomic removes it
            writer.abort()
            raise
        io.shutdown()
        # The index before the tar's rename: a final tar always has its index.
        write_bytes(idx, format_index(writer.index))

    # durable: a finished shard is minutes of decoding that a machine crash must not lose.
    write_atomic(tar, write_tar, durable=True)
    write_bytes(rec_path, json.dumps({
        "name": shard["name"], "split": shard["split"], "rows": shard["rows"],
        "count": len(shard["rows"]), "bytes": written["bytes"], "sha256": written["sha256"],
        "run": run, "stats": stats}))
    return len(shard["rows"])


def _write_site(out_dir, zstd, writer, row, pixels):
    # The chunk bytes zarr's ZstdCodec would write, written directly: going
    # through zarr's API costs 2-4x the compression itself per 512 px site.
    write_bytes(pixels_chunk_path(out_dir, row["row"]), zstd.encode(pixels))
    # Only the label-contract columns: sirna_name is '' from the Kaggle files, and the
    # tars must be the same bytes from either layout (docs/format.md).
    meta = json.dumps({**{k: row[k] for k in TAR_JSON_COLUMNS}, "shape": list(pixels.shape)},
                      separators=(",", ":"))
    writer.add(sample_key(row["id_code"], row["site"]),
               [(PIXELS, pixels), (ROW, np.array(row["row"], "<i8").tobytes()),
                (JSON, meta.encode())])
