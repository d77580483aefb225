"""The torch backend: the same samples as the DALI backend, for machines without DALI.

Reads each site's raw pixels straight from the tar shard at the offset the
shard's DALI index gives (one `pread`, no decompression, the same bytes the
DALI reader reads), applies the epoch plan's shear and dihedral transform
(`shards.augment.shear_hwc`, `dihedral_chw`: the ones the DALI pipeline
applies to the same sample), and batches with a torch DataLoader whose
batches are the ones `selection.rank_batches` planned.  Channel selection,
normalization, channel dropout and resize happen afterwards in
`shards.loader.deliver`, exactly as for DALI.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shards.augment import dihedral_chw, shear_hwc


class _Sites(Dataset):
    """Sample i of the epoch: (uint8 (6, H, W), row)."""

    def __init__(self, rows, shard_paths, where, image_shape, plan):
        self.rows, self.shard_paths, self.image_shape = rows, shard_paths, tuple(image_shape)
        self.shard, self.offset = where["shard"], where["offset"]
        self.plan = plan
        self.files = {}  # per worker process: shard -> open file descriptor

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = int(self.rows[i])
        s = int(self.shard[row])
        fd = self.files.get(s)
        if fd is None:
            fd = self.files[s] = os.open(self.shard_paths[s], os.O_RDONLY)
        n = int(np.prod(self.image_shape))
        buf = os.pread(fd, n, int(self.offset[row]))
        if len(buf) != n:
            raise OSError(f"{self.shard_paths[s]}: row {row} truncated ({len(buf)} of {n} bytes)")
        hwc = np.frombuffer(buf, np.uint8).reshape(self.image_shape)
        if self.plan is None:
            return torch.from_numpy(dihedral_chw(hwc, 0, 0, 0)), row
        if self.plan["shear"][i]:
            hwc = shear_hwc(hwc, float(self.plan["shear"][i]))
        return torch.from_numpy(dihedral_chw(hwc, *self.plan["flips"][i])), row

    def __del__(self):
        for fd in self.files.values():
            os.close(fd)


def torch_batches(rows, shard_paths, where, pieces, image_shape, plan, num_workers,
                  pin_memory=False):
    """Yield (uint8 (b, 6, H, W), int64 (b,) rows) for one epoch, batches as planned;
    `plan`: the epoch's augmentation plan (`augment.draw_plan`) or None."""
    sizes = [s for p in pieces for s in p]
    bounds = np.cumsum([0] + sizes)
    batches = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    data = _Sites(rows, shard_paths, where, image_shape, plan)
    loader = DataLoader(data, batch_sampler=batches, num_workers=num_workers,
                        pin_memory=pin_memory, prefetch_factor=2 if num_workers else None)
    for images, batch_rows in loader:
        yield images, batch_rows.to(torch.int64)
