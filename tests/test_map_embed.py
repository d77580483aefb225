"""infer embed on the tiny store: the wells table is the store's, DALI and torch give the same
embedding, a killed embed resumes to the same result, another store's output is refused."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from infer.embed import KILL_ENV
from infer.embeddings import read_embeddings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tiny_store, tmp_path_factory):
    """A control run on the tiny store, one epoch (the embedding needs weights, not skill)."""
    import train
    from prep.folds import write_folds
    tmp = tmp_path_factory.mktemp("embed_run")
    write_folds(tiny_data, n_folds=5, out_dir=str(tmp / "csv"))
    train.run("control", os.path.join(REPO, "configs", "control.yml"),
              overrides=os.path.join(REPO, "configs", "tiny.yml"), channels=[1, 2, 3, 4, 5],
              logdir=str(tmp / "logs"), shards=tiny_store, dotted={
                  "stages.data_params.image_size": 32, "stages.data_params.norm": "experiment",
                  "stages.data_params.train_csv": str(tmp / "csv" / "train_{fold}.csv"),
                  "stages.data_params.valid_csv": str(tmp / "csv" / "valid_{fold}.csv"),
                  "args.progress": False, "stages.stage1.state_params.num_epochs": 0})
    run = tmp / "logs" / "control" / "[1,2,3,4,5]" / "test_resnet"
    assert (run / "checkpoints" / "best.pth").is_file()
    return dict(run=str(run), tmp=tmp)


def _embed(store, run, out, *extra, env=None):
    e = dict(os.environ, PYTHONPATH=REPO)
    e.pop(KILL_ENV, None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "infer", "embed", "--shards", store, "--run",
                           run, "--out", str(out), *extra], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def torch_emb(tiny_run, tiny_store, tiny_data):
    out = tiny_run["tmp"] / "emb_torch"
    r = _embed(tiny_store, tiny_run["run"], out, "--backend", "torch", "--labels",
               os.path.join(tiny_data, "test_truth.csv"))
    assert r.returncode == 0, r.stderr[-2000:]
    return read_embeddings(str(out))


def test_wells_table_is_the_store_with_the_test_labels(torch_emb, tiny_store, tiny_data):
    from shards import open_store
    x, wells, meta = torch_emb
    sites = open_store(tiny_store).sites
    want = sites.drop_duplicates("id_code").reset_index(drop=True)
    assert list(wells["id_code"]) == list(want["id_code"])
    for c in ("experiment", "plate", "well", "cell_type", "well_type"):
        assert list(wells[c]) == list(want[c]), c
    truth = pd.read_csv(os.path.join(tiny_data, "test_truth.csv")).set_index("id_code")["sirna"]
    known = want["sirna"].to_numpy() >= 0
    assert np.array_equal(wells["sirna"].to_numpy()[known], want["sirna"].to_numpy()[known])
    test = ~known
    assert test.sum() == len(truth)
    assert np.array_equal(wells["sirna"].to_numpy()[test], truth.loc[wells["id_code"][test]])
    assert x.shape == (len(want), meta["dim"]) and x.dtype == np.float32
    assert np.isfinite(x).all() and x.std(0).max() > 0
    # the embedding is the classifier's input: the logits are a linear map of it
    from train import load_for_inference
    model, _ = load_for_inference(os.path.join(meta["checkpoint"]))
    head = model.get_classifier()
    assert head.in_features == x.shape[1]


def test_dali_and_torch_give_the_same_embedding(torch_emb, tiny_run, tiny_store):
    pytest.importorskip("nvidia.dali")
    out = tiny_run["tmp"] / "emb_dali"
    r = _embed(tiny_store, tiny_run["run"], out, "--backend", "dali")
    assert r.returncode == 0, r.stderr[-2000:]
    x_dali, wells, _ = read_embeddings(str(out))
    x_torch, wells_torch, _ = torch_emb
    assert list(wells["id_code"]) == list(wells_torch["id_code"])
    assert np.allclose(x_dali, x_torch, atol=1e-4), np.abs(x_dali - x_torch).max()


def test_a_killed_embed_resumes_to_the_same_embeddings(torch_emb, tiny_run, tiny_store,
                                                       tiny_data):
    out = tiny_run["tmp"] / "emb_killed"
    labels = os.path.join(tiny_data, "test_truth.csv")
    r = _embed(tiny_store, tiny_run["run"], out, "--backend", "torch", "--labels", labels,
               env={KILL_ENV: "2"})
    assert r.returncode != 0
    assert len(os.listdir(out / "parts")) == 2 and not (out / "embeddings.zarr").exists()
    r = _embed(tiny_store, tiny_run["run"], out, "--backend", "torch", "--labels", labels)
    assert r.returncode == 0, r.stderr[-2000:]
    x, wells, _ = read_embeddings(str(out))
    assert np.array_equal(x, torch_emb[0])
    assert wells.equals(torch_emb[1])


def test_embeddings_of_another_store_are_refused(torch_emb, tiny_run, tmp_path):
    from prep.pack import pack
    from prep.synth import synth
    synth(str(tmp_path / "data"), preset="tiny", seed=0, experiments=3, workers=1)
    other = tmp_path / "other_store"
    pack(str(tmp_path / "data"), str(other), workers=1, shard_size_mb=4, seed=0)
    out = tiny_run["tmp"] / "emb_torch"
    before = sorted(os.listdir(out))
    r = _embed(str(other), tiny_run["run"], out, "--backend", "torch")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "another store" in err[0], err
    assert sorted(os.listdir(out)) == before


def test_the_embedding_is_what_the_classifier_reads():
    import torch
    from infer.embed import embedding_forward
    from train.factory import create_model
    torch.manual_seed(0)
    model = create_model(model="cell_timm", model_name="test_resnet", num_classes=7,
                         n_channels=5, pretrained="none").eval()
    x = torch.randn(3, 5, 32, 32)
    with torch.no_grad():
        emb = embedding_forward(model)(x)
        assert torch.allclose(model.get_classifier()(emb), model(x), atol=1e-5)


def test_a_model_with_embed_gets_each_sites_cell_type():
    """A plus model's neck: embed(images, cell) with the per-sample cell-type index, as
    predict-all feeds the model's forward."""
    import torch
    from infer.embed import embedding_forward
    from infer.predict import Dist, predict_wells

    class CellNet(torch.nn.Module):
        takes_cell_type = True

        def forward(self, images, cell):
            raise AssertionError("embed, not forward, is averaged")

        def embed(self, images, cell):
            assert cell.dtype == torch.int64 and cell.shape == (len(images),)
            return torch.stack([images.mean((1, 2, 3)), cell.float()], 1)

        @staticmethod
        def cell_types_of_rows(sites):
            return np.array([0, 0, 3, 3], np.int64)

    sites = pd.DataFrame({"row": np.arange(4), "id_code": ["A-01_1_B02"] * 2 + ["D-01_1_B02"] * 2,
                          "site": [1, 2, 1, 2]})
    images = torch.arange(4, dtype=torch.float32)[:, None, None, None].expand(4, 1, 2, 2)
    loader = [(images[:3], torch.zeros(3), torch.tensor([0, 1, 2])),
              (images[3:], torch.zeros(1), torch.tensor([3]))]
    loader_obj = type("L", (), {"sites": sites, "__iter__": lambda self: iter(loader)})()
    wells = pd.DataFrame({"id_code": ["D-01_1_B02", "A-01_1_B02"]})
    model = CellNet()
    emb, counts = predict_wells(model, loader_obj, wells, 1, torch.device("cpu"), Dist(),
                                forward=embedding_forward(model))
    assert np.allclose(emb, [[2.5, 3.0], [0.5, 0.0]]) and list(counts) == [2, 2]
