"""The validation curves of `make compare`'s runs, every recipe of one data seed in one figure:
top-1 on the fold's validation wells, training loss and learning rate per epoch, with the
epoch where pseudo labelling starts marked.  Read from each run's metrics.jsonl (the same
figures TensorBoard shows under OUT/seed_S/logs).

    python -m bench.compare_curves [--out-dir compare_out] [--seed 0]
                                   [--out docs/figures/compare_curves_seed0.png]
"""
from __future__ import annotations

import json
import os

from common import run_layout
from common.errors import BadInput
from shards.atomic import write_atomic

ORDER = ("reference", "plus", "first")   # the three recipes first, their variants after


def find_runs(seed_dir: str) -> dict[str, list[dict]]:
    """recipe -> the epochs of its Part II run (fold 0 of the first subset found), from
    SEED_DIR/logs/<recipe>/finetune/<channels>/fold_*/<model>/metrics.jsonl."""
    logs = os.path.join(seed_dir, "logs")
    if not os.path.isdir(logs):
        raise BadInput(f"{logs}: no such folder; run `make compare` first (or give --out-dir)")
    runs = {}
    for recipe in sorted(os.listdir(logs)):
        root = os.path.join(logs, recipe, "finetune")
        paths = sorted(os.path.join(d, run_layout.METRICS) for d, _, files in os.walk(root)
                       if run_layout.METRICS in files)
        if paths:
            with open(paths[0]) as f:
                runs[recipe] = [json.loads(line) for line in f if line.strip()]
    if not runs:
        raise BadInput(f"{logs}: no Part II run with a {run_layout.METRICS}")
    return dict(sorted(runs.items(), key=lambda kv: (kv[0] not in ORDER,
                                                     ORDER.index(kv[0]) if kv[0] in ORDER else 0,
                                                     kv[0])))


def plot(runs: dict[str, list[dict]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for (recipe, hist), color in zip(runs.items(), plt.cm.tab10.colors):
        ep = [h["epoch"] for h in hist]
        style = "-" if recipe in ORDER else "--"
        for ax, key in zip(axes, ("valid_accuracy01", "train_loss", "lr")):
            ax.plot(ep, [h.get(key) for h in hist], style, color=color, label=recipe, lw=1.5)
        labelled = [h["epoch"] for h in hist if h.get("pseudo_labelled")]
        if labelled:   # where the run starts training on pseudo-labelled test wells
            axes[0].axvline(labelled[0] - 0.5, color=color, ls=":", lw=1)
    for ax, name in zip(axes, ("valid top-1 (fold 0, per well)", "train loss", "learning rate")):
        ax.set_xlabel("epoch")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title + "  (dotted: pseudo labels start)", fontsize=10)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    finally:
        plt.close(fig)


def main(out_dir: str = "compare_out", seed: int = 0, out: str | None = None):
    """Plot every recipe's Part II curves of one data seed of `make compare` into one PNG."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BadInput(f"--seed: an integer, got {seed!r}")
    runs = find_runs(os.path.join(out_dir, f"seed_{seed}"))
    out = out or os.path.join("docs", "figures", f"compare_curves_seed{seed}.png")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    plot(runs, out, f"make compare, data seed {seed}: Part II of each recipe")
    for recipe, hist in runs.items():
        best = max(hist, key=lambda h: h.get("valid_accuracy01") or 0)
        print(f"{recipe:28s} {len(hist):3d} epochs  best valid top-1 {best['valid_accuracy01']:.3f} "
              f"(epoch {best['epoch']})  last {hist[-1]['valid_accuracy01']:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    from common.cli import run_command
    run_command("bench.compare_curves", main)
