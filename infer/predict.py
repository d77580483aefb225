"""predict-all: every `[channels]/fold_k/<model>` checkpoint over the test (or valid) wells.

For each run under the model root (`<run>/checkpoints/best.pth`, its saved
config giving channels, model, image size and normalization) the store is
streamed through the loader (both sites, no augmentation, no shuffle); the
logits of the two sites and of the TTA views are averaged per well and written
as `OUT/[channels]/fold_k/<model>/pred_<split>.npy` (float32, one row per well)
with `ids_<split>.csv` and `pred_<split>.json` (checkpoint, epoch, TTA) beside it.

Row order: test = test.csv (with --data-dir; without it the store's
experiment/plate/well order, which is test.csv's in the Kaggle and synthetic
data); valid = the run's valid CSV.

Under torchrun every rank reads its own part of the store; per-well sums and
site counts are all-reduced and rank 0 writes.  A padded last batch repeats
samples, so a site already seen on a rank is not counted twice.
"""
from __future__ import annotations

import ast
import json
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from common.distributed import Dist, init_distributed
from infer import InferError
from infer.ensemble import IDS_FILE, PRED_FILE, load_test_wells, write_atomic
from common.run_layout import channels_dirname
from shards.layout import CONTROL_BASE, parse_channels

TTA_CHOICES = (1, 2, 8)
_FOLD_RE = re.compile(r"^fold_(\d+)$")


# ------------------------------------------------------------------ runs

@dataclass(frozen=True)
class Run:
    channels: tuple          # from the folder name
    fold: int | None         # None: a control run (no fold level)
    run_dir: str

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.run_dir, "checkpoints", "best.pth")

    def out_dir(self, root: str, model_name: str) -> str:
        parts = [root, channels_dirname(self.channels)]
        if self.fold is not None:
            parts.append(f"fold_{self.fold}")
        return os.path.join(*parts, model_name)


def _as_list(value, cast):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [cast(v) for v in value]
    if isinstance(value, str):
        value = value.strip().strip("[]")
        return [cast(v) for v in value.split(",") if v.strip()]
    return [cast(value)]


def _subsets(channels) -> set | None:
    """'[1,2,3,4,5]' or [1,2,3,4,5] (fire parses the brackets) -> one subset; a list of them -> several."""
    if channels is None:
        return None
    if isinstance(channels, str):
        try:
            channels = ast.literal_eval(channels.strip())
        except (ValueError, SyntaxError):
            pass  # parse_channels words the error
    try:
        if isinstance(channels, (list, tuple)) and channels and \
                all(isinstance(c, (list, tuple, str)) for c in channels):
            return {parse_channels(c) for c in channels}
        return {parse_channels(channels)}
    except ValueError as e:
        raise InferError(f"--channels: {e}") from None


def find_runs(model_root, model_name, folds=None, channels=None) -> list[Run]:
    """Runs `[channels]/fold_k/<model_name>` (or `[channels]/<model_name>`) under model_root.

    A run folder without checkpoints/best.pth is an error (an unfinished run
    must not silently drop out of an ensemble); restrict with folds/channels.
    """
    root = str(model_root)
    if not os.path.isdir(root):
        raise InferError(f"model root {root}: not a directory")
    folds = _as_list(folds, int)
    want_ch = _subsets(channels)
    runs, unfinished = [], []
    for chan in sorted(os.listdir(root)):
        cdir = os.path.join(root, chan)
        if not os.path.isdir(cdir):
            continue
        try:
            ch = parse_channels(chan)
        except ValueError:
            continue
        if want_ch is not None and ch not in want_ch:
            continue
        candidates = []
        for sub in sorted(os.listdir(cdir)):
            m = _FOLD_RE.match(sub)
            if m:
                candidates.append((int(m.group(1)), os.path.join(cdir, sub, model_name)))
            elif sub == model_name:
                candidates.append((None, os.path.join(cdir, sub)))
        for fold, run_dir in candidates:
            if not os.path.isdir(run_dir) or (folds is not None and fold not in folds):
                continue
            run = Run(ch, fold, run_dir)
            (runs if os.path.isfile(run.checkpoint) else unfinished).append(run)
    if unfinished:
        raise InferError(f"model root {root}: run(s) without checkpoints/best.pth: "
                         + ", ".join(r.run_dir for r in unfinished)
                         + "; finish them or leave them out with --folds/--channels")
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
        raise InferError(f"{ck}: trained as fold {rc['fold']} but it sits in folder fold_{run.fold}")
    if rc.get("model_name") not in (None, model_name):
        raise InferError(f"{ck}: a {rc['model_name']} checkpoint in folder {model_name}")


