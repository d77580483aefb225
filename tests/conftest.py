"""Shared fixtures: one tiny synthetic dataset and its packed store per test session."""
import pytest

TINY_SHARD_MB = 1  # tiny sites are ~27 KB, so ~38 sites a shard: several shards per split


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Path of the `tiny` synthetic dataset (64 px, seed 0) in the Kaggle layout."""
    from prep.synth import synth
    out = tmp_path_factory.mktemp("tiny_data")
    synth(str(out), preset="tiny", seed=0, workers=2)
    return str(out)


@pytest.fixture(scope="session")
def tiny_store(tiny_data, tmp_path_factory):
    """Path of `tiny_data` packed by prep (shards of TINY_SHARD_MB); treat it as read-only."""
    from prep.pack import pack
    out = tmp_path_factory.mktemp("tiny_store")
    pack(tiny_data, str(out), workers=2, shard_size_mb=TINY_SHARD_MB, seed=0)
    return str(out)
