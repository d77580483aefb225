"""Which sites go into which tar shard.

A DALI reader reads tars in order and only shuffles within a small buffer, so
the shards themselves carry the shuffle: the wells of one split are permuted
with a fixed seed and dealt into equal-sized shards, both sites of a well
together. The plan depends only on the sites table, the image shape, the
target size and the seed — a resumed run recomputes exactly the same plan.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from common.errors import BadInput
from shards.layout import N_CHANNELS, SPLITS

BLOCK = 512
JSON_BYTES = 512  # one padded block covers the per-sample JSON


def sample_bytes(height: int, width: int) -> int:
    """Bytes one site takes in a tar: three headers and three padded members."""
    pixels = height * width * N_CHANNELS
    return 3 * BLOCK + -(-pixels // BLOCK) * BLOCK + BLOCK + JSON_BYTES


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}"


def plan_shards(sites: pd.DataFrame, height: int, width: int, shard_size_mb: float,
                seed: int = 0) -> list[dict]:
    """[{name, split, rows}] with rows (sites-table rows, in tar order) per shard."""
    if shard_size_mb <= 0:
        raise BadInput(f"--shard-size-mb {shard_size_mb}: must be positive")
    target = shard_size_mb * 2 ** 20
    plan = []
    for k, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, k])  # a split's shuffle does not depend on another's
        part = sites[sites["split"] == split]
        if part.empty:
            continue
        # Rows of each well, in sites-table order; a well's sites stay together.
        wells = [g.to_numpy() for _, g in part.groupby("id_code", sort=True)["row"]]
        wells = [wells[i] for i in rng.permutation(len(wells))]
        n_shards = max(1, int(np.ceil(len(part) * sample_bytes(height, width) / target)))
        n_shards = min(n_shards, len(wells))
        for i, chunk in enumerate(np.array_split(np.arange(len(wells)), n_shards)):
            rows = np.concatenate([wells[w] for w in chunk]).tolist()
            plan.append({"name": shard_name(split, i), "split": split, "rows": rows})
    return plan
