"""The reference's loops: every channel subset x every fold, one `fit` each.

`--channels all` means the six five-channel subsets, `--fold all` the folds
0..n_folds-1 (control has no folds: one model per subset).  All configs are
resolved first, so a typo fails before hours of training; finished runs are
skipped, a killed one resumes.
"""
from __future__ import annotations

import os

from common import run_layout
from common.arglists import parse_folds, parse_subsets
from train.config import ConfigError, load_config


def run(part, config=None, *, channels=None, fold=None, model_name=None, logdir=None,
        shards=None, overrides=None, n_folds=5, dotted=None):
    """Resolve every (channels, fold) config, then train them one after another."""
    from train.recipe import fit

    subsets = [None] if channels is None else [list(s) for s in parse_subsets(channels, "--channels")]
    if fold is None or (part == "control" and str(fold).strip().lower() == "all"):
        folds = [None]       # control has no folds; None keeps the config's args.fold
    else:
        folds = parse_folds(fold, n_folds, "--fold")
    cfgs = [load_config(part, config, overrides=overrides, channels=ch, fold=f,
                        model_name=model_name, logdir=logdir, shards=shards, dotted=dotted)
            for ch in subsets for f in folds]
    if part != "control":
        # Fail before the first of many runs, not hours into the loop.
        lacking = [c.args.pretrained_control for c in cfgs
                   if c.starts_from_control and not run_layout.is_finished(c.run_dir)
                   and not os.path.isfile(run_layout.checkpoint_path(c.run_dir, run_layout.LAST))
                   and not os.path.isfile(c.args.pretrained_control)]
        if lacking:
            raise ConfigError(
                f"{len(lacking)} run(s) start from control checkpoints that do not exist, e.g. "
                f"{lacking[0]}; train Part I first (python -m train control --channels ...) "
                "or set args.pretrained_control")
    results = []
    for i, cfg in enumerate(cfgs):
        if len(cfgs) > 1:
            print(f"[{i + 1}/{len(cfgs)}] {cfg.run_dir}", flush=True)
        out = fit(cfg)
        out.pop("model", None)
        results.append(out)
    return results
