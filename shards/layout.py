"""Facts of the RxRx1 layout that every part of cellshard agrees on.

Plate geometry, siRNA id ranges, channel numbering (1-based, as in the
reference solution and the file names `_w<channel>.png`), id_code format, the
two source layouts RxRx1 comes in and the paths of their raw PNGs.  Nothing here reads files.
"""
from __future__ import annotations

import ast
import os
import re
from typing import Iterable, Sequence

N_CHANNELS = 6
CHANNELS = (1, 2, 3, 4, 5, 6)
# Cell Painting stains of RxRx1, in channel order w1..w6.
CHANNEL_NAMES = (
    "nuclei (Hoechst)",
    "endoplasmic reticulum (ConA)",
    "actin (phalloidin)",
    "nucleoli and RNA (SYTO14)",
    "mitochondria (MitoTracker)",
    "Golgi and membrane (WGA)",
)
# The six five-channel subsets the reference trains, one model each.
FIVE_CHANNEL_SUBSETS = (
    (1, 2, 3, 4, 5),
    (1, 2, 3, 4, 6),
    (1, 2, 3, 5, 6),
    (1, 2, 4, 5, 6),
    (1, 3, 4, 5, 6),
    (2, 3, 4, 5, 6),
)

# A 384-well plate with the outer ring left empty: rows B-O, columns 02-23.
PLATE_ROWS = "BCDEFGHIJKLMNO"
PLATE_COLS = tuple(range(2, 24))
WELLS = tuple(f"{r}{c:02d}" for r in PLATE_ROWS for c in PLATE_COLS)
N_WELLS_PER_PLATE = len(WELLS)  # 308
PLATES = (1, 2, 3, 4)
SITES = (1, 2)

N_TREATMENTS = 1108          # treatment siRNA ids 0..1107
N_GROUPS = 4                 # each plate of an experiment holds one group
GROUP_SIZE = N_TREATMENTS // N_GROUPS  # 277
CONTROL_BASE = 1108          # control siRNA ids 1108..1138
N_CONTROLS = 31
N_SIRNAS = N_TREATMENTS + N_CONTROLS
NEGATIVE_CONTROL = CONTROL_BASE + N_CONTROLS - 1  # 1138, as in RxRx1

CELL_TYPES = ("HEPG2", "HUVEC", "RPE", "U2OS")
SPLITS = ("train", "test")
WELL_TYPES = ("treatment", "positive_control", "negative_control")

# Per-channel statistics, in this order, wherever a stats array appears.
STAT_NAMES = ("mean", "std", "median", "min", "max")
NORM_MODES = ("site", "plate", "experiment", "none")
# What a loader may normalize by: the store's modes, or `sample` — each delivered image by
# its own per-channel mean and std, taken after the zoom crop (the 1st place's
# `--data-normalization sample`); it needs no array in the store.
SAMPLE_NORM = "sample"
LOADER_NORMS = NORM_MODES + (SAMPLE_NORM,)

_EXPERIMENT_RE = re.compile(r"^([A-Z0-9]+)-(\d{2})$")
_WELL_RE = re.compile(r"^([A-P])(\d{2})$")


def make_id_code(experiment: str, plate: int, well: str) -> str:
    return f"{experiment}_{int(plate)}_{well}"


def parse_id_code(id_code: str) -> tuple[str, int, str]:
    """`HEPG2-01_1_B03` -> ('HEPG2-01', 1, 'B03'); ValueError if malformed."""
    parts = str(id_code).split("_")
    if len(parts) != 3 or not parts[1].isdigit():
        raise ValueError(
            f"id_code {id_code!r} is not '<experiment>_<plate>_<well>' (e.g. HEPG2-01_1_B03)"
        )
    return parts[0], int(parts[1]), parts[2]


def cell_type_of(experiment: str) -> str:
    """`HUVEC-07` -> 'HUVEC'; ValueError if the name is not '<CELLTYPE>-<nn>'."""
    m = _EXPERIMENT_RE.match(str(experiment))
    if not m:
        raise ValueError(f"experiment {experiment!r} is not '<cell type>-<nn>' (e.g. HEPG2-01)")
    return m.group(1)


def is_valid_well(well: str) -> bool:
    return str(well) in _WELL_SET


_WELL_SET = frozenset(WELLS)


def sample_key(id_code: str, site: int) -> str:
    """Webdataset key of one site: `<id_code>_s<site>`."""
    return f"{id_code}_s{int(site)}"


# The two ways RxRx1 is shipped (docs/data.md). `kaggle`: the competition's
# train.csv, test.csv, *_controls.csv and images under train/ and test/;
# `release`: rxrx.ai's metadata.csv (one row per site) and images under images/.
KAGGLE = "kaggle"
RELEASE = "release"
SOURCE_LAYOUTS = (KAGGLE, RELEASE)
KAGGLE_CSVS = ("train.csv", "test.csv", "train_controls.csv", "test_controls.csv")
RELEASE_CSV = "metadata.csv"
RELEASE_IMAGES = "images"
RELEASE_COLUMNS = ("site_id", "well_id", "cell_type", "dataset", "experiment", "plate", "well",
                   "site", "well_type", "sirna", "sirna_id")


def png_path(data_dir: str | os.PathLike, split: str, experiment: str, plate: int,
             well: str, site: int, channel: int, source_layout: str = KAGGLE) -> str:
    """Path of one raw channel image: `<split>/...` in the Kaggle layout, `images/...`
    in the release layout; below that both are `<experiment>/Plate<p>/<well>_s<site>_w<c>.png`."""
    if source_layout not in SOURCE_LAYOUTS:
        raise ValueError(f"source layout {source_layout!r}: one of {', '.join(SOURCE_LAYOUTS)}")
    top = split if source_layout == KAGGLE else RELEASE_IMAGES
    return os.path.join(str(data_dir), top, experiment, f"Plate{int(plate)}",
                        f"{well}_s{int(site)}_w{int(channel)}.png")


def parse_channels(channels: str | int | Iterable[int]) -> tuple[int, ...]:
    """Validate a 1-based channel subset.

    Accepts a list/tuple of ints or the reference's string form "[1,2,3,5,6]".
    """
    raw = channels
    if isinstance(channels, str):
        try:
            channels = ast.literal_eval(channels.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"channel subset {raw!r} is not a list like [1,2,3,5,6]") from None
    if isinstance(channels, int):
        channels = [channels]
    try:
        out = tuple(int(c) for c in channels)
    except (TypeError, ValueError):
        raise ValueError(f"channel subset {raw!r} is not a list of integers") from None
    if not out:
        raise ValueError("channel subset is empty; give channels from 1 to 6, e.g. [1,2,3,5,6]")
    bad = [c for c in out if c not in CHANNELS]
    if bad:
        raise ValueError(f"channel subset {list(out)} has {bad} outside 1-6 (channels are 1-based)")
    if len(set(out)) != len(out):
        raise ValueError(f"channel subset {list(out)} repeats a channel")
    return out
