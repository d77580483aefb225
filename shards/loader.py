"""`make_loader`: batches of normalized, augmented sites of a selection, from a store.

    spec = LoaderSpec(channels=(1, 2, 3, 5, 6), augment=True, channel_dropout=0.5,
                      device="cuda:0")
    loader = make_loader("out/tiny", "csv/train_0.csv", spec)
    for epoch in range(n):
        loader.set_epoch(epoch)
        for images, labels, rows in loader:   # float32 (B, C, S, S), int64 (B,), int64 (B,)
            ...

Images and labels are on `spec.device`; rows (of `loader.sites`) stay on the
CPU, where callers use them for bookkeeping.

One epoch, per rank (both backends):
1. `selection.epoch_rows`: the wells' rows for the site mode (random: a site
   per well drawn from seed and epoch).
2. `selection.epoch_order`: shuffled (or storage) order, grouped by shard.
3. `selection.rank_batches`: this rank's disjoint part and its batches, the
   same number on every rank.
4. with augment, `augment.draw_plan`: each sample's shear and dihedral
   transform, drawn from (seed, epoch, rank), applied alike by both backends.
5. a backend yields uint8 (b, 6, H, W) with the plan applied:
   `dali_pipeline.dali_batches` (filtered DALI indexes, GPU or CPU pipeline)
   or `torch_loader.torch_batches` (pread from the same shards, DataLoader).
6. `deliver`, on the delivery device: channel subset while converting to
   float32, channel dropout and the zoom crop (in pixel space), resize,
   `(x - mean) / std` with the row's statistics (or, with norm `sample`, the
   delivered image's own).  Why normalization runs here and not in DALI:
   see `shards.dali_pipeline`.

Resize (image_size other than the native size) is antialiased bilinear in
torch (`F.interpolate`) for both backends, so they agree to float rounding;
it runs before normalization, which commutes with it (a per-channel affine
map) and then touches fewer pixels when shrinking.  image_size=None, or the
native size, does no resize at all: the output is exact.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from shards.augment import draw_plan
from shards.layout import SAMPLE_NORM
from shards.loader_spec import LoaderError, LoaderSpec
from shards.selection import (epoch_order, epoch_rows, locate_rows, rank_batches,
                              resolve_selection, shard_damage, well_sites)
from shards.store import StoreError, open_store


def make_loader(store_dir, selection, spec: LoaderSpec) -> "Loader":
    """A loader over the wells of `selection` in the store at `store_dir`, read as `spec` says.

    The store is opened and the selection resolved before this returns: bad
    input raises here (LoaderError, StoreError, MetadataError), naming what is wrong.
    """
    if not isinstance(spec, LoaderSpec):
        raise TypeError(f"spec must be a LoaderSpec, not {type(spec).__name__}")
    device = _pick_device(spec.device)
    spec = dataclasses.replace(  # what depended on the machine, now decided
        spec, backend=_pick_backend(spec.backend), device=str(device),
        num_workers=min(4, os.cpu_count() or 1) if spec.num_workers is None
        else spec.num_workers)

    store = open_store(store_dir)
    wells = resolve_selection(store.sites, selection, spec.label_column)
    table = well_sites(store.sites, wells)
    where = locate_rows(store.sites, store.shard_paths(), store.index_paths())
    held = table[table >= 0]
    lost = held[where["shard"][held] < 0]
    if len(lost):
        r = store.sites.iloc[int(lost[0])]
        raise StoreError(f"id_code {r['id_code']!r} site {r['site']} (row {r['row']}) is in the "
                         f"sites table but in no shard of {store_dir}; re-run prep")
    nbytes = int(np.prod(store.image_shape))
    wrong = held[where["size"][held] != nbytes]
    if len(wrong):
        r = store.sites.iloc[int(wrong[0])]
        raise StoreError(f"id_code {r['id_code']!r} site {r['site']} (row {r['row']}): its shard "
                         f"holds {where['size'][wrong[0]]} pixel bytes, the manifest's image "
                         f"shape {list(store.image_shape)} needs {nbytes}")
    return Loader(store, wells, table, where, spec)


@dataclasses.dataclass(frozen=True)
class Delivery:
    """What `deliver` needs beside a batch: the rows' statistics and labels, and the spec's
    delivery settings.  `mean`, `std`: (n_sites, C) float32 on `device`, or None for the
    `sample` normalization (each image's own); `labels`: (n_sites,) int64 on the CPU;
    `channel_dropout`, `zoom_p`: 0 unless augmenting."""
    mean: torch.Tensor | None
    std: torch.Tensor | None
    labels: torch.Tensor
    channels: tuple[int, ...]
    image_size: int | None
    channel_dropout: float
    device: torch.device
    zoom_p: float = 0.0
    zoom_min_side: float = 1.0


class Loader:
    """Iterable over one epoch of batches; `set_epoch` picks the epoch (default 0)."""

    def __init__(self, store, wells, table, where, spec: LoaderSpec):
        self.store, self.wells, self.table, self.where, self.spec = store, wells, table, where, spec
        self.device = torch.device(spec.device)
        self.backend, self.num_workers = spec.backend, spec.num_workers
        self.epoch = 0
        self.sites = store.sites
        self.image_shape = tuple(store.image_shape)

        stats = None if spec.norm == SAMPLE_NORM else torch.from_numpy(
            store.norm(spec.norm)[:, [c - 1 for c in spec.channels]])
        labels = np.full(len(store.sites), -1, np.int64)
        for k in range(table.shape[1]):
            held = table[:, k] >= 0
            labels[table[held, k]] = wells["label"].to_numpy()[held]
        self.delivery = Delivery(
            mean=None if stats is None else stats[..., 0].contiguous().to(self.device),
            std=None if stats is None else stats[..., 1].contiguous().to(self.device),
            labels=torch.from_numpy(labels), channels=spec.channels,
            image_size=spec.image_size,
            channel_dropout=spec.channel_dropout if spec.augment else 0.0, device=self.device,
            zoom_p=spec.zoom_p if spec.augment else 0.0, zoom_min_side=spec.zoom_min_side)
        self.shard_paths = store.shard_paths()
        self.run_dir, self._iterations = None, 0
        if self.backend == "dali":
            self.run_dir = tempfile.mkdtemp(prefix="cellshard-loader-")
            weakref.finalize(self, shutil.rmtree, self.run_dir, ignore_errors=True)
        self._n_batches = sum(len(p) for p in self.plan(0)[1])  # the same every epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._n_batches

    def plan(self, epoch: int):
        """(rows, pieces) this rank reads in `epoch`, in order (see selection.rank_batches)."""
        s = self.spec
        rows = epoch_rows(self.table, self.wells, s.sites, s.site, s.seed, epoch)
        order = epoch_order(rows, self.where["shard"], self.where["position"], s.shuffle,
                            s.seed, epoch)
        return rank_batches(order, s.rank, s.world_size, s.batch_size, s.drop_last)

    def augment_plan(self, epoch: int, n: int) -> dict | None:
        """The shear and dihedral transform of each of the `n` samples this rank reads in
        `epoch`, in reading order (`augment.draw_plan`); None without augmentation."""
        s = self.spec
        return (draw_plan(n, s.seed, epoch, s.rank, s.shear_deg, s.shear_p) if s.augment
                else None)

    def __iter__(self):
        epoch, s = self.epoch, self.spec
        rows, pieces = self.plan(epoch)
        seed = int(np.random.SeedSequence([s.seed, epoch, s.rank]).generate_state(1)[0])
        gen = torch.Generator().manual_seed(seed)
        plan = self.augment_plan(epoch, len(rows))
        if self.backend == "dali":
            from shards.dali_pipeline import dali_batches, write_filtered_index
            self._iterations += 1  # two live iterators must not share index files
            tag = f"e{epoch}-r{s.rank}-i{self._iterations}"
            tars, indexes = write_filtered_index(self.run_dir, tag, rows, self.where,
                                                 self.shard_paths)
            batches = dali_batches(tars, indexes, pieces, self.image_shape, plan,
                                   self.device, self.num_workers, seed & 0x7FFFFFFF)
        else:
            from shards.torch_loader import torch_batches
            batches = torch_batches(rows, self.shard_paths, self.where, pieces, self.image_shape,
                                    plan, self.num_workers,
                                    pin_memory=self.device.type == "cuda")
        try:
            for images, batch_rows in batches:
                yield deliver(images, batch_rows, self.delivery, gen)
        except (OSError, RuntimeError):
            # A shard cut or removed after the store was opened fails inside DALI (a
            # RuntimeError) or a DataLoader worker (an OSError), naming neither the
            # shard nor the sample in words a user can act on: find them.
            damage = shard_damage(rows, self.where, self.shard_paths)
            if damage is None:
                raise
            raise StoreError(damage) from None
        finally:
            batches.close()
            if self.backend == "dali":  # this epoch's filtered indexes are spent
                for path in indexes:
                    os.remove(path)


def deliver(images, rows, d: Delivery, gen):
    """uint8 (b, 6, H, W) -> float32 (b, C, S, S) normalized on `d.device`, labels, rows.

    The channel subset is copied while converting to float32 into a fresh
    output; channel dropout sets one channel of a sample to 0 in pixel space
    (the reference's ChannelDropout: after normalization it reads -mean/std);
    the zoom crops a square and resizes it back by nearest neighbour, also in
    pixel space (the 1st place's order); then the batch is resized if asked and
    normalized in place, `(x - mean) / std` with the rows' statistics, or with
    each image's own (norm `sample`, taken after the crop).  Dropout and zoom
    draw from `gen` per batch, so both backends augment the same samples alike.
    """
    device = d.device
    images = images.to(device, non_blocking=True)
    rows = rows.to(torch.int64).cpu()
    b, _, h, w = images.shape
    size = (h, w) if d.image_size is None else (d.image_size, d.image_size)
    drop = torch.full((b,), -1, dtype=torch.int64)
    if d.channel_dropout > 0:
        hit = torch.rand(b, generator=gen) < d.channel_dropout
        which = torch.randint(len(d.channels), (b,), generator=gen)
        drop = torch.where(hit, which, drop)
    boxes = zoom_boxes(b, h, w, d.zoom_p, d.zoom_min_side, gen) if d.zoom_p > 0 else None
    if d.mean is None:
        mean = std = None
    elif device.type == "cpu":
        mean, std = d.mean[rows], d.std[rows]
    else:
        dev_rows = rows.to(device, non_blocking=True)
        mean, std = d.mean[dev_rows], d.std[dev_rows]
    fn = _deliver_cpu if device.type == "cpu" else deliver_batched
    out = fn(images, mean, std, d.channels, size, drop, boxes)
    return out, d.labels[rows].to(device, non_blocking=True), rows


def zoom_boxes(b: int, h: int, w: int, p: float, min_side: float,
               gen: torch.Generator) -> list[tuple[int, int, int] | None]:
    """Per sample, None (not zoomed) or the crop (top, left, side): side uniform in
    round(min_side * min(h, w))..min(h, w) pixels, the place uniform (dataset.py of the
    1st place: randint(round(512 * scale_aug), 512), then randint(0, 512 - size))."""
    full = min(h, w)
    low = max(1, round(min_side * full))
    hit = (torch.rand(b, generator=gen) < p).tolist()
    u = torch.rand(b, 3, generator=gen).tolist()
    out = []
    for k in range(b):
        if not hit[k]:
            out.append(None)
            continue
        side = low + min(int(u[k][0] * (full - low + 1)), full - low)
        top = min(int(u[k][1] * (h - side + 1)), h - side)
        left = min(int(u[k][2] * (w - side + 1)), w - side)
        out.append((top, left, side))
    return out


def _zoom(x, box):
    """x (n, C, H, W) float: the crop `box` resized back to H x W by nearest neighbour."""
    top, left, side = box
    crop = x[..., top:top + side, left:left + side]
    return F.interpolate(crop, size=tuple(x.shape[-2:]), mode="nearest")


def _normalize_(x, mean, std):
    """In place (x - mean) / std per image and channel; None: each image's own statistics
    (std with Bessel's correction + 1e-8, as torch's `image.std` in the 1st place)."""
    if mean is None:
        mean = x.mean(dim=(-2, -1))
        std = x.std(dim=(-2, -1)) + 1e-8
    return x.sub_(mean[..., None, None]).div_(std[..., None, None])


def deliver_batched(images, mean, std, channels, size, drop, boxes=None):
    """`deliver`'s float32 step as whole-batch ops, for any device (the GPU path; the
    tests run it on CPU tensors against `_deliver_cpu`)."""
    b, _, h, w = images.shape
    out = torch.empty((b, len(channels), h, w), dtype=torch.float32, device=images.device)
    for i, c in enumerate(channels):
        out[:, i].copy_(images[:, c - 1])
    for i in torch.nonzero(drop >= 0).flatten().tolist():
        out[i, drop[i]].zero_()
    for k, box in enumerate(boxes or ()):
        if box is not None:
            out[k:k + 1] = _zoom(out[k:k + 1], box)
    out = _resize(out, size)
    return _normalize_(out, mean, std)


def _deliver_cpu(images, mean, std, channels, size, drop, boxes=None):
    """The CPU variant of `deliver`'s float32 step, 2-5x faster than whole-batch ops here:
    - one site at a time, so its float32 planes stay in cache between the three passes;
    - on one torch thread: the DALI threads or DataLoader workers already hold the
      cores, and an OpenMP team competing with them runs 5-20x slower (measured);
    - the output is allocated by numpy, which asks the kernel for transparent huge
      pages: a fresh 170 MB batch page-faults half as long as torch.empty's."""
    b, _, h, w = images.shape
    drop = drop.tolist()
    out = torch.from_numpy(np.empty((b, len(channels), *size), np.float32))
    tmp = out if size == (h, w) else torch.empty((1, len(channels), h, w))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k in range(b):
            site = tmp[0 if tmp is not out else k]
            for i, c in enumerate(channels):
                if i == drop[k]:
                    site[i].zero_()  # pixel space: normalization below makes it -mean/std
                else:
                    site[i].copy_(images[k, c - 1])
            if boxes is not None and boxes[k] is not None:
                site.copy_(_zoom(site[None], boxes[k])[0])
            if tmp is not out:
                out[k] = _resize(tmp, size)[0]
            _normalize_(out[k:k + 1], None if mean is None else mean[k:k + 1],
                        None if std is None else std[k:k + 1])
    finally:
        torch.set_num_threads(threads)
    return out


def _resize(x, size):
    if tuple(x.shape[-2:]) == tuple(size):
        return x  # native size: exact, nothing done
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def _pick_backend(backend: str) -> str:
    if backend == "torch":
        return backend
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        if backend == "dali":
            raise LoaderError("backend='dali' but nvidia.dali does not import; install "
                              "nvidia-dali-cuda130 or use backend='torch'") from None
        return "torch"
    return "dali"


def _pick_device(device: str) -> torch.device:
    device = torch.device(device)  # LoaderSpec allows only cpu, cuda, cuda:N
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LoaderError(f"device={str(device)!r} but torch sees no CUDA device; use 'cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device
