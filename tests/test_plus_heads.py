"""The plus head (train.heads): cell type into the classifier, ArcFace branch, shapes."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from common.errors import BadInput
from train.config_schema import ConfigError
from train.heads import (PlusNet, arcface_params, cell_plus, cell_type_index,
                         cell_types_of_rows)
from train.models import create_model, first_conv_name, head_parameter_names, n_input_channels

MODEL = "test_resnet"


def _model(**kw):
    torch.manual_seed(0)
    kw.setdefault("num_classes", 1139)
    return cell_plus(MODEL, n_channels=5, **kw).eval()


def test_shapes_and_the_1139_class_head():
    m = _model(arcface=True)
    x = torch.randn(3, 5, 32, 32)
    ct = torch.tensor([0, 1, 3])
    logits = m(x, ct)
    assert logits.shape == (3, 1139)
    logits2, cosine = m(x, ct, with_aux=True)
    assert torch.equal(logits, logits2) and cosine.shape == (3, 1139)
    assert n_input_channels(m) == 5
    loss = m.aux_loss(cosine, torch.tensor([0, 1108, 1138]))
    assert loss.item() > 0 and m.arcface_weight == 0.2


def test_the_cell_type_input_changes_the_logits():
    m = _model()
    assert m.takes_cell_type
    x = torch.randn(1, 5, 32, 32).expand(4, 5, 32, 32)
    logits = m(x, torch.arange(4))
    # same image, four cell types: four different rows, differing by the one-hot's weights
    for i in range(1, 4):
        assert not torch.allclose(logits[0], logits[i])
    w = m.head.classifier.weight[:, -4:]
    assert torch.allclose(logits[1] - logits[0], w[:, 1] - w[:, 0], atol=1e-4)
    with pytest.raises(ValueError, match="cell_type_idx"):
        m(x)


def test_without_cell_type_or_arcface_it_is_a_plain_classifier():
    m = _model(num_classes=7, cell_type_input=False)
    assert not m.takes_cell_type and m.head.arcface is None
    x = torch.randn(2, 5, 32, 32)
    logits, cosine = m(x, with_aux=True)
    assert logits.shape == (2, 7) and cosine is None
    assert m.aux_loss(cosine, torch.tensor([0, 1])).item() == 0.0


def test_head_names_cover_classifier_and_arcface_and_control_weights_fit():
    m = _model(arcface={"dim": 16})
    head = head_parameter_names(m)
    assert head == {n for n, _ in m.named_parameters() if n.startswith("head.")}
    assert any(".arcface." in n for n in head) and any(".classifier." in n for n in head)
    assert m.head.arcface.neck[1].num_features == 16
    # the control model (a plain 31-class cell_timm) gives the backbone, not the head
    control = create_model("cell_timm", model_name=MODEL, num_classes=31, n_channels=5)
    sd = m.plain_state_to_own(control.state_dict())
    own = m.state_dict()
    assert set(sd) == {k for k in own if k.startswith("backbone.")}
    m.load_state_dict(sd, strict=False)
    first = first_conv_name(control) + ".weight"
    assert torch.equal(m.state_dict()["backbone." + first], control.state_dict()[first])


def test_cell_type_index_and_rows():
    assert cell_type_index(["HEPG2-01", "HUVEC-07", "RPE-03", "U2OS-01", "HUVEC-02"]).tolist() \
        == [0, 1, 2, 3, 1]
    with pytest.raises(BadInput, match="cell type MCF7 is none of"):
        cell_type_index(["MCF7-01"])
    with pytest.raises(BadInput, match="not '<cell type>-<nn>'"):
        cell_type_index(["hepg2_1"])
    sites = pd.DataFrame({"experiment": ["U2OS-01", "HEPG2-01", "RPE-02"], "row": [5, 0, 2]})
    lut = cell_types_of_rows(sites)
    assert lut[[0, 2, 5]].tolist() == [0, 2, 3] and lut[1] == -1
    assert cell_types_of_rows(sites.drop(columns="row")).tolist() == [3, 0, 2]


def test_arcface_params_errors():
    assert arcface_params(None) is None and arcface_params(False) is None
    assert arcface_params({"m": 0.3}) == {"s": 30.0, "m": 0.3, "dim": 512, "weight": 0.2}
    with pytest.raises(ConfigError, match=r"model_params.arcface: unknown key\(s\) \['margin'\]"):
        arcface_params({"margin": 0.5})
    with pytest.raises(ConfigError, match=r"model_params.arcface.s 'big'"):
        arcface_params({"s": "big"})
    assert isinstance(_model(arcface=None), PlusNet)
