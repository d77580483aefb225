"""`LoaderSpec`: everything a loader is asked for, built and checked once.

The trainer, the predictor and the benchmarks each build one spec and pass
it down; `make_loader(store_dir, selection, spec)` then only opens the store
and resolves the selection.  The spec is frozen, so a loader's settings
cannot drift after it was checked, and two loaders built from one spec read
the same way.

    spec = LoaderSpec(channels=(1, 2, 3, 5, 6), augment=True, batch_size=64,
                      channel_dropout=0.5, shear_deg=10.0, shear_p=0.5, device="cuda:0")
    valid = dataclasses.replace(spec, augment=False, sites="two")

Bad values raise `LoaderError` naming the field and what would do.  Only
what depends on the machine is left to `make_loader`: `backend="auto"` (DALI
where it imports) and `device="cuda"` (torch's current device).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields

from common.errors import BadInput
from shards.layout import LOADER_NORMS, SITES, parse_channels

SITE_MODES = ("random", "two", "one")
BACKENDS = ("auto", "dali", "torch")
DEFAULT_LABEL_COLUMN = "sirna"

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


class LoaderError(BadInput):
    """A loader was asked for something it cannot do, or its selection or store disagree."""


@dataclass(frozen=True)
class LoaderSpec:
    """What to read and how; see the module docstring.

    channels: 1-based subset, a sequence or the reference's string "[1,2,3,5,6]".
    norm: statistics that normalize a site (`shards.layout.LOADER_NORMS`; `sample`: the
        delivered image's own per-channel mean and std, after the zoom crop).
    sites / site: `random` (one site per well per epoch), `two` (both), `one` (`site`).
    image_size: output side in pixels; None = the store's native size (exact).
    augment: dihedral flips and transposes, shear and channel dropout (training).
    channel_dropout: probability per sample that one random channel is set to 0 in
        pixel space before normalization (so it reads -mean/std); only with augment.
    shear_deg / shear_p: with probability `shear_p` per sample, an affine shear
        of an angle uniform in [-shear_deg, shear_deg] (degrees); only with augment.
    zoom_p / zoom_min_side: with probability `zoom_p` per sample (only with augment), a
        square crop of a side drawn uniformly from round(min_side * H)..H pixels at a
        uniform place, resized back to H x W by nearest neighbour, in pixel space before
        normalization (the 1st place's zoom: a 256-512 px crop of a 512 px site).
    shuffle: None = shuffle when augmenting.
    rank / world_size: this process's disjoint part of every epoch.
    backend: `auto` (DALI where it imports, else torch), `dali` or `torch`.
    device: where batches are delivered: `cpu`, `cuda` or `cuda:N`.
    num_workers: DALI threads or DataLoader processes; None = min(4, cores).
    label_column: the selection's column holding labels (-1 where absent).
    """
    channels: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    norm: str = "site"
    sites: str = "random"
    site: int = 1
    image_size: int | None = None
    batch_size: int = 32
    augment: bool = False
    channel_dropout: float = 0.0
    shear_deg: float = 0.0
    shear_p: float = 0.0
    zoom_p: float = 0.0
    zoom_min_side: float = 1.0
    shuffle: bool | None = None
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    backend: str = "auto"
    device: str = "cpu"
    num_workers: int | None = None
    drop_last: bool = False
    label_column: str | None = DEFAULT_LABEL_COLUMN

    def __post_init__(self):
        def fix(name, value):  # frozen: normalized values are set once, here
            object.__setattr__(self, name, value)

        try:
            fix("channels", parse_channels(self.channels))
        except ValueError as e:
            raise LoaderError(f"channels={self.channels!r}: {e}") from None
        _choice("norm", self.norm, LOADER_NORMS)
        _choice("sites", self.sites, SITE_MODES)
        _choice("backend", self.backend, BACKENDS)
        fix("site", _integer("site", self.site, 1))
        if self.sites == "one" and self.site not in SITES:
            raise LoaderError(f"site={self.site!r}: a well has sites {SITES[0]} and {SITES[1]}")
        for name in ("batch_size", "world_size"):
            fix(name, _integer(name, getattr(self, name), 1))
        fix("rank", _integer("rank", self.rank, 0))
        if self.rank >= self.world_size:
            raise LoaderError(f"rank={self.rank!r}: need 0 <= rank < world_size="
                              f"{self.world_size}")
        fix("seed", _integer("seed", self.seed, 0))
        if self.image_size is not None:
            fix("image_size", _integer("image_size", self.image_size, 1,
                                       "need None (native) or a positive integer"))
        if self.num_workers is not None:
            fix("num_workers", _integer("num_workers", self.num_workers, 0))
        for name in ("augment", "drop_last") + (() if self.shuffle is None else ("shuffle",)):
            fix(name, _flag(name, getattr(self, name)))
        if self.shuffle is None:
            fix("shuffle", self.augment)
        for name in ("channel_dropout", "shear_p", "zoom_p"):
            fix(name, _number(name, getattr(self, name), 0.0, 1.0, "need a probability in [0, 1]"))
        fix("zoom_min_side", _number("zoom_min_side", self.zoom_min_side, 0.0, 1.0,
                                     "need a share of the side in (0, 1]"))
        if self.zoom_min_side == 0.0:
            raise LoaderError("zoom_min_side=0.0: need a share of the side in (0, 1]")
        fix("shear_deg", _number("shear_deg", self.shear_deg, 0.0, 45.0,
                                 "need an angle in degrees in [0, 45]"))
        device = str(self.device)
        if not _DEVICE.fullmatch(device):
            raise LoaderError(f"device={device!r}: use 'cpu', 'cuda' or 'cuda:N'")
        fix("device", device)
        if self.label_column is not None and not isinstance(self.label_column, str):
            raise LoaderError(f"label_column={self.label_column!r}: need a column name or None")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _choice(name, value, allowed):
    if value not in allowed:
        raise LoaderError(f"{name}={value!r}: choose one of {', '.join(allowed)}")


def _integer(name, value, low, hint=None):
    if isinstance(value, bool) or not hasattr(value, "__index__") or value < low:
        raise LoaderError(f"{name}={value!r}: {hint or f'need an integer >= {low}'}")
    return int(value)


def _flag(name, value):
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise LoaderError(f"{name}={value!r}: need true or false")
    return bool(value)


def _number(name, value, low, high, hint):
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(
            value, "__float__"):
        raise LoaderError(f"{name}={value!r}: {hint}")
    value = float(value)
    if not low <= value <= high:  # NaN fails too
        raise LoaderError(f"{name}={value!r}: {hint}")
    return value
