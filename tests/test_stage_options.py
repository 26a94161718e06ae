"""The NetVLAD stage's distillation options (issue 15): the Gram's scope and who mines."""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wakd.losses import attention_map
from wakd.models.backbones import Backbone
from wakd.models.netvlad import NetVLAD
from wakd.models.place_net import PlaceNet
from wakd.modules.place_module import PlaceModule, reference_gram_rows

B, N, P, C, K = 2, 3, 1, 8, 4  # tuples, negatives, soft positives, feature channels, clusters
T = 2 + N + P


def _net(conv: nn.Module | None = None) -> PlaceNet:
    """A PlaceNet whose backbone is the identity (or ``conv``) on feature-map 'images'."""
    torch.manual_seed(0 if conv is None else 1)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if conv is not None:
        layers["conv"] = conv
    backbone = Backbone("features", layers, C, 1)
    backbone.normalize = nn.Identity()
    return PlaceNet(backbone, NetVLAD(K, C))


def _module(**distill) -> PlaceModule:
    teacher = _net(nn.Conv2d(C, C, 3, padding=1))
    return PlaceModule(_net(), optimizer=torch.optim.SGD, loss={"hard": "triplet"}, schedule={"generations": 1},
                       distill=distill, teacher=teacher, pos_num=P)


def _gram(x: Tensor) -> Tensor:  # centred, each row L2-normalised
    x = x.flatten(1)
    x = x - x.mean(0)
    return F.normalize(x @ x.T, dim=1)


def _distill_by_hand(module: PlaceModule, images: Tensor, groups: list[Tensor]) -> Tensor:
    """The distillation term recomputed from the nets' outputs, one Gram per group of rows."""
    flat = images.flatten(0, 1)
    s, t = module.net.encode(flat), module.teacher.encode(flat)
    s_vlad, t_vlad = F.normalize(s.vlad, dim=2).flatten(1), F.normalize(t.vlad, dim=2).flatten(1)
    s_att, t_att = attention_map(s.features), attention_map(t.features)
    terms = [F.mse_loss(_gram(s_vlad[g]), _gram(t_vlad[g])) + F.mse_loss(_gram(s_att[g]), _gram(t_att[g]))
             for g in groups]
    return torch.stack(terms).mean()


def _step_distill(module: PlaceModule, images: Tensor) -> Tensor:
    logged: dict[str, Tensor] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)  # no Trainer here
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.training_step((images, torch.zeros(B, T, dtype=torch.long)), 0)
    return logged["train/loss_distill"]


@pytest.mark.parametrize("scope", ["tuple", "batch"])
def test_distillation_gram_scope(scope: str) -> None:
    module = _module(center=True, scope=scope)
    images = torch.rand(B, T, C, 6, 8)
    rows = reference_gram_rows(N, P)
    groups = [i * T + rows for i in range(B)] if scope == "tuple" else [torch.arange(B * T)]
    with torch.no_grad():
        expected = _distill_by_hand(module, images, groups)
    torch.testing.assert_close(_step_distill(module, images), expected)


def test_the_two_scopes_differ() -> None:
    images = torch.rand(B, T, C, 6, 8)
    per_tuple = _step_distill(_module(center=True, scope="tuple"), images)
    per_batch = _step_distill(_module(center=True, scope="batch"), images)
    assert abs(per_tuple.item() - per_batch.item()) > 1e-4


def test_mining_with_the_teacher() -> None:
    module = _module(mine_with="teacher")
    assert module.mining_net(0) is module.teacher
    student_mines = _module()
    assert student_mines.mining_net(0) is student_mines.net


@pytest.mark.parametrize(("kw", "message"), [
    ({"scope": "image"}, "module.distill.scope='image'"),
    ({"mine_with": "oracle"}, "module.distill.mine_with='oracle'"),
])
def test_unknown_stage_options_are_named(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        _module(**kw)


def test_mining_with_the_teacher_needs_one() -> None:
    with pytest.raises(ValueError, match="with a teacher"):
        PlaceModule(_net(), optimizer=torch.optim.SGD, schedule={"generations": 1}, distill={"mine_with": "teacher"})
