"""Which of the two RxRx1 layouts a data directory holds, and which of its files define a store.

`kaggle`: the competition files `train.csv`, `test.csv`, `train_controls.csv`,
`test_controls.csv` (one row per well) with images under `train/` and `test/`.
`release`: rxrx.ai's `metadata.csv` (one row per site) with images under
`images/`. A directory is told apart by its CSVs alone, so that commands that
read only metadata (folds, the well tables of infer) work without the images;
the images are checked by the commands that read them.

No pandas here: the prep workers import this (through shards.manifest) and
must start fast. `MetadataError` lives here for the same reason; every reader
of the metadata (shards.metadata and its helpers) raises it.
"""
from __future__ import annotations

import os

from common.errors import BadInput
from shards.layout import KAGGLE, KAGGLE_CSVS, RELEASE, RELEASE_CSV, RELEASE_IMAGES

PIXEL_STATS_CSV = "pixel_stats.csv"  # optional, either layout: prep cross-checks its statistics

LOOKED_FOR = (f"looked for {', '.join(KAGGLE_CSVS)} (Kaggle competition layout) or "
              f"{RELEASE_CSV} with {RELEASE_IMAGES}/ (rxrx.ai release layout); see docs/data.md")


class MetadataError(BadInput):
    """A metadata CSV is missing, malformed or inconsistent with the RxRx1 layout."""


def detect_layout(data_dir) -> str:
    """`kaggle` or `release`; MetadataError naming what was looked for if neither
    (or both: which files define the store would be a guess)."""
    data_dir = str(data_dir)
    if not os.path.isdir(data_dir):
        raise MetadataError(f"{data_dir}: data directory not found (--data-dir); {LOOKED_FOR}")
    kaggle = [n for n in KAGGLE_CSVS if os.path.isfile(os.path.join(data_dir, n))]
    release = os.path.isfile(os.path.join(data_dir, RELEASE_CSV))
    if kaggle and release:
        raise MetadataError(f"{data_dir}: holds both RxRx1 layouts ({', '.join(kaggle)} and "
                            f"{RELEASE_CSV}); keep one of them in the data directory")
    if release:
        return RELEASE
    if kaggle:
        return KAGGLE  # a missing one of the four is named by the reader
    raise MetadataError(f"{data_dir}: no RxRx1 metadata found; {LOOKED_FOR}")


def wells_file(data_dir, split: str) -> str:
    """The path of the file that lists `split`'s treatment wells in this data directory
    (`train.csv` / `test.csv`, or the release's `metadata.csv`), for messages that name
    the file actually read."""
    name = f"{split}.csv" if detect_layout(data_dir) == KAGGLE else RELEASE_CSV
    return os.path.join(str(data_dir), name)


def source_csvs(source_layout: str) -> tuple[str, ...]:
    """The CSVs whose content defines a store packed from this layout (those present
    are fingerprinted into the manifest)."""
    main = KAGGLE_CSVS if source_layout == KAGGLE else (RELEASE_CSV,)
    return (*main, PIXEL_STATS_CSV)
