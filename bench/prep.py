"""`make bench-prep`: how fast prep packs 512 px sites, against the PNG-decode ceiling.

On the synthetic `full` preset (2 experiments, generated once into
bench/out/, reused after), for 1 and 2 experiments:
  * pure decode: the same PNGs, the same decoder (prep.png_io.read_site), the
    same number of worker processes, nothing else done — the ceiling;
  * prep: `python -m prep shards` into a fresh OUT, wall time, peak RSS of
    its process tree (sampled from /proc), bytes on disk vs the source PNGs;
  * CPU cost per site of each worker step, zstd levels 1 and 3 included.
Prints a table and writes bench/results_prep.json.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from numcodecs import Zstd

from bench.proc_tree import tree_rss
from prep.png_io import read_site, site_paths
from shards.atomic import write_bytes


def load_sites(data_dir):
    # Imported here: decode workers import this module and must start as light as prep's.
    from shards.metadata import load_sites as load
    return load(data_dir)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = os.path.join(HERE, "out")
FULL = os.path.join(OUT, "full2")
RESULTS = os.path.join(HERE, "results_prep.json")
CSVS = ("train.csv", "test.csv", "train_controls.csv", "test_controls.csv", "pixel_stats.csv",
        "sample_submission.csv")


def ensure_data(workers):
    """bench/out/full2 (2 experiments at 512 px) and a 1-experiment view of it."""
    if not os.path.isfile(os.path.join(FULL, "synth.json")):
        subprocess.run([sys.executable, "-m", "prep", "synth", "--preset", "full",
                        "--experiments", "2", "--out-dir", FULL, "--workers", str(workers)],
                       cwd=REPO, check=True)
    one = os.path.join(OUT, "full1")
    if not os.path.isfile(os.path.join(one, "train.csv")):
        import pandas as pd
        sites = load_sites(FULL)
        exp = sites["experiment"].iloc[0]
        split = sites["split"].iloc[0]
        os.makedirs(os.path.join(one, split), exist_ok=True)
        os.symlink(os.path.join(FULL, split, exp), os.path.join(one, split, exp))
        for name in CSVS:
            df = pd.read_csv(os.path.join(FULL, name))
            if "experiment" in df.columns:
                df = df[df["experiment"] == exp]
            elif "id_code" in df.columns:
                df = df[df["id_code"].str.startswith(exp + "_")]
            df.to_csv(os.path.join(one, name), index=False)
    return {1: one, 2: FULL}


def _decode_chunk(task):
    data_dir, rows = task
    for r in rows:
        read_site(site_paths(data_dir, r))
    return len(rows)


def _children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def pure_decode(data_dir, workers):
    """Decoding every site's six PNGs, and nothing else, on `workers` processes:
    (wall seconds, CPU seconds of the workers)."""
    rows = load_sites(data_dir).to_dict("records")
    chunks = [(data_dir, rows[i:i + 64]) for i in range(0, len(rows), 64)]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert sum(pool.map(_decode_chunk, chunks)) == len(rows)
    return time.perf_counter() - t0, _children_cpu() - cpu0


def run_prep(data_dir, out_dir, workers):
    """Wall seconds, CPU seconds and peak RSS (tree sum, largest process) of
    `python -m prep shards` into a fresh `out_dir`."""
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "prep", "shards", "--data-dir", data_dir, "--out-dir", out_dir,
           "--workers", str(workers)]
    peak = [0, 0]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def sample():
        while proc.poll() is None:
            total, largest = tree_rss(proc.pid)
            peak[0], peak[1] = max(peak[0], total), max(peak[1], largest)
            time.sleep(0.1)
    t = threading.Thread(target=sample)
    t.start()
    out = proc.communicate()[0].decode()
    seconds, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    t.join()
    if proc.returncode:
        raise SystemExit(f"prep failed ({proc.returncode}):\n{out}")
    return seconds, cpu, peak[0], peak[1]


def du(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def png_bytes(data_dir):
    return sum(os.path.getsize(p) for r in load_sites(data_dir).to_dict("records")
               for p in site_paths(data_dir, r))


def stage_costs(data_dir, n=32):
    """CPU ms per site of each step of a prep worker, in this one process, and
    the compression ratio of zstd levels 1 (prep's) and 3."""
    import hashlib
    from prep.site_stats import channel_stats
    rows = load_sites(data_dir).to_dict("records")[:n]
    cost = dict.fromkeys(("decode", "stats", "interleave", "zstd1", "zstd3", "sha256"), 0.0)
    z1, z3 = Zstd(level=1), Zstd(level=3)
    raw = packed1 = packed3 = 0
    for r in rows:
        t = [time.process_time()]
        channels = read_site(site_paths(data_dir, r))
        t.append(time.process_time())
        [channel_stats(c) for c in channels]
        t.append(time.process_time())
        pixels = np.stack(channels, -1)
        t.append(time.process_time())
        packed1 += len(z1.encode(pixels))
        t.append(time.process_time())
        packed3 += len(z3.encode(pixels))
        t.append(time.process_time())
        hashlib.sha256(pixels).digest()
        t.append(time.process_time())
        raw += pixels.nbytes
        for k, a, b in zip(cost, t, t[1:]):
            cost[k] += 1e3 * (b - a) / n
    return cost, {"zstd1": raw / packed1, "zstd3": raw / packed3}


def main(workers: int | None = None):
    """Time prep against pure PNG decode on 1 and 2 synthetic 512 px experiments (writes bench/results_prep.json).

    Args:
        workers: worker processes for prep and for the decode ceiling (default: all cores).
    """
    from common.precision import cpu_capability
    workers = int(workers or os.cpu_count() or 1)
    data = ensure_data(workers)
    results = {"workers": workers, "image_size": 512, "cpu_capability": cpu_capability(),
               "sizes": {}}
    for n_exp, data_dir in data.items():
        n = len(load_sites(data_dir))
        out_dir = os.path.join(OUT, f"store{n_exp}")
        png = png_bytes(data_dir)
        dec_s, dec_cpu = pure_decode(data_dir, workers)   # also warms the page cache
        prep_s, prep_cpu, rss_sum, rss_max = run_prep(data_dir, out_dir, workers)
        results["sizes"][n_exp] = {
            "experiments": n_exp, "sites": n,
            "prep_sites_per_s": n / prep_s, "decode_sites_per_s": n / dec_s,
            "ratio_to_decode": dec_s / prep_s,
            "prep_cpu_ms_per_site": 1e3 * prep_cpu / n, "decode_cpu_ms_per_site": 1e3 * dec_cpu / n,
            "cpu_ratio": dec_cpu / prep_cpu,
            "png_bytes": png, "zarr_bytes": du(os.path.join(out_dir, "store.zarr")),
            "shard_bytes": du(os.path.join(out_dir, "shards")),
            "peak_rss_tree_mb": rss_sum / 2**20, "peak_rss_process_mb": rss_max / 2**20}
        shutil.rmtree(out_dir)  # gigabytes, and every run packs afresh
    results["stage_cpu_ms_per_site"], results["zstd_ratio"] = stage_costs(data[1])
    results["load_avg_1min"] = os.getloadavg()[0]

    print(f"\nprep benchmark: synthetic 512 px sites, {workers} workers "
          f"(load average now {results['load_avg_1min']:.1f} on {os.cpu_count()} cores, "
          f"CPU {results['cpu_capability']})")
    print(f"{'exps':>4} {'sites':>6} {'prep/s':>7} {'decode/s':>8} {'ratio':>6} "
          f"{'cpu ms/site prep|dec':>20} {'cpu ratio':>9} {'zarr/png':>8} {'tar/png':>7} "
          f"{'RSS tree|proc MB':>16}")
    for r in results["sizes"].values():
        cpu = f"{r['prep_cpu_ms_per_site']:.1f} | {r['decode_cpu_ms_per_site']:.1f}"
        rss = f"{r['peak_rss_tree_mb']:.0f} | {r['peak_rss_process_mb']:.0f}"
        print(f"{r['experiments']:>4} {r['sites']:>6} {r['prep_sites_per_s']:>7.1f} "
              f"{r['decode_sites_per_s']:>8.1f} {r['ratio_to_decode']:>6.2f} {cpu:>20} "
              f"{r['cpu_ratio']:>9.2f} {r['zarr_bytes'] / r['png_bytes']:>8.2f} "
              f"{r['shard_bytes'] / r['png_bytes']:>7.2f} {rss:>16}")
    print("worker steps, CPU ms/site: " + ", ".join(
        f"{k} {v:.2f}" for k, v in results["stage_cpu_ms_per_site"].items())
        + "; compression ratio "
        + ", ".join(f"{k} {v:.2f}" for k, v in results["zstd_ratio"].items())
        + " (prep uses zstd1; file writes are not in this list)")
    from bench.report import machine
    results["machine"] = machine()   # where these figures were measured
    write_bytes(RESULTS, json.dumps(results, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    from common.cli import run_command
    run_command("bench.prep", main)
