"""embed: every well of the store (train, test, controls) through one trained run.

The embedding is the layer the classifier reads: `model.embed(images, cell)` where the
model has one (the plus head's neck), else timm's pre-logits features
(`forward_head(forward_features(x), pre_logits=True)`, of the backbone for a plus model
without a neck). Loading, the loader and the per-well averaging over sites and TTA views
are predict-all's (`infer.predict`): one model pass, two things it can average.

Resumable: one experiment at a time into EMB/parts/<experiment>.npy (atomic), skipped
when there; embed.json names the store and checkpoint, so a resume against another
store or run is refused. Format: `infer.embeddings`.
"""
from __future__ import annotations

import os
import shutil
import signal

import numpy as np
import torch
import torch.distributed as torch_dist

from common.run_layout import checkpoint_path
from infer import InferError
from infer.embeddings import (EMB_ZARR, PARTS, WELLS_CSV, apply_labels, read_meta,
                              store_wells, write_meta, write_wells, write_zarr)
from infer.predict import (check_counts, pass_options, predict_wells, run_amp, run_tta, setup,
                           well_loader)
from shards.atomic import write_atomic
from shards.manifest import sha256_file

KILL_ENV = "CELLSHARD_KILL_AFTER_PART"  # tests: SIGKILL after this many parts (a crash)


def embedding_forward(model):
    """images, *cell_type -> (B, d): the input of the classifier."""
    embed = getattr(model, "embed", None)
    if callable(embed):
        return embed
    net = model if hasattr(model, "forward_head") else getattr(model, "backbone", None)
    if net is None or not hasattr(net, "forward_features") or not hasattr(net, "forward_head"):
        raise InferError(f"{type(model).__name__}: neither an embed() method nor a timm "
                         "backbone (forward_features/forward_head); cannot embed with it")

    def forward(images, *_cell_type):
        return net.forward_head(net.forward_features(images), pre_logits=True)
    return forward


def resolve_checkpoint(run) -> str:
    """--run: a run folder (its checkpoints/best.pth) or a checkpoint file."""
    run = str(run)
    if os.path.isfile(run):
        return run
    ck = checkpoint_path(run)
    if os.path.isdir(run) and os.path.isfile(ck):
        return ck
    raise InferError(f"--run {run}: neither a checkpoint file nor a run folder holding "
                     "checkpoints/best.pth")


def embed(shards, run, out, labels=None, tta=None, batch_size=32, device=None,
          backend="auto", amp=None, num_workers=None, overwrite=False) -> dict | None:
    import shards as shards_pkg
    from train import load_for_inference

    tta, batch_size, num_workers = pass_options(tta, batch_size, num_workers, amp)
    ck = resolve_checkpoint(run)
    out = str(out)
    store = shards_pkg.open_store(str(shards))
    wells = store_wells(store.sites)
    if labels is not None:
        from infer.truth import read_truth
        truth = read_truth(labels)
        wells = apply_labels(wells, truth.labels, truth.path)
    d, dev = setup(device)
    model, rc = load_for_inference(ck, device=str(dev))
    views, amp_setting = run_tta(tta, rc), run_amp(amp, rc)
    meta = dict(store=store.root, store_sites_sha256=store.manifest["sites_table"]["sha256"],
                checkpoint=os.path.abspath(ck), checkpoint_sha256=sha256_file(ck),
                epoch=rc.get("epoch"), stage=rc.get("stage"), tta=views,
                channels=list(rc["channels"]), image_size=rc["image_size"], norm=rc["norm"],
                n_wells=len(wells))
    if d.rank == 0:
        _prepare_out(out, meta, overwrite)
    if d.enabled:
        torch_dist.barrier()

    forward = embedding_forward(model)
    experiments = list(dict.fromkeys(wells["experiment"]))
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    done = 0
    for i, exp in enumerate(experiments):
        part = _part_path(out, exp)
        if os.path.isfile(part):
            continue
        sel = wells[wells["experiment"] == exp].reset_index(drop=True)
        loader = well_loader(shards_pkg, str(shards), sel.assign(label=np.int64(-1)), rc,
                             batch_size, dev, d, backend, num_workers)
        emb, counts = predict_wells(model, loader, sel, views, dev, d, amp=amp_setting,
                                    desc=f"embed [{i + 1}/{len(experiments)}] {exp}",
                                    forward=forward)
        if d.rank == 0:
            check_counts(counts, sel, ck)
            write_atomic(part, lambda tmp, e=emb: np.save(tmp, e))
        if d.enabled:
            torch_dist.barrier()
        done += 1
        if kill_after and done == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    if d.rank != 0:
        return None
    x = np.concatenate([np.load(_part_path(out, e)) for e in experiments]).astype(np.float32)
    if len(x) != len(wells):  # parts are per experiment in store order: a part is stale
        raise InferError(f"{os.path.join(out, PARTS)}: {len(x)} rows for {len(wells)} wells; "
                         "parts of another run are there; embed again with --overwrite")
    _remove(os.path.join(out, EMB_ZARR))
    write_zarr(os.path.join(out, EMB_ZARR), x)
    write_wells(os.path.join(out, WELLS_CSV), wells)
    write_meta(out, dict(meta, dim=int(x.shape[1]), complete=True))
    labelled = int((wells["sirna"] >= 0).sum())
    print(f"{out}: {len(wells)} wells x {x.shape[1]} ({labelled} with a sirna), tta {views}")
    return dict(out=out, wells=len(wells), dim=int(x.shape[1]), labelled=labelled)


def _part_path(out: str, experiment: str) -> str:
    return os.path.join(out, PARTS, f"{experiment}.npy")


def _prepare_out(out: str, meta: dict, overwrite: bool) -> None:
    """Start, resume (same store, same checkpoint, same views) or, with overwrite, restart."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InferError(f"--out {out}: a file, not a directory")
    old = read_meta(out) if os.path.isdir(out) else None
    if old is None and os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise InferError(f"--out {out}: not empty and holds no embed.json; embed into a new "
                         "or empty directory")
    if old is not None and not overwrite:
        keys = ("store_sites_sha256", "checkpoint_sha256", "tta", "n_wells", "channels",
                "image_size", "norm")
        differ = [k for k in keys if old.get(k) != meta[k]]
        if differ:
            what = "another store" if "store_sites_sha256" in differ or "n_wells" in differ \
                else "another run or settings"
            raise InferError(f"--out {out}: holds embeddings of {what} ({', '.join(differ)} "
                             f"differ: was {old.get('store')}, {old.get('checkpoint')}); use "
                             "another --out, or --overwrite to replace them")
    if overwrite:
        for name in (PARTS, EMB_ZARR, WELLS_CSV):
            _remove(os.path.join(out, name))
    os.makedirs(os.path.join(out, PARTS), exist_ok=True)
    write_meta(out, dict(meta, complete=False))


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
