"""`make bench-loader`: samples/s of the training loader at 512 px, against a
reference-style loader and against reading the shard bytes.

Store: the `full` synthetic preset, 1 experiment (2384 sites at 512 px),
packed once into bench/out/loader_store1 (reused after).  Every loader reads
the train wells in `random` site mode, five channels [1,2,3,5,6], training
augmentation (the reference's: dihedral, channel dropout p=0.5, and in the
loader cases shear ±10° at p=0.5, which the reference-style case leaves out),
batch 32, `workers` threads / processes (default: all cores), delivered as
float32 on the CPU:
  * dali-cpu: `make_loader` with `LoaderSpec(backend="dali")`, a DALI CPU pipeline;
  * torch: the same with `backend="torch"`;
  * reference-style: the reference solution's way, from the source PNG tree:
    one pillow PNG read per selected channel per sample, per-sample
    statistics lookup, the same augmentation in numpy, float32
    normalization, torch DataLoader with the same worker count;
  * raw read: the shard bytes of the same samples read into memory in
    reading order, nothing else — the ceiling;
  * two diagnostics: the DALI pipeline alone (uint8 CHW out, no
    normalization) and the float32 delivery step alone (on a ready batch);
  * dali-gpu, when torch sees a GPU.
Each case runs in its own process (clean peak RSS: of the process, and summed
over it and its DataLoader workers, sampled from /proc); all read from the
page cache (the tars and PNGs are read once before).  Steady state: the first
`warmup` batches (pipeline build, worker start) are timed apart.
Prints a table and writes bench/results_loader.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np
import torch

from bench.full_store import DATA, HERE, REPO, STORE, ensure_store
from bench.proc_tree import tree_rss
from shards.atomic import write_bytes

RESULTS = os.path.join(HERE, "results_loader.json")
CHANNELS = (1, 2, 3, 5, 6)
BATCH = 32
DROPOUT = 0.5  # the reference's ChannelDropout p
SHEAR_DEG, SHEAR_P = 10.0, 0.5  # the reference's IAAAffine(shear=10), p=0.5 (loader cases only)
CASES = ("raw-read", "dali-cpu", "torch", "reference-style", "dali-pipeline-uint8",
         "delivery-float32", "dali-gpu")


def warm_page_cache(paths):
    buf = bytearray(1 << 24)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# ------------------------------------------------------------------ the reference-style loader

class ReferenceStyle(torch.utils.data.Dataset):
    """One sample = one well, a random site; the way the reference's dataset loads."""

    def __init__(self, data_dir, wells, stats, channels, seed=0):
        self.data_dir, self.wells, self.stats, self.channels = data_dir, wells, stats, channels
        self.seed = seed

    def __len__(self):
        return len(self.wells)

    def __getitem__(self, i):
        from PIL import Image

        from shards.layout import png_path
        w = self.wells[i]
        rng = np.random.default_rng([self.seed, i])
        site = int(rng.integers(1, 3))
        image = np.stack([np.asarray(Image.open(png_path(self.data_dir, "train", w["experiment"],
                                                         w["plate"], w["well"], site, c)))
                          for c in self.channels], -1)
        mean_std = np.array([self.stats[(w["id_code"], site, c)] for c in self.channels],
                            np.float32)
        image = (image.astype(np.float32) - mean_std[:, 0]) / mean_std[:, 1]
        h, v, t = rng.integers(0, 2, 3)
        if h:
            image = image[:, ::-1]
        if v:
            image = image[::-1]
        if t:
            image = image.transpose(1, 0, 2)
        image = np.ascontiguousarray(image.transpose(2, 0, 1))
        if rng.random() < DROPOUT:
            image[rng.integers(len(self.channels))] = 0
        return torch.from_numpy(image), int(w["sirna"])


def reference_loader(workers):
    import pandas as pd
    wells = pd.read_csv(os.path.join(DATA, "train.csv"))
    wells = pd.concat([wells, pd.read_csv(os.path.join(DATA, "train_controls.csv"))])
    px = pd.read_csv(os.path.join(DATA, "pixel_stats.csv"))
    stats = {(i, s, c): (m, sd) for i, s, c, m, sd in
             zip(px.id_code, px.site, px.channel, px["mean"], px["std"])}
    data = ReferenceStyle(DATA, wells.to_dict("records"), stats, CHANNELS)
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=workers,
                                       drop_last=False)


