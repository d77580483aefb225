"""The run layout, as in the reference: one home for where runs and predictions live.

    LOGS/<part>/<[channels]>/fold_<k>/<model_name>/     a training run (control: no fold level)
        checkpoints/best.pth, last.pth, finished.json
        config.yml, metrics.jsonl, curves.png
    PRED/<[channels]>/fold_<k>/<model_name>/           a run's predictions (infer.predictions)

`<[channels]>` is the 1-based subset as in the reference, e.g. `[1,2,3,4,5]`.
Train writes this layout, infer and the demo read it; nobody else spells it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from shards.layout import parse_channels

CHECKPOINTS_DIR = "checkpoints"
BEST = "best.pth"
LAST = "last.pth"
FINISHED = "finished.json"
CONFIG = "config.yml"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
TENSORBOARD = "tensorboard"   # event files (tensorboard --logdir LOGS)
_FOLD_RE = re.compile(r"^fold_(\d+)$")


def channels_dirname(channels: Sequence[int]) -> str:
    """Folder name of a channel subset, as in the reference: `[1,2,3,4,5]`."""
    return "[" + ",".join(str(int(c)) for c in channels) + "]"


def fold_dirname(fold: int) -> str:
    return f"fold_{int(fold)}"


def run_subdir(channels: Sequence[int], fold: int | None, model_name: str) -> str:
    """`[1,2,3,4,5]/fold_0/<model>` (or `[1,2,3,4,5]/<model>` without a fold)."""
    parts = [channels_dirname(channels)]
    if fold is not None:
        parts.append(fold_dirname(fold))
    parts.append(str(model_name))
    return os.path.join(*parts)


def run_dir(logdir: str, part: str, channels: Sequence[int], fold: int | None,
            model_name: str) -> str:
    """LOGS/<part>/[channels]/fold_<k>/<model_name>; control runs have no fold level."""
    return os.path.join(str(logdir), part, run_subdir(channels, None if part == "control" else fold,
                                                      model_name))


def checkpoint_path(run_dir_: str, which: str = BEST) -> str:
    return os.path.join(run_dir_, CHECKPOINTS_DIR, which)


def is_finished(run_dir_: str) -> bool:
    """A run is complete once its finished.json marker and best.pth exist (the marker is
    written after the final last.pth, so no large checkpoint has to be read to know)."""
    ck = os.path.join(run_dir_, CHECKPOINTS_DIR)
    return os.path.isfile(os.path.join(ck, FINISHED)) and os.path.isfile(os.path.join(ck, BEST))


@dataclass(frozen=True)
class RunPath:
    """One `[channels]/fold_k/<model>` folder found under a root."""
    channels: tuple[int, ...]
    fold: int | None          # None: no fold level (control)
    model: str
    path: str

    @property
    def name(self) -> str:
        return run_subdir(self.channels, self.fold, self.model)


def find_run_dirs(root: str, model_names: Iterable[str] | None = None,
                  folds: Iterable[int] | None = None,
                  subsets: Iterable[Sequence[int]] | None = None) -> list[RunPath]:
    """Every `[channels]/fold_<k>/<model>` and `[channels]/<model>` folder under `root`,
    sorted; folders whose name is not a channel subset are not runs and are passed over.
    Restrict to model names, folds or channel subsets when given."""
    names = set(model_names) if model_names is not None else None
    folds = set(folds) if folds is not None else None
    subsets = {tuple(s) for s in subsets} if subsets is not None else None
    out = []
    if not os.path.isdir(root):
        return out
    for chan in sorted(os.listdir(root)):
        cdir = os.path.join(root, chan)
        if not os.path.isdir(cdir):
            continue
        try:
            ch = parse_channels(chan)
        except ValueError:
            continue
        if subsets is not None and ch not in subsets:
            continue
        for sub in sorted(os.listdir(cdir)):
            sdir = os.path.join(cdir, sub)
            if not os.path.isdir(sdir):
                continue
            m = _FOLD_RE.match(sub)
            if m:
                fold = int(m.group(1))
                models = [(d, os.path.join(sdir, d)) for d in sorted(os.listdir(sdir))
                          if os.path.isdir(os.path.join(sdir, d))]
            else:
                fold, models = None, [(sub, sdir)]
            if folds is not None and fold not in folds:
                continue
            for model, mdir in models:
                if names is None or model in names:
                    out.append(RunPath(ch, fold, model, mdir))
    return out
