"""The ranges table (validation.py) and issue 12's keys: tensor_layout, CM's adjust_lr_fn, PerHeadMuon's kinds."""

import pytest
import torch
from torch import nn

from compositional_muon import CompositionalMuon, Muon
from compositional_muon.attention import find_attention
from compositional_muon.compositional import KINDS
from compositional_muon.layouts import TENSOR_LAYOUTS
from compositional_muon.muon import ADJUST_LR_FNS
from compositional_muon.per_head import PER_HEAD_KINDS, PerHeadMuon
from compositional_muon.rms_match import CM_ADJUST_LR_FNS
from compositional_muon.validation import RANGES


class Attn(nn.Module):
    def __init__(self, D=16, H=4):
        super().__init__()
        self.head_dim, self.num_heads, self.num_kv_heads = D // H, H, H
        self.q_proj, self.k_proj = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
        self.v_proj, self.o_proj = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)


class Tiny(nn.Module):
    def __init__(self, D=16):
        super().__init__()
        self.attn = Attn(D)
        self.mlp = nn.Linear(D, D, bias=False)
        self.experts = nn.Parameter(torch.randn(3, 8, D) * 0.1)  # (E, out, in) stack
        self.norm = nn.LayerNorm(D)


def _grads(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_table_choices_come_from_their_modules():
    assert RANGES["tensor_layout"].choices() == TENSOR_LAYOUTS
    assert set(RANGES["kind"].choices()) == set(KINDS) | set(PER_HEAD_KINDS)
    assert RANGES["adjust_lr_fn"].choices() == ADJUST_LR_FNS == CM_ADJUST_LR_FNS


@pytest.mark.parametrize("layout", ["experts", "experts_transposed", "auto"])
def test_valid_tensor_layouts_are_accepted(layout):
    m = Tiny()
    if layout == "auto":  # auto needs the tag: untagged 3-D stacks are refused by the layout check
        with pytest.raises(ValueError, match="tensor_layout"):
            Muon([dict(params=[m.experts], tensor_layout=layout)])
        return
    opt = Muon([dict(params=[m.experts], tensor_layout=layout)])
    _grads(m)
    before = m.experts.detach().clone()
    opt.step()
    assert not torch.equal(before, m.experts) and torch.isfinite(m.experts).all()


def test_bad_tensor_layout_is_named_by_the_table_and_writes_nothing():
    m = Tiny()
    with pytest.raises(ValueError, match=r"^Muon: param group 0: `tensor_layout` = 'bogus': unknown tensor_layout"):
        Muon([dict(params=[m.experts], tensor_layout="bogus")])
    opt = Muon([dict(params=[m.experts], tensor_layout="experts")])
    _grads(m)
    opt.param_groups[0]["tensor_layout"] = "bogus"
    before = m.experts.detach().clone()
    with pytest.raises(ValueError, match=r"^Muon: param group 0: `tensor_layout`"):
        opt.step()
    assert torch.equal(before, m.experts) and not opt.state


def test_cm_adjust_lr_fn_checked_by_the_table():
    m = Tiny()
    specs = find_attention(m)
    with pytest.raises(ValueError, match=r"^CompositionalMuon: param group 0: `adjust_lr_fn` = 'bogus'"):
        CompositionalMuon([dict(kind="cm", attention=specs, adjust_lr_fn="bogus")])
    opt = CompositionalMuon([dict(kind="cm", attention=specs, adjust_lr_fn="match_rms_adamw", lr=0.01)])
    _grads(m)
    opt.step()
    opt.param_groups[0]["adjust_lr_fn"] = "rms"
    before = m.attn.q_proj.weight.detach().clone()
    _grads(m, 1)
    with pytest.raises(ValueError, match=r"`adjust_lr_fn` = 'rms'"):
        opt.step()
    assert torch.equal(before, m.attn.q_proj.weight)


def test_per_head_group_kinds():
    m = Tiny()
    heads = dict(kind="heads", attention=find_attention(m))
    opt = PerHeadMuon([heads, dict(kind="muon", params=[m.mlp.weight]), dict(kind="adamw", params=[m.norm.weight])])
    assert [g["kind"] for g in opt.param_groups] == ["heads", "muon", "adamw"]
    assert [g["use_muon"] for g in opt.param_groups] == [True, True, False]
    with pytest.raises(ValueError, match="PerHeadMuon: unknown param group kind 'cm'"):
        PerHeadMuon([dict(kind="cm", params=[m.mlp.weight])])
    with pytest.raises(ValueError, match="a kind='adamw' group cannot set use_muon=True"):
        PerHeadMuon([dict(kind="adamw", use_muon=True, params=[m.mlp.weight])])
    _grads(m)
    opt.param_groups[0]["kind"] = "bogus"
    with pytest.raises(ValueError, match=r"^PerHeadMuon: param group 0: `kind` = 'bogus'"):
        opt.step()
