"""predict-all: every `[channels]/fold_k/<model>` checkpoint over the test (or valid) wells.

For each run under the model root (`<run>/checkpoints/best.pth`, its saved
config giving channels, model, image size and normalization) the store is
streamed through the loader (both sites, no augmentation, no shuffle); the
logits of the two sites and of the TTA views are averaged per well and written
as `OUT/[channels]/fold_k/<model>/pred_<split>.npy` (float32, one row per well)
with `ids_<split>.csv` and `pred_<split>.json` (checkpoint, epoch, TTA) beside it.

Only finished runs are predicted (checkpoints/finished.json) unless
--allow-unfinished, which the prediction records.  The checkpoint must be what
its folder says: a control run (no fold level) is Part I with 31 classes, a
fold's run is finetune/pseudo with 1108 or 1139, and the part is the one of
the run's config.yml.  An existing prediction is kept only while it is of the
same checkpoint (the digest of its tensors) and its ids file lists the wells
of this selection in this order; else it is predicted again.

A run trained with the controls as classes (1139 = 1108 siRNAs + 31 controls,
sirna id = class) keeps the contract of every other run: its first 1108
columns are written, and pred_<split>.json records `trained_classes`.  A
model that takes the cell type as an input (`takes_cell_type`) gets it per
site from the experiment names, through the model's own `cell_types_of_rows`.
The TTA default is the run's: `predict_params.tta` of its config, else 8 for
a run of the plus recipe (`plus: true`), else 1; `--tta` overrides it.

Row order: test = the data directory's (with --data-dir: test.csv's rows, or
the release metadata.csv's; without it the store's experiment/plate/well
order, which is the source's in the Kaggle and synthetic data); valid = the
run's valid CSV.

Under torchrun every rank reads its own part of the store; per-well sums and
site counts are all-reduced and rank 0 writes.  A padded last batch repeats
samples, so a site already seen on a rank is not counted twice.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from common.arglists import parse_folds, parse_subsets
from common.distributed import Dist, init_distributed
from common.precision import AMP_MODES, amp_dtype, autocast
from common.run_layout import (channels_dirname, checkpoint_path, find_run_dirs, fold_dirname,
                               is_finished, run_subdir)
from common.well_logits import WellMeans, well_of_row
from infer import InferError
from infer.predictions import PRED_FILE, ids_digest, pred_dir, write_predictions
from infer.run_proof import expected_of, stale_reason
from infer.wells import experiments_of, int_column, load_test_wells
from shards.atomic import check_writable
from shards.layout import CONTROL_BASE, N_SIRNAS, N_TREATMENTS
from shards.metadata import read_csv_checked
from shards.source_layout import wells_file

TTA_CHOICES = (1, 2, 8)


# ------------------------------------------------------------------ runs

@dataclass(frozen=True)
class Run:
    channels: tuple          # from the folder name
    fold: int | None         # None: a control run (no fold level)
    run_dir: str
    finished: bool = True    # checkpoints/finished.json written

    @property
    def checkpoint(self) -> str:
        return checkpoint_path(self.run_dir)

    def out_dir(self, root: str, model_name: str) -> str:
        return pred_dir(root, self.channels, self.fold, model_name)


def find_runs(model_root, model_name, folds=None, channels=None,
              allow_unfinished=False) -> list[Run]:
    """Runs `[channels]/fold_k/<model_name>` (or `[channels]/<model_name>`) under model_root.

    A run folder without checkpoints/best.pth is an error (an unfinished run
    must not silently drop out of an ensemble); restrict with folds/channels.
    So is one without finished.json (a killed run's best so far), unless
    `allow_unfinished`.
    """
    root = str(model_root)
    if not os.path.isdir(root):
        raise InferError(f"model root {root}: not a directory")
    folds = None if folds is None else parse_folds(folds)
    want_ch = None if channels is None else parse_subsets(channels)
    runs, unfinished = [], []
    for rp in find_run_dirs(root, model_names=[model_name], folds=folds, subsets=want_ch):
        run = Run(rp.channels, rp.fold, rp.path, is_finished(rp.path))
        (runs if os.path.isfile(run.checkpoint) else unfinished).append(run)
    if unfinished:
        raise InferError(f"model root {root}: run(s) without checkpoints/best.pth: "
                         + ", ".join(r.run_dir for r in unfinished)
                         + "; finish them or leave them out with --folds/--channels")
    killed = [r.run_dir for r in runs if not r.finished]
    if killed and not allow_unfinished:
        raise InferError(f"model root {root}: run(s) not finished (no checkpoints/finished.json): "
                         + ", ".join(killed) + "; resume their training, leave them out with "
                         "--folds/--channels, or predict their best.pth so far with "
                         "--allow-unfinished")
    if not runs:
        raise InferError(f"model root {root}: no checkpoints "
                         f"[channels]/fold_<k>/{model_name}/checkpoints/best.pth"
                         + (f" for folds {folds}" if folds is not None else "")
                         + (f" for channels {sorted(want_ch)}" if want_ch else ""))
    return runs


def check_run_config(run: Run, rc: dict, model_name: str) -> None:
    """The checkpoint must be what its folder says it is."""
    ck = run.checkpoint
    saved = tuple(int(c) for c in rc["channels"])
    if saved != tuple(run.channels):
        raise InferError(f"{ck}: trained on channels {list(saved)} but it sits in folder "
                         f"{channels_dirname(run.channels)}; the folder name and the checkpoint "
                         "must agree (was a run copied to the wrong place?)")
    if rc.get("n_channels") is not None and int(rc["n_channels"]) != len(saved):
        raise InferError(f"{ck}: model has {rc['n_channels']} input channels but channels "
                         f"{list(saved)}")
    if run.fold is not None and rc.get("fold") is not None and int(rc["fold"]) != run.fold:
        raise InferError(f"{ck}: trained as fold {rc['fold']} but it sits in folder "
                         f"{fold_dirname(run.fold)}")
    if rc.get("model_name") not in (None, model_name):
        raise InferError(f"{ck}: a {rc['model_name']} checkpoint in folder {model_name}")


# ------------------------------------------------------------------ wells

def test_selection(store_sites: pd.DataFrame, data_dir=None) -> pd.DataFrame:
    """Test treatment wells (id_code, experiment, label=-1) in the data directory's order
    (test.csv, or the release's metadata.csv) with `data_dir`, else in store order."""
    sites = store_sites[(store_sites["split"] == "test") & (store_sites["well_type"] == "treatment")]
    wells = sites.drop_duplicates("id_code")[["id_code", "experiment"]]
    if wells.empty:
        raise InferError("the store holds no test treatment wells")
    if data_dir is not None:
        order = load_test_wells(data_dir)["id_code"]
        in_store = set(wells["id_code"])
        missing = [c for c in order if c not in in_store]
        if missing or len(order) != len(wells):
            listed = wells_file(data_dir, "test")
            raise InferError(f"{listed} and the store disagree: {len(missing)} test "
                             f"well(s) not in the store (e.g. {missing[:3]}), store has "
                             f"{len(wells)} test wells, {os.path.basename(listed)} {len(order)}; "
                             "pack the store from this data directory")
        wells = wells.set_index("id_code").loc[order.to_numpy()].reset_index()
    return wells.assign(label=np.int64(-1)).reset_index(drop=True)


def valid_selection(rc: dict, store_sites: pd.DataFrame, ck: str) -> pd.DataFrame:
    """Rows of the run's valid CSV (its order), with their labels."""
    if rc.get("stage") == "control":
        raise InferError(f"{ck}: a control run (31 control classes) has no treatment validation "
                         "rows; --split valid is for finetune/pseudo runs")
    dp = (rc.get("config") or {}).get("stages", {}).get("data_params", {})
    path = dp.get("valid_csv")
    if not path:
        raise InferError(f"{ck}: its config has no stages.data_params.valid_csv")
    if not os.path.isfile(path):
        raise InferError(f"{ck}: valid CSV {path} (from its config) not found; run from the "
                         "directory the run was trained from, or restore the CSV")
    df = read_csv_checked(path, ("id_code", "sirna"))
    df["sirna"] = int_column(df, path, "sirna", 0)
    # Same wells as the trainer validated on (train.data.csv_selections): treatment rows.
    df = df[df["sirna"] < CONTROL_BASE]
    unknown = df.loc[~df["id_code"].isin(set(store_sites["id_code"])), "id_code"]
    if len(unknown):
        raise InferError(f"{path}: {len(unknown)} id_code(s) not in the store, e.g. "
                         f"{list(unknown[:3])}")
    if "experiment" not in df.columns:
        df["experiment"] = experiments_of(df["id_code"], path)
    offset = int(rc.get("label_offset") or 0)
    return pd.DataFrame({"id_code": df["id_code"].to_numpy(),
                         "experiment": df["experiment"].to_numpy(),
                         "label": df["sirna"].astype(np.int64).to_numpy() - offset,
                         "sirna": df["sirna"].astype(np.int64).to_numpy()})


# ------------------------------------------------------------------ the model pass

def tta_views(images: torch.Tensor, tta: int):
    """1: identity; 2: + horizontal flip; 8: the dihedral group (4 rotations x flip)."""
    if tta == 1:
        yield images
    elif tta == 2:
        yield images
        yield images.flip(-1)
    elif tta == 8:
        for k in range(4):
            r = torch.rot90(images, k, dims=(-2, -1))
            yield r
            yield r.flip(-1)
    else:
        raise InferError(f"--tta {tta}: choose one of {TTA_CHOICES}")


def setup(device=None) -> tuple[Dist, torch.device]:
    try:
        return init_distributed(device)
    except ValueError as e:
        raise InferError(f"--device: {e}") from None


def run_amp(amp, rc: dict) -> str:
    """--amp when given, else the run's own `args.amp` (auto when the config has none)."""
    setting = amp if amp is not None else \
        ((rc.get("config") or {}).get("args") or {}).get("amp", "auto")
    if setting not in AMP_MODES:
        raise InferError(f"--amp {setting!r}: choose one of {', '.join(AMP_MODES)}")
    return setting


def run_tta(tta, rc: dict) -> int:
    """--tta when given, else the run's `predict_params.tta`, else 8 for a plus run, else 1.
    Read defensively: configs older than these keys have neither."""
    if tta is not None:
        return tta
    cfg = rc.get("config") or {}
    value = (cfg.get("predict_params") or {}).get("tta")
    if value is None:
        value = 8 if cfg.get("plus") else 1
    if value not in TTA_CHOICES:
        raise InferError(f"{rc.get('run_dir', 'the run')}: its config's predict_params.tta "
                         f"{value!r} is none of {TTA_CHOICES}; give --tta")
    return int(value)


def treatment_columns(logits: np.ndarray, rc: dict) -> tuple[np.ndarray, int]:
    """(logits of the 1108 treatment siRNAs, classes the run was trained on).

    A run with the controls as classes (1139 outputs, class = sirna id) keeps its first
    1108 columns, so that every prediction file of a finetune/pseudo run is (n, 1108)."""
    trained = int(logits.shape[1])
    if trained == N_SIRNAS and int(rc.get("label_offset") or 0) == 0:
        return np.ascontiguousarray(logits[:, :N_TREATMENTS]), trained
    return logits, trained


@torch.no_grad()
def predict_wells(model, loader, wells: pd.DataFrame, tta: int, device: torch.device,
                  d: Dist, desc: str = "predict", amp: str = "auto",
                  forward=None) -> tuple[np.ndarray, np.ndarray]:
    """(n_wells, C) float32 logits averaged over sites and views, and sites seen per well.

    `amp`: the autocast choice (common.precision): auto = bf16 only where the device has it.
    `forward(images, *cell_type)`: what is averaged, the model's logits unless given
    (`infer embed` passes the layer the classifier reads)."""
    forward = model if forward is None else forward
    means = WellMeans(well_of_row(loader.sites, wells), len(wells))
    dtype = amp_dtype(amp, device)
    # A model with the cell type as input gets it per site (rows point into loader.sites).
    cell_types = model.cell_types_of_rows(loader.sites) \
        if getattr(model, "takes_cell_type", False) else None
    for images, _labels, rows in tqdm(loader, total=_len(loader), desc=desc, unit="batch",
                                      disable=d.rank != 0, file=sys.stderr):
        images = images.to(device, non_blocking=True)
        rows = torch.as_tensor(rows).cpu().numpy()
        extra = () if cell_types is None else \
            (torch.as_tensor(cell_types[rows]).to(device, non_blocking=True),)
        logits = None
        for view in tta_views(images, tta):
            with autocast(device, dtype):
                out = forward(view, *extra).float()
            logits = out if logits is None else logits + out
        means.add(rows, (logits / tta).cpu().numpy())
    if d.enabled:
        means.all_reduce(device)
    if means.sums is None:
        raise InferError("the loader yielded no samples; is the store empty for this selection?")
    return means.means(), means.counts


def _len(loader):
    try:
        return len(loader)
    except TypeError:
        return None


# ------------------------------------------------------------------ the command

def predict_all(shards, model_root, model_name, out_dir, tta=None, batch_size=32, split="test",
                data_dir=None, folds=None, channels=None, device=None, backend="auto",
                overwrite=False, num_workers=None, amp=None, allow_unfinished=False) -> dict:
    import shards as shards_pkg
    from train import load_for_inference

    from train import checkpoint_digest

    if split not in ("test", "valid"):
        raise InferError(f"--split {split!r}: choose test or valid")
    tta, batch_size, num_workers = pass_options(tta, batch_size, num_workers, amp)
    runs = find_runs(model_root, model_name, folds, channels, allow_unfinished)
    check_writable(out_dir)
    d, dev = setup(device)
    store_sites = shards_pkg.open_store(str(shards)).sites
    test_wells = test_selection(store_sites, data_dir) if split == "test" else None

    written = []
    for i, run in enumerate(runs):
        out = run.out_dir(str(out_dir), model_name)
        pred_path = os.path.join(out, PRED_FILE.format(split=split))
        if os.path.isfile(pred_path) and not overwrite:
            stale = stale_reason(out, split, checkpoint_digest(run.checkpoint), test_wells)
            if stale is None:
                if d.rank == 0:
                    print(f"[{i + 1}/{len(runs)}] {pred_path} exists, skipped (--overwrite to "
                          "redo)")
                written.append(pred_path)
                continue
            if d.rank == 0:
                print(f"[{i + 1}/{len(runs)}] {pred_path}: {stale}; predicting again")
        model, rc = load_for_inference(run.checkpoint, device=str(dev), expect=expected_of(run))
        check_run_config(run, rc, model_name)
        run_amp_setting = run_amp(amp, rc)
        views = run_tta(tta, rc)
        wells = test_wells if split == "test" else valid_selection(rc, store_sites, run.checkpoint)
        loader = well_loader(shards_pkg, str(shards), wells, rc, batch_size, dev, d, backend,
                         num_workers)
        logits, counts = predict_wells(model, loader, wells, views, dev, d,
                                       desc=f"[{i + 1}/{len(runs)}] "
                                            f"{run_subdir(run.channels, run.fold, model_name)}",
                                       amp=run_amp_setting)
        logits, trained_classes = treatment_columns(logits, rc)
        if d.rank == 0:
            check_counts(counts, wells, run.checkpoint)
            ids = wells[["id_code"] + (["sirna"] if "sirna" in wells.columns else [])]
            meta = dict(checkpoint=os.path.abspath(run.checkpoint),
                        checkpoint_digest=rc["checkpoint_digest"],
                        ids_sha256=ids_digest(ids["id_code"].tolist()),
                        finished=run.finished, allow_unfinished=bool(allow_unfinished),
                        split=split, tta=views,
                        trained_classes=trained_classes,
                        shape=list(logits.shape), channels=list(rc["channels"]),
                        fold=run.fold, epoch=rc.get("epoch"), stage=rc.get("stage"),
                        label_offset=rc.get("label_offset"), image_size=rc["image_size"],
                        norm=rc["norm"], amp=run_amp_setting,
                        sites_per_well=float(counts.mean()))
            write_predictions(out, split, logits, ids, meta)
            print(f"[{i + 1}/{len(runs)}] {pred_path}: {logits.shape[0]} wells x "
                  f"{logits.shape[1]} classes")
        written.append(pred_path)
        del model
    if d.enabled:
        torch_dist.barrier()
    if d.rank != 0:
        return None  # rank 0 reports (fire would print every rank's summary)
    return dict(out_dir=str(out_dir), split=split, runs=len(runs), files=written)


def well_loader(shards_pkg, store_dir: str, wells: pd.DataFrame, rc: dict, batch_size: int,
                dev: torch.device, d: Dist, backend: str, num_workers):
    """The one call of the loader: both sites, no augmentation, storage order."""
    spec = shards_pkg.LoaderSpec(
        channels=tuple(rc["channels"]), norm=rc["norm"], sites="two",
        image_size=int(rc["image_size"]), batch_size=batch_size, augment=False, shuffle=False,
        device=str(dev), rank=d.rank, world_size=d.world_size, backend=backend,
        label_column="label", num_workers=None if num_workers is None else int(num_workers))
    return shards_pkg.make_loader(store_dir, wells[["id_code", "experiment", "label"]], spec)


def pass_options(tta, batch_size, num_workers, amp) -> tuple:
    """(tta, batch_size, num_workers) of a model pass, checked (predict-all and embed)."""
    if tta is not None:
        tta = positive_int(tta, "--tta")
        if tta not in TTA_CHOICES:
            raise InferError(f"--tta {tta}: choose one of {TTA_CHOICES}")
    batch_size = positive_int(batch_size, "--batch-size")
    if num_workers is not None:
        num_workers = positive_int(num_workers, "--num-workers", low=0)
    if amp is not None and amp not in AMP_MODES:
        raise InferError(f"--amp {amp!r}: choose one of {', '.join(AMP_MODES)}")
    return tta, batch_size, num_workers


def positive_int(value, option: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InferError(f"{option} {value!r}: need an integer >= {low}")
    return int(value)


def check_counts(counts: np.ndarray, wells: pd.DataFrame, ck: str) -> None:
    none = wells["id_code"][counts == 0]
    if len(none):
        raise InferError(f"{ck}: {len(none)} well(s) got no prediction (e.g. {list(none[:3])}); "
                         "the loader did not deliver their sites — is the store complete?")
    one = int((counts == 1).sum())
    if one:
        print(f"WARNING: {one} well(s) had one site only; their logits come from that site",
              file=sys.stderr)
