"""The DALI backend: tar shards -> uint8 CHW sites, augmented as planned, on CPU or GPU.

Subset without copying pixels: each epoch writes, per shard it touches, a
filtered copy of the shard's DALI index listing only this rank's samples of
this epoch, in reading order (the reader follows the index lines, so the copy
both selects and shuffles; the site draw of `sites="random"` is part of it).
The reader is endless, so one pipeline serves one epoch: it is built on that
epoch's index files and run for exactly the epoch's batches, the last one
trimmed of the repeats `pad_last_batch` adds.

Where each step runs, and why:
- read, reshape, shear (`fn.warp_affine`), h/v flips and the HWC -> CHW
  transpose (with H and W swapped for the transposing half of the dihedral
  group): in the pipeline; on the GPU when a `cuda` device is asked for
  (everything after the reader), else on the CPU (`device_id=None`).  Output:
  uint8 (6, H, W).  The per-sample choices come from the epoch's plan
  (`shards.augment.draw_plan`) through an external source, not from DALI's
  random operators, so the torch backend can apply the very same ones.
- channel subset, uint8 -> float32, channel dropout, resize, `(x - mean) /
  std` with the row's statistics: in torch on the delivery device
  (`shards.loader.deliver`), the same code for both backends.  DALI cannot
  index the store's per-row (n_sites, 6, 2) table by a reader output without
  a python operator; torch gathers it by the `row` output in one indexing op.
  On a GPU the rest is a few elementwise kernels over device memory, the
  cost `crop_mirror_normalize` would have.  On a CPU it is the cheaper place
  too (2 cores, 512 px, measured on a loaded machine, so roughly): the
  channel subset is free while converting to float32, where `fn.cat` of
  channel slices in the pipeline cost ~15% (784 -> 670 samples/s), and
  emitting HWC to let torch transpose while converting was slower end to end.
Outputs reach torch through DLPack with the dynamic executor, which keeps a
batch alive while torch holds it: on a GPU bound to torch's current stream
(no host copy, no device copy), on a CPU without any copy.  `pad_output` is
never set (it would pad six channels to eight).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from shards.augment import shear_matrix
from shards.dali_index import READ_MEMBERS, join_index

READER = "reader"


def write_filtered_index(run_dir: str, tag: str, rows: np.ndarray, where: dict,
                         shard_paths: list[str]) -> tuple[list[str], list[str]]:
    """Index files listing `rows` in order, one per run of consecutive rows of one shard.

    Returns the (tar, index) path lists for `fn.readers.webdataset`.  Rows are
    grouped by shard by `selection.epoch_order`, so a shard appears once.
    """
    shard = where["shard"][rows]
    starts = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]])
    ends = np.r_[starts[1:], len(rows)]
    tars, indexes = [], []
    for k, (a, b) in enumerate(zip(starts, ends)):
        s = int(shard[a])
        lines = where["lines"][s]
        path = os.path.join(run_dir, f"{tag}-{k:05d}.idx")
        with open(path, "w") as f:
            f.write(join_index([lines[p] for p in where["position"][rows[a:b]]]))
        tars.append(shard_paths[s])
        indexes.append(path)
    return tars, indexes


@pipeline_def(enable_conditionals=True)
def site_pipeline(tars, indexes, image_shape, on_gpu, plan_source, shear):
    """One uint8 (6, H, W) image and its sites-table row per sample.

    `plan_source`: None (no augmentation), or the per-batch source of the epoch's
    augmentation plan (`_PlanSource`); `shear`: whether the plan shears at all."""
    # dont_use_mmap: a pipeline lives one epoch, and re-mapping 0.75 GB shards each
    # epoch page-faults every 4 KiB; plain reads were faster here and halve the RSS.
    pixels, rows = fn.readers.webdataset(
        paths=tars, index_paths=indexes, ext=list(READ_MEMBERS),
        dtypes=[types.UINT8, types.INT64], pad_last_batch=True, dont_use_mmap=True,
        name=READER)
    image = fn.reshape(pixels, shape=list(image_shape), layout="HWC")
    if on_gpu:
        image = image.gpu()
    if plan_source is None:
        return fn.transpose(image, perm=[2, 0, 1], output_layout="CHW"), rows
    # The plan's draws, not DALI's random operators: the torch backend applies the same.
    plan = fn.external_source(source=plan_source, num_outputs=5 if shear else 3, batch=True,
                              batch_info=True)
    hflip, vflip, transpose = plan[:3]
    if shear:
        sheared, matrix = plan[3:]
        if sheared:  # bilinear; no fill_value: the border pixel is repeated
            image = fn.warp_affine(image, matrix=matrix, interp_type=types.INTERP_LINEAR)
    image = fn.flip(image, horizontal=hflip, vertical=vflip)
    if transpose:  # the other half of the dihedral group: swap H and W
        image = fn.transpose(image, perm=[2, 1, 0], output_layout="CHW")
    else:
        image = fn.transpose(image, perm=[2, 0, 1], output_layout="CHW")
    return image, rows


class _PlanSource:
    """Per reader batch k, the plan of its samples (padded to the batch size like the
    reader pads its last batch): hflip, vflip (int32), transpose (bool), and with
    `shear` whether to shear (bool) and the (2, 3) shear matrices.  DALI asks by
    iteration, possibly ahead of the batches run."""

    def __init__(self, plan, pieces, batch_size, image_shape, shear):
        self.plan, self.batch_size, self.hw, self.shear = plan, batch_size, image_shape[:2], shear
        self.starts = np.cumsum([0] + [sum(p) for p in pieces])

    def __call__(self, info):
        k = info.iteration
        a, b = (self.starts[k], self.starts[k + 1]) if k + 1 < len(self.starts) else (0, 0)
        take = np.r_[np.arange(a, b), np.full(self.batch_size - (b - a), max(b - 1, 0))]
        take = take.astype(np.int64)
        flips = self.plan["flips"][take]
        out = (np.ascontiguousarray(flips[:, 0]), np.ascontiguousarray(flips[:, 1]),
               flips[:, 2].astype(bool))
        if not self.shear:
            return out
        angles = self.plan["shear"][take]
        matrix = np.stack([shear_matrix(float(t), *self.hw) for t in angles])
        return (*out, angles != 0, matrix)


def dali_batches(tars, indexes, pieces, image_shape, plan, device, num_threads, seed):
    """Yield (uint8 (b, 6, H, W) tensor on `device`, int64 (b,) rows) for one epoch.

    `pieces` holds per reader batch the sizes of the batches cut from it
    (`selection.rank_batches`); padded repeats beyond them are dropped.  `plan`:
    the epoch's augmentation plan (`augment.draw_plan`, one entry per sample in
    reading order), or None.
    """
    on_gpu = device.type == "cuda"
    batch_size = max(sum(p) for p in pieces)
    shear = plan is not None and bool((plan["shear"] != 0).any())
    source = None if plan is None else _PlanSource(plan, pieces, batch_size, image_shape,
                                                   shear)
    pipe = site_pipeline(tars, indexes, tuple(image_shape), on_gpu, source, shear,
                         batch_size=batch_size, num_threads=num_threads,
                         device_id=device.index if on_gpu else None, seed=seed,
                         prefetch_queue_depth=2, exec_dynamic=True)  # outputs outlive the next run
    pipe.build()
    try:
        for sizes in pieces:
            if on_gpu:
                images, rows = pipe.run(torch.cuda.current_stream(device).cuda_stream)
            else:
                images, rows = pipe.run()
            images = torch.from_dlpack(images.as_tensor())
            rows = torch.from_dlpack(rows.as_tensor()).reshape(-1)
            start = 0
            for size in sizes:
                yield images[start:start + size], rows[start:start + size]
                start += size
    finally:
        del pipe
