"""`python -m prep COMMAND --help` — synthetic data, folds, shard packing, verification, preview."""
import fire


def synth(out_dir, preset="tiny", seed=0, experiments=None, image_size=None, workers=None):
    """Write a synthetic dataset in the RxRx1 Kaggle layout (presets: tiny, demo, full)."""
    from prep.synth import synth as run
    return run(out_dir, preset=preset, seed=seed, experiments=experiments,
               image_size=image_size, workers=workers)


def folds(data_dir, n_folds=5, out_dir="csv", seed=0):
    """Write train_k.csv / valid_k.csv split by experiment, as the reference does."""
    from prep.folds import write_folds
    return write_folds(data_dir, n_folds=n_folds, out_dir=out_dir, seed=seed)


def shards(data_dir, out_dir, workers=None, shard_size_mb=768, seed=0):
    """Pack every site's six PNGs into OUT/store.zarr and OUT/shards/*.tar (resumable)."""
    from prep.pack import pack
    return pack(data_dir, out_dir, workers=workers, shard_size_mb=shard_size_mb, seed=seed)


def verify(out_dir, full=False, data_dir=None):
    """Check shard checksums and counts, and pixels of sampled sites against the source PNGs."""
    from prep.verify import verify as run
    return run(out_dir, full=full, data_dir=data_dir)


def preview(out_dir, id_code, site=1, out="site.png"):
    """Render one site's six channels as an RGB composite PNG."""
    from prep.preview import preview as run
    return run(out_dir, id_code=id_code, site=site, out=out)


def main():
    fire.Fire({"synth": synth, "folds": folds, "shards": shards,
               "verify": verify, "preview": preview})


if __name__ == "__main__":
    main()
