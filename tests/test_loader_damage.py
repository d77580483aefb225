"""A shard cut or removed after the store was opened (issue 11 #7): iterating says which
shard and which sample, as a StoreError (BadInput: one line at a CLI, exit 2), on both
backends, instead of a DALI or DataLoader traceback."""
import os
import shutil

import pytest

from common.errors import EXIT_BAD_INPUT, run_cli
from shards import LoaderSpec, StoreError, make_loader
from shards.dali_index import PIXELS, parse_index

try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False
DALI = pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI,
                                                     reason="nvidia.dali is not installed"))


def last_sample_of_epoch(loader):
    """(tar path, its index entries, sample key) of the last sample the epoch reads."""
    rows, _ = loader.plan(0)
    row = rows[-1]
    s = loader.where["shard"][row]
    with open(loader.store.index_paths()[s]) as f:
        entries = parse_index(f.read())
    entry = entries[loader.where["position"][row]]
    pixels = next(m for m in entry if m[0] == PIXELS)
    return loader.shard_paths[s], pixels, pixels[3].rsplit(".", 1)[0]


@pytest.mark.parametrize("backend", [DALI, "torch"])
@pytest.mark.parametrize("cut", ["inside_pixels", "before_sample", "removed"])
def test_shard_damaged_mid_epoch_names_shard_and_sample(tiny_store, tmp_path, backend, cut,
                                                        capsys):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    loader = make_loader(str(store), "train", LoaderSpec(sites="two", batch_size=8,
                                                         backend=backend, num_workers=2))
    tar, (_, offset, size, _), key = last_sample_of_epoch(loader)
    if cut == "removed":
        os.remove(tar)
        want = rf"{tar}: shard missing since the store was opened \(sample .*\)"
    else:
        os.truncate(tar, offset + size // 2 if cut == "inside_pixels" else offset - 600)
        # the first sample of the epoch that no longer fits is the last one or before it
        want = rf"{tar}: sample \S+ \(row \d+\) ends at byte \d+ but the shard now has " \
               rf"{os.path.getsize(tar)} bytes: truncated since the store was opened"
    with pytest.raises(StoreError, match=want):
        for _ in loader:
            pass
    if cut == "inside_pixels":  # the cut sample itself is the one named
        with pytest.raises(StoreError, match=f"sample {key} "):
            list(loader)

    with pytest.raises(SystemExit) as e:  # what a CLI prints: one line, exit 2
        run_cli(lambda: list(loader))
    assert e.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tar}: ") and err.count("\n") == 1 and "Traceback" not in err
