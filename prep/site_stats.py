"""Per-site channel statistics and the normalization tables derived from them.

One histogram per channel gives all five statistics exactly (uint8 has 256
values), far cheaper than numpy's mean/std/median passes over the pixels.
Plate and experiment norms are pooled from per-site mean and variance: every site has the same
number of pixels, so the pooled mean is the mean of means and the pooled
variance is mean(var + mean^2) - pooled_mean^2, exactly the statistics of all
the group's pixels taken together, without reading a pixel twice.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from shards.layout import N_CHANNELS, STAT_NAMES

MIN_STD = 1.0  # a flat channel must not blow up: std below one gray level is stored as 1
_VALUES = np.arange(256, dtype=np.float64)


def channel_stats(ch: np.ndarray) -> list[float]:
    """mean, std (ddof 0), median, min, max of a (H, W) uint8 image, as numpy defines them."""
    # Pillow's histogram counts uint8 pixels in C, ~4x faster than np.bincount
    # (which widens every pixel to int64 first); the array is wrapped, not copied.
    ch = np.ascontiguousarray(ch)
    im = Image.frombuffer("L", (ch.shape[1], ch.shape[0]), ch, "raw", "L", 0, 1)
    hist = np.asarray(im.histogram(), dtype=np.float64)
    n = ch.size
    mean = float(hist @ _VALUES) / n
    var = float(hist @ (_VALUES - mean) ** 2) / n
    cum = np.cumsum(hist)
    # np.median of an even count averages the two middle order statistics.
    lo = int(np.searchsorted(cum, (n - 1) // 2 + 1))
    hi = int(np.searchsorted(cum, n // 2 + 1))
    nz = np.flatnonzero(hist)
    return [mean, var ** 0.5, (lo + hi) / 2.0, float(nz[0]), float(nz[-1])]


def site_norm(stats: np.ndarray) -> np.ndarray:
    """(n, 6, 5) stats -> (n, 6, 2) float32 mean, std of each site itself (mode `site`)."""
    out = np.stack([stats[..., 0], np.maximum(stats[..., 1], MIN_STD)], axis=-1)
    return out.astype(np.float32)


def pooled_norm(stats: np.ndarray, groups) -> np.ndarray:
    """(n, 6, 2) float32: for each row, mean and std of all pixels of all rows in its group."""
    stats = np.asarray(stats, dtype=np.float64)
    _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    codes = codes.ravel()
    k = codes.max() + 1
    counts = np.bincount(codes, minlength=k)[:, None]
    mean, var = stats[..., 0], stats[..., 1] ** 2
    g_mean = np.stack([np.bincount(codes, mean[:, c], k) for c in range(N_CHANNELS)], 1) / counts
    g_sq = np.stack([np.bincount(codes, (var + mean ** 2)[:, c], k)
                     for c in range(N_CHANNELS)], 1) / counts
    g_std = np.sqrt(np.maximum(g_sq - g_mean ** 2, 0.0))
    out = np.stack([g_mean[codes], np.maximum(g_std[codes], MIN_STD)], axis=-1)
    return out.astype(np.float32)


def compare_reference(stats: np.ndarray, sites, path: str) -> dict:
    """Largest absolute difference between our stats and a Kaggle-style pixel_stats.csv.

    The reference's conventions (std ddof, median of an even count) may differ
    slightly from numpy's, so this reports and never fails.
    """
    # here, not at the top: prep workers import this module for channel_stats
    import pandas as pd
    from shards.metadata import MetadataError, read_csv_checked

    columns = ["id_code", "site", "channel", *STAT_NAMES]
    ref = read_csv_checked(path, columns)[columns]
    numbers = ref[columns[1:]].apply(pd.to_numeric, errors="coerce")
    bad = numbers.isna().any(axis=1).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        col = next(c for c in columns[1:] if pd.isna(numbers[c].iloc[i]))
        raise MetadataError(f"{path}, row {i + 1} (id_code {ref['id_code'].iloc[i]}): "
                            f"{col} {ref[col].iloc[i]!r} is not a number")
    ref = pd.concat([ref[["id_code"]], numbers], axis=1)
    ref = ref.drop_duplicates(["id_code", "site", "channel"])
    row_of = pd.Series(sites["row"].to_numpy(),
                       index=pd.MultiIndex.from_arrays([sites["id_code"], sites["site"]]))
    idx = pd.MultiIndex.from_arrays([ref["id_code"].astype(str), ref["site"].astype(int)])
    rows = row_of.reindex(idx).to_numpy()
    found = ~pd.isna(rows)
    ref, rows = ref[found], rows[found].astype(np.int64)
    ch = ref["channel"].to_numpy(int) - 1
    ok = (ch >= 0) & (ch < N_CHANNELS)
    ref, rows, ch = ref[ok], rows[ok], ch[ok]
    ours = stats[rows, ch]                     # (m, 5)
    diff = np.abs(ours - ref[list(STAT_NAMES)].to_numpy(np.float64))
    out = {"file": os.path.basename(path), "compared": int(len(ref)),
           "missing": int(len(sites) * N_CHANNELS - len(ref)),
           "max_abs_diff": {s: (float(diff[:, i].max()) if len(diff) else None)
                            for i, s in enumerate(STAT_NAMES)}}
    if len(diff):
        i, j = np.unravel_index(int(np.argmax(diff)), diff.shape)
        r = ref.iloc[i]
        out["largest"] = {"id_code": str(r["id_code"]), "site": int(r["site"]),
                          "channel": int(r["channel"]), "stat": STAT_NAMES[j],
                          "ours": float(ours[i, j]), "reference": float(r[STAT_NAMES[j]]),
                          "diff": float(diff[i, j])}
    return out