# ------------------------------------------------------------------ wells

def test_selection(store_sites: pd.DataFrame, data_dir=None) -> pd.DataFrame:
    """Test treatment wells (id_code, experiment, label=-1) in test.csv / store order."""
    sites = store_sites[(store_sites["split"] == "test") & (store_sites["well_type"] == "treatment")]
    wells = sites.drop_duplicates("id_code")[["id_code", "experiment"]]
    if wells.empty:
        raise InferError("the store holds no test treatment wells")
    if data_dir is not None:
        order = load_test_wells(data_dir)["id_code"]
        in_store = set(wells["id_code"])
        missing = [c for c in order if c not in in_store]
        if missing or len(order) != len(wells):
            raise InferError(f"{data_dir}/test.csv and the store disagree: {len(missing)} test "
                             f"well(s) not in the store (e.g. {missing[:3]}), store has "
                             f"{len(wells)} test wells, test.csv {len(order)}; pack the store "
                             "from this data directory")
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
    df = pd.read_csv(path, dtype={"id_code": str})
    missing = [c for c in ("id_code", "sirna") if c not in df.columns]
    if missing:
        raise InferError(f"{path}: missing column(s) {', '.join(missing)}")
    # Same wells as the trainer validated on (train.data.csv_selections): treatment rows.
    df = df[df["sirna"].astype(np.int64) < CONTROL_BASE]
    unknown = df.loc[~df["id_code"].isin(set(store_sites["id_code"])), "id_code"]
    if len(unknown):
        raise InferError(f"{path}: {len(unknown)} id_code(s) not in the store, e.g. "
                         f"{list(unknown[:3])}")
    if "experiment" not in df.columns:
        df["experiment"] = df["id_code"].str.split("_").str[0]
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


@torch.no_grad()
def predict_wells(model, loader, wells: pd.DataFrame, tta: int, device: torch.device,
                  d: Dist, desc: str = "predict") -> tuple[np.ndarray, np.ndarray]:
    """(n_wells, C) float32 logits averaged over sites and views, and sites seen per well."""
    pos = pd.Series(np.arange(len(wells)), index=wells["id_code"].to_numpy())
    sites = loader.sites
    id_of_row = sites.set_index("row")["id_code"] if "row" in sites.columns else sites["id_code"]
    sums = counts = None
    seen: set[int] = set()
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    n_batches = _len(loader)
    for images, _labels, rows in tqdm(loader, total=n_batches, desc=desc, unit="batch",
                                      disable=d.rank != 0, file=sys.stderr):
        rows = np.asarray(torch.as_tensor(rows).cpu(), dtype=np.int64)
        keep = np.zeros(len(rows), bool)
        keep[np.unique(rows, return_index=True)[1]] = True
        keep &= np.array([r not in seen for r in rows], dtype=bool)
        seen.update(rows.tolist())
        if not keep.any():
            continue
        images = images.to(device, non_blocking=True)
        logits = None
        for view in tta_views(images, tta):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                out = model(view).float()
            logits = out if logits is None else logits + out
        logits = (logits / tta).cpu().numpy().astype(np.float64)
        if sums is None:
            sums = np.zeros((len(wells), logits.shape[1]), np.float64)
            counts = np.zeros(len(wells), np.float64)
        idx = pos.reindex(id_of_row.loc[rows[keep]].to_numpy()).to_numpy()
        if np.isnan(idx).any():
            raise InferError("the loader yielded sites outside the selected wells")
        idx = idx.astype(np.int64)
        np.add.at(sums, idx, logits[keep])
        np.add.at(counts, idx, 1.0)
    if d.enabled:
        sums, counts = _all_reduce(sums, counts, len(wells), device)
    if sums is None:
        raise InferError("the loader yielded no samples; is the store empty for this selection?")
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32), counts


def _len(loader):
    try:
        return len(loader)
    except TypeError:
        return None


def _all_reduce(sums, counts, n_wells, device):
    # A rank may have seen no batch (more ranks than shards); agree on C first.
    comm_dev = device if device.type == "cuda" else torch.device("cpu")
    c = torch.tensor([0 if sums is None else sums.shape[1]], device=comm_dev)
    torch_dist.all_reduce(c, op=torch_dist.ReduceOp.MAX)
    n_classes = int(c.item())
    if sums is None:
        sums = np.zeros((n_wells, n_classes))
        counts = np.zeros(n_wells)
    t_sums = torch.from_numpy(sums).to(comm_dev)
    t_counts = torch.from_numpy(counts).to(comm_dev)
    torch_dist.all_reduce(t_sums)
    torch_dist.all_reduce(t_counts)
    return t_sums.cpu().numpy(), t_counts.cpu().numpy()


