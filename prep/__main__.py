"""`python -m prep COMMAND --help` — synthetic data, folds, shard packing, verification, preview.

Bad input (a CSV, a PNG, a path, an option) ends in one line naming the file,
row or key, and exit 2 (common.errors.run_cli); a traceback means a bug. The
whole command line is checked before any work (common.cli).
"""
from common.cli import run_commands


def synth(out_dir, preset="tiny", seed=0, experiments: int | None = None,
          image_size: int | None = None, workers: int | None = None, layout="kaggle"):
    """Write a synthetic dataset in an RxRx1 layout (presets: tiny, demo, full).

    --layout kaggle (default): the competition's train.csv, test.csv, *_controls.csv
    and train/ test/ images; --layout release: rxrx.ai's metadata.csv and images/.
    Both hold the same wells and pixels for the same seed. OUT_DIR must be new,
    empty, or a previous synth of the same parameters (its synth.json): any other
    directory is refused, never overwritten."""
    from prep.synth import synth as run
    return run(out_dir, preset=preset, seed=seed, experiments=experiments,
               image_size=image_size, workers=workers, layout_name=layout)


def folds(data_dir, n_folds=5, out_dir="csv", seed=0, overwrite=False):
    """Write train_k.csv / valid_k.csv split by experiment, as the reference does.
    DATA_DIR holds either RxRx1 layout (Kaggle files, or metadata.csv + images/)."""
    from prep.folds import write_folds
    return write_folds(data_dir, n_folds=n_folds, out_dir=out_dir, seed=seed, overwrite=overwrite)


def shards(data_dir, out_dir, workers: int | None = None, shard_size_mb: float = 768, seed=0):
    """Pack every site's six PNGs into OUT/store.zarr and OUT/shards/*.tar (resumable).
    DATA_DIR holds either RxRx1 layout (Kaggle files, or metadata.csv + images/).

    A re-run on a finished store checks every array, chunk and shard (shard
    sha256s included) and repacks whatever is missing or damaged."""
    from prep.pack import pack
    return pack(data_dir, out_dir, workers=workers, shard_size_mb=shard_size_mb, seed=seed)


def verify(out_dir, full=False, data_dir: str | None = None):
    """Check every array, chunk file and shard (size, sha256, count, index), and the
    pixels of sampled sites (all with --full) against the source PNGs; exit 1 listing
    every problem found."""
    from prep.verify import verify as run
    return run(out_dir, full=full, data_dir=data_dir)


def preview(out_dir, id_code, site=1, out="site.png", overwrite=False):
    """Render one site's six channels as an RGB composite PNG (an existing --out is
    replaced only with --overwrite)."""
    from prep.preview import preview as run
    return run(out_dir, id_code=id_code, site=site, out=out, overwrite=overwrite)


def main():
    run_commands("prep", {"synth": synth, "folds": folds, "shards": shards,
                          "verify": verify, "preview": preview}, doc=__doc__)


if __name__ == "__main__":
    main()