# ------------------------------------------------------------------ cases, one process each

def make(case, workers):
    from shards import LoaderSpec, make_loader
    spec = LoaderSpec(channels=CHANNELS, sites="random", batch_size=BATCH, augment=True,
                      channel_dropout=DROPOUT, shear_deg=SHEAR_DEG, shear_p=SHEAR_P,
                      num_workers=workers, seed=0, backend="dali")
    if case == "dali-cpu":
        return make_loader(STORE, "train", spec)
    if case == "dali-gpu":
        return make_loader(STORE, "train", dataclasses.replace(spec, device="cuda:0"))
    if case == "torch":
        return make_loader(STORE, "train", dataclasses.replace(spec, backend="torch"))
    if case == "reference-style":
        return reference_loader(workers)
    if case == "dali-pipeline-uint8":
        return DaliPipelineOnly(make_loader(STORE, "train", spec))
    if case == "delivery-float32":
        return DeliveryOnly(make_loader(STORE, "train", spec))
    if case == "raw-read":
        return RawRead(make_loader(STORE, "train", spec))
    raise SystemExit(f"unknown case {case!r}")


class RawRead:
    """The same samples' pixel bytes, in the loader's reading order, read and nothing else."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        rows, pieces = self.loader.plan(0)
        where, paths = self.loader.where, self.loader.shard_paths
        size = int(np.prod(self.loader.image_shape))
        fds = [os.open(p, os.O_RDONLY) for p in paths]
        buf = bytearray(size * BATCH)
        try:
            start = 0
            for n in (s for p in pieces for s in p):
                view = memoryview(buf)
                for k, row in enumerate(rows[start:start + n]):
                    os.preadv(fds[where["shard"][row]], [view[k * size:(k + 1) * size]],
                              int(where["offset"][row]))
                start += n
                yield n
        finally:
            for fd in fds:
                os.close(fd)


class DaliPipelineOnly:
    """The DALI pipeline's uint8 CHW output, without the float32 delivery step."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        from shards.dali_pipeline import dali_batches, write_filtered_index
        L = self.loader
        rows, pieces = L.plan(0)
        tars, idx = write_filtered_index(L.run_dir, "bench", rows, L.where, L.shard_paths)
        for images, _ in dali_batches(tars, idx, pieces, L.image_shape,
                                      L.augment_plan(0, len(rows)), L.device, L.num_workers, 0):
            yield len(images)