# ------------------------------------------------------------------ the command

def predict_all(shards, model_root, model_name, out_dir, tta=1, batch_size=32, split="test",
                data_dir=None, folds=None, channels=None, device=None, backend="auto",
                overwrite=False, num_workers=None) -> dict:
    import shards as shards_pkg
    from train import load_for_inference

    if split not in ("test", "valid"):
        raise InferError(f"--split {split!r}: choose test or valid")
    tta = int(tta)
    if tta not in TTA_CHOICES:
        raise InferError(f"--tta {tta}: choose one of {TTA_CHOICES}")
    runs = find_runs(model_root, model_name, folds, channels)
    d, dev = setup(device)
    store_sites = shards_pkg.open_store(str(shards)).sites
    test_wells = test_selection(store_sites, data_dir) if split == "test" else None

    written = []
    for i, run in enumerate(runs):
        out = run.out_dir(str(out_dir), model_name)
        pred_path = os.path.join(out, PRED_FILE.format(split=split))
        if os.path.isfile(pred_path) and not overwrite:
            if d.rank == 0:
                print(f"[{i + 1}/{len(runs)}] {pred_path} exists, skipped (--overwrite to redo)")
            written.append(pred_path)
            continue
        model, rc = load_for_inference(run.checkpoint, device=str(dev))
        check_run_config(run, rc, model_name)
        wells = test_wells if split == "test" else valid_selection(rc, store_sites, run.checkpoint)
        loader_kw = dict(channels=list(rc["channels"]), norm=rc["norm"], sites="two",
                         image_size=int(rc["image_size"]), batch_size=int(batch_size),
                         augment=False, shuffle=False, device=str(dev), rank=d.rank,
                         world_size=d.world_size, backend=backend, label_column="label")
        if num_workers is not None:
            loader_kw["num_workers"] = int(num_workers)
        loader = shards_pkg.make_loader(str(shards), wells[["id_code", "experiment", "label"]],
                                        **loader_kw)
        name = f"{channels_dirname(run.channels)}" + \
            ("" if run.fold is None else f"/fold_{run.fold}") + f"/{model_name}"
        logits, counts = predict_wells(model, loader, wells, tta, dev, d,
                                       desc=f"[{i + 1}/{len(runs)}] {name}")
        if d.rank == 0:
            _check_counts(counts, wells, run.checkpoint)
            os.makedirs(out, exist_ok=True)
            ids = wells[["id_code"] + (["sirna"] if "sirna" in wells.columns else [])]
            write_atomic(os.path.join(out, IDS_FILE.format(split=split)),
                         lambda p: ids.to_csv(p, index=False))
            meta = dict(checkpoint=os.path.abspath(run.checkpoint), split=split, tta=tta,
                        shape=list(logits.shape), channels=list(rc["channels"]),
                        fold=run.fold, epoch=rc.get("epoch"), stage=rc.get("stage"),
                        label_offset=rc.get("label_offset"), image_size=rc["image_size"],
                        norm=rc["norm"], sites_per_well=float(counts.mean()))
            write_atomic(os.path.join(out, f"pred_{split}.json"),
                         lambda p: open(p, "w").write(json.dumps(meta, indent=1)))
            write_atomic(pred_path, lambda p: np.save(p, logits))
            print(f"[{i + 1}/{len(runs)}] {pred_path}: {logits.shape[0]} wells x "
                  f"{logits.shape[1]} classes")
        written.append(pred_path)
        del model
    if d.enabled:
        torch_dist.barrier()
    if d.rank != 0:
        return None  # rank 0 reports (fire would print every rank's summary)
    return dict(out_dir=str(out_dir), split=split, runs=len(runs), files=written)


def _check_counts(counts: np.ndarray, wells: pd.DataFrame, ck: str) -> None:
    none = wells["id_code"][counts == 0]
    if len(none):
        raise InferError(f"{ck}: {len(none)} well(s) got no prediction (e.g. {list(none[:3])}); "
                         "the loader did not deliver their sites — is the store complete?")
    one = int((counts == 1).sum())
    if one:
        print(f"WARNING: {one} well(s) had one site only; their logits come from that site",
              file=sys.stderr)
