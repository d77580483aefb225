"""`make_loader`: batches of normalized, augmented sites of a selection, from a store.

    loader = make_loader("out/tiny", "csv/train_0.csv", channels=[1, 2, 3, 5, 6],
                         augment=True, channel_dropout=0.1, device="cuda:0")
    for epoch in range(n):
        loader.set_epoch(epoch)
        for images, labels, rows in loader:   # float32 (B, C, S, S), int64 (B,), int64 (B,)
            ...

Images and labels are on `device`; rows (of `loader.sites`) stay on the CPU,
where callers use them for bookkeeping.

One epoch, per rank (both backends):
1. `selection.epoch_rows`: the wells' rows for the site mode (random: a site
   per well drawn from seed and epoch).
2. `selection.epoch_order`: shuffled (or storage) order, grouped by shard.
3. `selection.rank_batches`: this rank's disjoint part and its batches, the
   same number on every rank.
4. a backend yields uint8 (b, 6, H, W) with the dihedral augmentation done:
   `dali_pipeline.dali_batches` (filtered DALI indexes, GPU or CPU pipeline)
   or `torch_loader.torch_batches` (pread from the same shards, DataLoader).
5. `deliver`, on the delivery device: channel subset while converting to
   float32, resize, `(x - mean) / std` with the row's statistics, channel
   dropout.  Why normalization runs here and not in DALI: see
   `shards.dali_pipeline`.

Resize (image_size other than the native size) is antialiased bilinear in
torch (`F.interpolate`) for both backends, so they agree to float rounding;
it runs before normalization, which commutes with it (a per-channel affine
map) and then touches fewer pixels when shrinking.  image_size=None, or the
native size, does no resize at all: the output is exact.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from shards.layout import NORM_MODES, parse_channels
from shards.selection import (DEFAULT_LABEL_COLUMN, check_site_mode, epoch_order, epoch_rows,
                              locate_rows, rank_batches, resolve_selection, well_sites)
from shards.store import open_store

BACKENDS = ("auto", "dali", "torch")


def make_loader(store_dir, selection, *, channels=(1, 2, 3, 4, 5, 6), norm="site",
                sites="random", site=1, image_size=None, batch_size=32, augment=False,
                channel_dropout=0.0, shuffle=None, seed=0, rank=0, world_size=1,
                backend="auto", device="cpu", num_workers=None, drop_last=False,
                label_column=DEFAULT_LABEL_COLUMN) -> "Loader":
    """A loader over the wells of `selection` in the store at `store_dir`.

    Every argument is checked, and the store opened and the selection
    resolved, before this returns: bad input raises here, naming what is wrong.
    """
    channels = parse_channels(channels)
    if norm not in NORM_MODES:
        raise ValueError(f"norm={norm!r}: choose one of {', '.join(NORM_MODES)}")
    check_site_mode(sites, site)
    for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}={value!r}: need an integer >= {low}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r}: need 0 <= rank < world_size={world_size}")
    if image_size is not None and (not isinstance(image_size, (int, np.integer))
                                   or isinstance(image_size, bool) or image_size < 1):
        raise ValueError(f"image_size={image_size!r}: need None (native) or a positive integer")
    if not 0.0 <= channel_dropout <= 1.0:
        raise ValueError(f"channel_dropout={channel_dropout!r}: need a probability in [0, 1]")
    backend = _pick_backend(backend)
    device = _pick_device(device)
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)

    store = open_store(store_dir)
    wells = resolve_selection(store.sites, selection, label_column)
    table = well_sites(store.sites, wells)
    where = locate_rows(store.sites, store.shard_paths(), store.index_paths())
    held = table[table >= 0]
    lost = held[where["shard"][held] < 0]
    if len(lost):
        r = store.sites.iloc[int(lost[0])]
        raise LookupError(f"id_code {r['id_code']!r} site {r['site']} (row {r['row']}) is in the "
                          f"sites table but in no shard of {store_dir}; re-run prep")
    nbytes = int(np.prod(store.image_shape))
    wrong = held[where["size"][held] != nbytes]
    if len(wrong):
        r = store.sites.iloc[int(wrong[0])]
        raise ValueError(f"id_code {r['id_code']!r} site {r['site']} (row {r['row']}): its shard "
                         f"holds {where['size'][wrong[0]]} pixel bytes, the manifest's image "
                         f"shape {list(store.image_shape)} needs {nbytes}")
    return Loader(store=store, wells=wells, table=table, where=where, channels=channels,
                  norm=norm, sites_mode=sites, site=int(site), image_size=image_size,
                  batch_size=int(batch_size), augment=bool(augment),
                  channel_dropout=float(channel_dropout) if augment else 0.0,
                  shuffle=bool(augment) if shuffle is None else bool(shuffle), seed=int(seed),
                  rank=int(rank), world_size=int(world_size), backend=backend, device=device,
                  num_workers=int(num_workers), drop_last=bool(drop_last))


class Loader:
    """Iterable over one epoch of batches; `set_epoch` picks the epoch (default 0)."""

    def __init__(self, *, store, wells, table, where, channels, norm, sites_mode, site,
                 image_size, batch_size, augment, channel_dropout, shuffle, seed, rank,
                 world_size, backend, device, num_workers, drop_last):
        self.store, self.wells, self.table, self.where = store, wells, table, where
        self.channels, self.norm, self.sites_mode, self.site = channels, norm, sites_mode, site
        self.image_size, self.batch_size, self.augment = image_size, batch_size, augment
        self.channel_dropout, self.shuffle, self.seed = channel_dropout, shuffle, seed
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device, self.num_workers, self.drop_last = device, num_workers, drop_last
        self.epoch = 0
        self.sites = store.sites
        self.image_shape = tuple(store.image_shape)

        stats = torch.from_numpy(store.norm(norm)[:, [c - 1 for c in channels]])
        self.mean = stats[..., 0].contiguous().to(device)
        self.std = stats[..., 1].contiguous().to(device)
        labels = np.full(len(store.sites), -1, np.int64)
        for k in range(table.shape[1]):
            held = table[:, k] >= 0
            labels[table[held, k]] = wells["label"].to_numpy()[held]
        self.labels = torch.from_numpy(labels)
        self.shard_paths = store.shard_paths()
        self.run_dir, self._iterations = None, 0
        if backend == "dali":
            self.run_dir = tempfile.mkdtemp(prefix="cellshard-loader-")
            weakref.finalize(self, shutil.rmtree, self.run_dir, ignore_errors=True)
        self._n_batches = sum(len(p) for p in self.plan(0)[1])  # the same every epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._n_batches

    def plan(self, epoch: int):
        """(rows, pieces) this rank reads in `epoch`, in order (see selection.rank_batches)."""
        rows = epoch_rows(self.table, self.wells, self.sites_mode, self.site, self.seed, epoch)
        order = epoch_order(rows, self.where["shard"], self.where["position"], self.shuffle,
                            self.seed, epoch)
        mine, pieces = rank_batches(order, self.rank, self.world_size, self.batch_size,
                                    self.drop_last)
        return mine, pieces

    def __iter__(self):
        epoch = self.epoch
        rows, pieces = self.plan(epoch)
        seed = int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0])
        gen = torch.Generator().manual_seed(seed)
        if self.backend == "dali":
            from shards.dali_pipeline import dali_batches, write_filtered_index
            self._iterations += 1  # two live iterators must not share index files
            tag = f"e{epoch}-r{self.rank}-i{self._iterations}"
            tars, indexes = write_filtered_index(self.run_dir, tag, rows, self.where,
                                                 self.shard_paths)
            batches = dali_batches(tars, indexes, pieces, self.image_shape, self.augment,
                                   self.device, self.num_workers, seed & 0x7FFFFFFF)
        else:
            from shards.torch_loader import torch_batches
            batches = torch_batches(rows, self.shard_paths, self.where, pieces, self.image_shape,
                                    self.augment, self.num_workers, seed,
                                    pin_memory=self.device.type == "cuda")
        try:
            for images, batch_rows in batches:
                yield deliver(images, batch_rows, self.mean, self.std, self.labels,
                              self.channels, self.image_size, self.channel_dropout, gen,
                              self.device)
        finally:
            batches.close()
            if self.backend == "dali":  # this epoch's filtered indexes are spent
                for path in indexes:
                    os.remove(path)


def deliver(images, rows, mean, std, labels, channels, image_size, channel_dropout, gen, device):
    """uint8 (b, 6, H, W) -> float32 (b, C, S, S) normalized on `device`, labels, rows.

    The channel subset is copied while converting to float32 into a fresh
    output, resized if asked, then normalized in place, `(x - mean) / std`
    with the rows' statistics; dropped channels are zeroed.
    """
    images = images.to(device, non_blocking=True)
    rows = rows.to(torch.int64).cpu()
    b, _, h, w = images.shape
    size = (h, w) if image_size is None else (image_size, image_size)
    if device.type == "cpu":
        out = _deliver_cpu(images, mean[rows], std[rows], channels, size)
    else:
        out = torch.empty((b, len(channels), h, w), dtype=torch.float32, device=device)
        for i, c in enumerate(channels):
            out[:, i].copy_(images[:, c - 1])
        out = _resize(out, size)
        dev_rows = rows.to(device, non_blocking=True)
        out.sub_(mean[dev_rows][:, :, None, None]).div_(std[dev_rows][:, :, None, None])
    if channel_dropout > 0:
        hit = torch.rand(b, generator=gen) < channel_dropout
        which = torch.randint(len(channels), (b,), generator=gen)
        for i in torch.nonzero(hit).flatten().tolist():
            out[i, which[i]].zero_()
    return out, labels[rows].to(device, non_blocking=True), rows


def _deliver_cpu(images, mean, std, channels, size):
    """The CPU variant of `deliver`'s float32 step, 2-5x faster than whole-batch ops here:
    - one site at a time, so its float32 planes stay in cache between the three passes;
    - on one torch thread: the DALI threads or DataLoader workers already hold the
      cores, and an OpenMP team competing with them runs 5-20x slower (measured);
    - the output is allocated by numpy, which asks the kernel for transparent huge
      pages: a fresh 170 MB batch page-faults half as long as torch.empty's."""
    b, _, h, w = images.shape
    out = torch.from_numpy(np.empty((b, len(channels), *size), np.float32))
    tmp = out if size == (h, w) else torch.empty((1, len(channels), h, w))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k in range(b):
            site = tmp[0 if tmp is not out else k]
            for i, c in enumerate(channels):
                site[i].copy_(images[k, c - 1])
            if tmp is not out:
                out[k] = _resize(tmp, size)[0]
            out[k].sub_(mean[k, :, None, None]).div_(std[k, :, None, None])
    finally:
        torch.set_num_threads(threads)
    return out


def _resize(x, size):
    if tuple(x.shape[-2:]) == tuple(size):
        return x  # native size: exact, nothing done
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def _pick_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return backend
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        if backend == "dali":
            raise ImportError("backend='dali' but nvidia.dali does not import; install "
                              "nvidia-dali-cuda130 or use backend='torch'") from None
        return "torch"
    return "dali"


def _pick_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but torch sees no CUDA device; use 'cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"device={str(device)!r}: use 'cpu' or 'cuda:N'")
    return device