class DeliveryOnly:
    """The float32 delivery step (channel subset, normalization, dropout) on one ready batch."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        from shards.loader import deliver
        L = self.loader
        images, rows = next(iter(DaliBatch(L)))
        gen = torch.Generator().manual_seed(0)
        for _ in range(40):
            out = deliver(images, rows, L.delivery, gen)
            yield len(out[0])


class DaliBatch:
    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        from shards.dali_pipeline import dali_batches, write_filtered_index
        L = self.loader
        rows, pieces = L.plan(0)
        tars, idx = write_filtered_index(L.run_dir, "one", rows[:BATCH], L.where, L.shard_paths)
        for images, r in dali_batches(tars, idx, [[BATCH]], L.image_shape,
                                      L.augment_plan(0, BATCH), L.device, 1, 0):
            yield images.clone(), r.clone()


def measure(case, workers, batches, warmup):
    torch.set_num_threads(workers)
    peak = [0.0]
    done = threading.Event()

    def sample():
        while not done.wait(0.25):
            peak[0] = max(peak[0], tree_rss()[0] / 2**20)
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    loader = make(case, workers)
    n = seen = 0
    first = steady_t0 = None
    for i, item in enumerate(loader):
        if isinstance(item, (tuple, list)):
            images = item[0]
            if case == "dali-gpu":
                torch.cuda.synchronize()
            k = len(images)
        else:
            k = item
        if i == 0:
            first = time.perf_counter() - t0
        if i == warmup - 1:
            steady_t0 = time.perf_counter()
        elif i >= warmup:
            n += k
        seen += 1
        if seen >= warmup + batches:
            break
    seconds = time.perf_counter() - steady_t0
    done.set()
    return {"case": case, "samples": n, "seconds": seconds, "samples_per_s": n / seconds,
            "first_batch_s": first,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_tree_mb": peak[0]}


def main(workers: int | None = None, batches=24, warmup=3, case: str | None = None):
    """Samples/s of every loader at 512 px, each case in its own process (writes bench/results_loader.json).

    Args:
        workers: loader threads / processes (default: all cores).
        batches: timed batches per case.
        warmup: untimed batches first (pipeline build, worker start).
        case: measure only this case in this process and print its JSON line
            (how main runs each case): raw-read, dali-cpu, dali-gpu, torch,
            reference-style, dali-pipeline-uint8, delivery-float32.
    """
    from common.errors import BadInput
    from common.precision import cpu_capability
    if case is not None and case not in CASES:
        raise BadInput(f"--case {case!r} unknown; valid: {', '.join(CASES)}")
    if case is not None:
        print(json.dumps(measure(case, int(workers or os.cpu_count() or 1), int(batches),
                                 int(warmup))))
        return
    workers = int(workers or os.cpu_count() or 1)
    ensure_store(workers)
    from shards import open_store
    store = open_store(STORE)
    warm_page_cache(store.shard_paths())
    sites = store.sites
    warm_page_cache([os.path.join(DATA, "train", e, f"Plate{p}", f"{w}_s{s}_w{c}.png")
                     for e, p, w, s in zip(sites.experiment, sites.plate, sites.well, sites.site)
                     for c in CHANNELS])
    cases = [c for c in CASES if c != "dali-gpu" or torch.cuda.is_available()]
    results = {"image_size": 512, "channels": list(CHANNELS), "batch_size": BATCH,
               "workers": workers, "cores": os.cpu_count(), "cpu_capability": cpu_capability(),
               "load_avg_before": os.getloadavg(),
               "store": os.path.relpath(STORE, REPO), "sites": len(sites), "cases": {}}
    for case in cases:
        out = subprocess.run([sys.executable, "-m", "bench.loader", "--case", case,
                              "--workers", str(workers), "--batches", str(batches),
                              "--warmup", str(warmup)],
                             cwd=REPO, check=True, capture_output=True, text=True)
        results["cases"][case] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results["cases"][case]
        print(f"  {case:<20} {r['samples_per_s']:8.1f} samples/s", flush=True)
    c = {k: v["samples_per_s"] for k, v in results["cases"].items()}
    results["ratios"] = {
        "dali_cpu_vs_reference": c["dali-cpu"] / c["reference-style"],
        "torch_vs_reference": c["torch"] / c["reference-style"],
        "dali_cpu_vs_raw_read": c["dali-cpu"] / c["raw-read"],
        "torch_vs_raw_read": c["torch"] / c["raw-read"],
        "goal_dali_cpu_vs_reference": 5.0, "goal_dali_cpu_vs_raw_read": 0.2}
    if "dali-gpu" in c:
        results["ratios"]["dali_gpu_vs_raw_read"] = c["dali-gpu"] / c["raw-read"]
    results["load_avg_after"] = os.getloadavg()

    print(f"\nloader benchmark: 512 px, channels {list(CHANNELS)}, augment, batch {BATCH}, "
          f"{workers} workers, {os.cpu_count()} cores, CPU {results['cpu_capability']}, "
          f"{len(sites)} sites")
    print(f"{'case':<20} {'samples/s':>9} {'first batch s':>13} {'peak RSS MB':>11} "
          f"{'+workers MB':>11}")
    for r in results["cases"].values():
        print(f"{r['case']:<20} {r['samples_per_s']:>9.1f} {r['first_batch_s']:>13.2f} "
              f"{r['peak_rss_mb']:>11.0f} {r['peak_rss_tree_mb']:>11.0f}")
    for k, v in results["ratios"].items():
        if not k.startswith("goal"):
            print(f"{k:<26} {v:6.2f}")
    ratios = results["ratios"]
    verdict = ["met" if ratios[k] >= ratios["goal_" + k] else "MISSED"
               for k in ("dali_cpu_vs_reference", "dali_cpu_vs_raw_read")]
    print(f"goals: dali-cpu >= 5x reference-style ({verdict[0]}), "
          f">= 0.2 of raw read ({verdict[1]})")
    from bench.report import machine
    results["machine"] = machine()   # where these figures were measured
    write_bytes(RESULTS, json.dumps(results, indent=1))
    print(f"wrote {os.path.relpath(RESULTS, REPO)}")


if __name__ == "__main__":
    from common.cli import run_command
    run_command("bench.loader", main)
