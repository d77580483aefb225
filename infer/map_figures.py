"""The map's figures (matplotlib, Agg): clustered similarity heatmap; wells in 2-D before and
after alignment, coloured by experiment and by cell type (the batch effect, seen to go)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from shards.atomic import write_atomic


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def cluster_order(sim: np.ndarray) -> np.ndarray:
    """Leaf order of average-linkage clustering on 1 - cosine similarity."""
    if len(sim) < 3:
        return np.arange(len(sim))
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform
    dist = np.clip(1 - sim, 0, 2)
    np.fill_diagonal(dist, 0)
    return leaves_list(linkage(squareform((dist + dist.T) / 2, checks=False), "average"))


def similarity_figure(sim, sirnas, relations: pd.DataFrame | None, path: str,
                      alignment: str) -> None:
    plt = _plt()
    order = cluster_order(sim)
    n = len(sim)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(sim[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1)
    if relations is not None:  # known relations marked, so clusters can be checked by eye
        pos = {int(s): i for i, s in enumerate(np.asarray(sirnas)[order])}
        for a, b in zip(relations["sirna_a"], relations["sirna_b"]):
            i, j = pos[int(a)], pos[int(b)]
            ax.plot([i, j], [j, i], "k+", ms=6 if n < 100 else 2)
    if n <= 60:
        labels = np.asarray(sirnas)[order]
        ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(n), labels, fontsize=6)
    ax.set_title(f"siRNA profiles, cosine similarity ({alignment}); + known relations")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    write_atomic(path, lambda t: fig.savefig(t, dpi=100))
    plt.close(fig)


def pca_2d(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64) - np.mean(x, 0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T


def projection_figure(aligned: dict, wells: pd.DataFrame, path: str) -> None:
    """Rows: alignments; columns: coloured by experiment, by cell type."""
    plt = _plt()
    names = list(aligned)
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 4 * len(names)), squeeze=False)
    for r, m in enumerate(names):
        xy = pca_2d(aligned[m])
        for c, col in enumerate(("experiment", "cell_type")):
            ax = axes[r, c]
            cats = pd.Categorical(wells[col])
            cmap = plt.get_cmap("tab20" if len(cats.categories) > 10 else "tab10")
            for k, cat in enumerate(cats.categories):
                sel = (cats == cat)
                ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=cmap(k % cmap.N), label=cat)
            ax.set_title(f"{m}: wells by {col.replace('_', ' ')} (PCA)")
            ax.set_xticks([])
            ax.set_yticks([])
            if len(cats.categories) <= 20:
                ax.legend(fontsize=6, markerscale=2, ncol=2)
    fig.tight_layout()
    write_atomic(path, lambda t: fig.savefig(t, dpi=90))
    plt.close(fig)
