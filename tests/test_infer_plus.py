"""predict-all for runs of the plus recipe: 1139-class runs keep 1108 columns, the
cell type reaches a model that takes it, and the run's TTA default."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from infer import InferError
from infer.predict import Dist, predict_wells, run_tta, treatment_columns


def test_a_1139_class_run_keeps_its_first_1108_columns():
    logits = np.random.default_rng(0).normal(size=(5, 1139)).astype(np.float32)
    out, trained = treatment_columns(logits, {"label_offset": 0})
    assert out.shape == (5, 1108) and trained == 1139
    np.testing.assert_array_equal(out, logits[:, :1108])
    same, trained = treatment_columns(logits[:, :1108], {"label_offset": 0})
    assert same.shape == (5, 1108) and trained == 1108
    control = logits[:, :31]
    kept, trained = treatment_columns(control, {"label_offset": 1108})
    assert kept is control and trained == 31


def test_tta_default_is_the_runs():
    plain = {"config": {"part": "finetune"}}
    plus = {"config": {"part": "finetune", "plus": True}}
    assert run_tta(None, plain) == 1 and run_tta(None, {}) == 1
    assert run_tta(None, plus) == 8
    assert run_tta(None, {"config": {"predict_params": {"tta": 2}, "plus": True}}) == 2
    assert run_tta(1, plus) == 1                      # --tta overrides
    with pytest.raises(InferError, match=r"predict_params.tta 3 is none of"):
        run_tta(None, {"config": {"predict_params": {"tta": 3}}, "run_dir": "r"})


class _Loader:
    """Sites of three wells of three cell types; images all alike, rows in batches of 2."""

    def __init__(self):
        self.sites = pd.DataFrame({
            "row": np.arange(6),
            "id_code": np.repeat(["HEPG2-01_1_B02", "RPE-01_1_B02", "U2OS-02_1_B02"], 2),
            "experiment": np.repeat(["HEPG2-01", "RPE-01", "U2OS-02"], 2)})
        self.image = torch.randn(1, 5, 32, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return 3

    def __iter__(self):
        for rows in ([4, 0], [1, 5], [2, 3]):
            yield self.image.expand(2, -1, -1, -1), torch.zeros(2), torch.tensor(rows)


def test_predict_wells_gives_a_cell_type_model_each_sites_cell_type():
    from train.techniques.heads import cell_plus
    torch.manual_seed(0)
    model = cell_plus("test_resnet", num_classes=1139, n_channels=5).eval()
    loader = _Loader()
    wells = pd.DataFrame({"id_code": ["U2OS-02_1_B02", "HEPG2-01_1_B02", "RPE-01_1_B02"]})
    logits, counts = predict_wells(model, loader, wells, 1, torch.device("cpu"), Dist(),
                                   amp="none")
    assert counts.tolist() == [2, 2, 2]
    with torch.no_grad():
        want = model(loader.image.expand(3, -1, -1, -1), torch.tensor([3, 0, 2])).numpy()
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(logits[0], logits[1], atol=1e-3)
