"""The 1st place's head (train.techniques.heads): neck, cell type, both heads on the
embedding, BatchNorm momentum, the fresh first conv; and the cell-type lookups."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn as nn

from common.errors import BadInput
from train.config_schema import ConfigError
from train.factory import create_model
from train.models import first_conv_name, head_parameter_names, n_input_channels
from train.techniques.heads import (arcface_params, cell_plus, cell_type_index,
                                    cell_types_of_rows, neck_params)

MODEL = "test_resnet"


def _model(**kw):
    torch.manual_seed(0)
    kw.setdefault("num_classes", 1139)
    return cell_plus(MODEL, n_channels=5, **kw).eval()


def test_the_neck_has_the_first_places_layers_and_shapes():
    m = create_model("cell_plus", model_name=MODEL, n_channels=6, num_classes=1139,
                     neck={"dim": 1024}, arcface=True, bn_momentum=0.05, first_conv="new")
    n_feat = m.backbone.num_features
    kinds = [type(x) for x in m.head.neck]
    assert kinds == [nn.BatchNorm1d, nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Linear, nn.BatchNorm1d]
    bn0, lin1, _, bn1, lin2, bn2 = m.head.neck
    assert bn0.num_features == n_feat + 4                   # pooled features + cell type
    assert (lin1.in_features, lin1.out_features, lin1.bias) == (n_feat + 4, 1024, None)
    assert (lin2.in_features, lin2.out_features, lin2.bias) == (1024, 1024, None)
    assert bn1.num_features == bn2.num_features == 1024
    assert m.head.classifier.in_features == 1024 and m.head.margin.weight.shape == (1139, 1024)
    bns = [x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) > 3 and all(b.momentum == 0.05 for b in bns)   # the backbone's too
    assert n_input_channels(m) == 6
    m.eval()
    x, ct = torch.randn(3, 6, 32, 32), torch.tensor([0, 1, 3])
    logits, cosine = m(x, ct, with_aux=True)
    assert logits.shape == cosine.shape == (3, 1139) and cosine.abs().max() <= 1
    emb = m.embed(x, ct)
    assert emb.shape == (3, 1024)
    assert torch.allclose(m.head.classifier(emb), logits, atol=1e-5)   # both heads read it


def test_default_bn_momentum_and_copied_rgb_filters_stay_the_references():
    m = create_model("cell_timm", model_name=MODEL, n_channels=5, num_classes=3)
    assert all(b.momentum == 0.1 for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    w = m.get_submodule(first_conv_name(m)).weight
    assert torch.equal(w[:, 3], w[:, 0]) and torch.equal(w[:, 4], w[:, 1])
    torch.manual_seed(1)
    fresh = create_model("cell_timm", model_name=MODEL, n_channels=5, num_classes=3,
                         first_conv="new").get_submodule(first_conv_name(m)).weight
    assert fresh.shape == w.shape and not torch.equal(fresh[:, 3], fresh[:, 0])


def test_the_cell_type_changes_the_logits_and_a_mixed_vector_is_taken():
    m = _model(neck=None)
    x = torch.randn(1, 5, 32, 32).expand(4, 5, 32, 32)
    logits = m(x, torch.arange(4))
    w = m.head.classifier.weight[:, -4:]
    assert torch.allclose(logits[1] - logits[0], w[:, 1] - w[:, 0], atol=1e-4)
    mixed = m(x[:1], torch.tensor([[0.25, 0.75, 0.0, 0.0]]))
    assert torch.allclose(mixed[0], 0.25 * logits[0] + 0.75 * logits[1], atol=1e-4)
    with pytest.raises(ValueError, match="cell type"):
        m(x)


def test_without_cell_type_neck_or_arcface_it_is_a_plain_classifier():
    m = _model(num_classes=7, cell_type_input=False)
    assert not m.takes_cell_type and m.head.margin is None
    logits, cosine = m(torch.randn(2, 5, 32, 32), with_aux=True)
    assert logits.shape == (2, 7) and cosine is None


def test_head_names_cover_neck_and_heads_and_control_weights_fit():
    m = _model(neck={"dim": 16}, arcface=True)
    head = head_parameter_names(m)
    assert head == {n for n, _ in m.named_parameters() if n.startswith("head.")}
    assert any(".neck." in n for n in head) and any(".margin." in n for n in head)
    control = create_model("cell_timm", model_name=MODEL, num_classes=31, n_channels=5)
    sd = m.plain_state_to_own(control.state_dict())
    assert set(sd) == {k for k in m.state_dict() if k.startswith("backbone.")}
    m.load_state_dict(sd, strict=False)
    first = first_conv_name(control) + ".weight"
    assert torch.equal(m.state_dict()["backbone." + first], control.state_dict()[first])


def test_cell_type_index_and_rows():
    assert cell_type_index(["HEPG2-01", "HUVEC-07", "RPE-03", "U2OS-01", "HUVEC-02"]).tolist() \
        == [0, 1, 2, 3, 1]
    with pytest.raises(BadInput, match="cell type MCF7 is none of"):
        cell_type_index(["MCF7-01"])
    sites = pd.DataFrame({"experiment": ["U2OS-01", "HEPG2-01", "RPE-02"], "row": [5, 0, 2]})
    lut = cell_types_of_rows(sites)
    assert lut[[0, 2, 5]].tolist() == [0, 2, 3] and lut[1] == -1


def test_head_params_errors():
    assert arcface_params(None) is None and neck_params(False) is None
    assert arcface_params({"m": 0.3}) == {"s": 30.0, "m": 0.3, "weight": 0.2}
    assert neck_params(True) == {"dim": 1024}
    with pytest.raises(ConfigError, match=r"model_params.arcface: unknown key\(s\) \['dim'\]"):
        arcface_params({"dim": 512})
    with pytest.raises(ConfigError, match=r"model_params.arcface.s 'big'"):
        arcface_params({"s": "big"})
    with pytest.raises(ConfigError, match=r"weight 2"):
        arcface_params({"weight": 2})
    with pytest.raises(ConfigError, match=r"model_params.neck.dim 1.5"):
        neck_params({"dim": 1.5})
