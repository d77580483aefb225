"""The reference's loops: every channel subset x every fold, one `fit` each.

`--channels all` means the six five-channel subsets, `--fold all` the folds
0..n_folds-1 (control has no folds: one model per subset).  All configs are
resolved first, so a typo fails before hours of training; finished runs are
skipped, a killed one resumes.
"""
from __future__ import annotations

from shards.layout import FIVE_CHANNEL_SUBSETS, parse_channels

from train.config import ConfigError, load_config


def expand_channels(channels):
    if channels is None:
        return [None]
    if isinstance(channels, str) and channels.strip().lower() == "all":
        return [list(c) for c in FIVE_CHANNEL_SUBSETS]
    try:
        return [list(parse_channels(channels))]
    except ValueError as e:
        raise ConfigError(f"--channels: {e} (or 'all' for the six five-channel subsets)") from None


def expand_folds(part, fold, n_folds):
    if fold is None:
        return [None]
    if isinstance(fold, str) and fold.strip().lower() == "all":
        return [None] if part == "control" else list(range(int(n_folds)))
    if isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
        raise ConfigError(f"--fold must be an integer >= 0 or 'all', got {fold!r}")
    return [fold]


def run(part, config=None, *, channels=None, fold=None, model_name=None, logdir=None,
        shards=None, overrides=None, n_folds=5, dotted=None):
    """Resolve every (channels, fold) config, then train them one after another."""
    from train.recipe import fit

    cfgs = [load_config(part, config, overrides=overrides, channels=ch, fold=f,
                        model_name=model_name, logdir=logdir, shards=shards, dotted=dotted)
            for ch in expand_channels(channels) for f in expand_folds(part, fold, n_folds)]
    if part != "control":
        # Fail before the first of many runs, not hours into the loop.
        import os
        from train.checkpoint import is_finished
        lacking = [c.args.pretrained_control for c in cfgs
                   if not is_finished(c.run_dir)
                   and not os.path.isfile(os.path.join(c.run_dir, "checkpoints", "last.pth"))
                   and not os.path.isfile(c.args.pretrained_control)]
        if lacking:
            raise FileNotFoundError(
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
