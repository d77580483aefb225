"""Training curves of one run as a PNG (loss and accuracy per epoch, stage boundaries marked)."""
from __future__ import annotations

import os

from shards.atomic import write_atomic


def plot_curves(history: list[dict], path: str) -> None:
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(ep, [h["train_loss"] for h in history], "o-", label="train (label smoothing)")
    ax_loss.plot(ep, [h["valid_loss"] for h in history], "o-", label="valid (CE, per well)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_acc.plot(ep, [h["train_accuracy01"] for h in history], "o-", label="train top-1 (per site)")
    ax_acc.plot(ep, [h["valid_accuracy01"] for h in history], "o-", label="valid top-1")
    ax_acc.plot(ep, [h["valid_accuracy03"] for h in history], "o-", label="valid top-3")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    for prev, h in zip(history, history[1:]):
        if h["stage"] != prev["stage"]:
            for ax in (ax_loss, ax_acc):
                ax.axvline(h["epoch"] - 0.5, color="grey", ls=":", lw=1)
    from matplotlib.ticker import MaxNLocator
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(os.path.dirname(path) if os.path.dirname(path) else path, fontsize=9)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=90))
    finally:
        plt.close(fig)
