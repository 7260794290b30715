"""Expert stacks: explicit 3-D layouts, per-expert msign == a loop over experts, the MoE GPT trains
with Muon, per-head Muon and CM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compositional_muon import CompositionalMuon, Muon, NorMuon, PerHeadMuon, mark_layouts
from compositional_muon.layouts import layout_of, resolve_layout, tag
from compositional_muon.training.models import MoEGPT, MoEGPTConfig, build_model

F64 = torch.float64


def polar(x):
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("layout", ["experts", "experts_transposed"])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_per_expert_msign_equals_a_loop_over_experts(layout, adjust):
    E, out_, in_ = 3, 5, 8
    g = torch.Generator().manual_seed(0)
    shape = (E, out_, in_) if layout == "experts" else (E, in_, out_)
    w = nn.Parameter(torch.randn(shape, generator=g, dtype=F64))
    ref = w.detach().clone()
    opt = Muon(
        [dict(params=[w], tensor_layout=layout)],
        lr=0.1,
        nesterov=False,
        momentum=0.5,
        backend="svd",
        adjust_lr_fn=adjust,
    )
    buf = torch.zeros_like(ref)
    for _ in range(2):
        grad = torch.randn(shape, generator=g, dtype=F64)
        w.grad = grad.clone()
        opt.step()
        buf = 0.5 * buf + 0.5 * grad
        for e in range(E):
            m = buf[e] if layout == "experts" else buf[e].T  # expert e as out x in
            s = max(1.0, out_ / in_) ** 0.5 if adjust == "original" else 0.2 * max(out_, in_) ** 0.5
            z = polar(m) * s
            ref[e] -= 0.1 * (z if layout == "experts" else z.T)
    torch.testing.assert_close(w.detach(), ref, rtol=1e-12, atol=1e-12)


def test_ambiguous_3d_is_refused_naming_the_option_and_conv_still_flattens():
    w = nn.Parameter(torch.randn(4, 3, 5))
    with pytest.raises(ValueError, match="tensor_layout="):
        Muon([w])
    Muon([dict(params=[w], tensor_layout="conv")])  # explicit: one (4, 15) matrix
    conv = nn.Conv1d(3, 4, 5)
    assert mark_layouts(conv) == {"weight": "conv"} and layout_of(conv.weight) == "conv"
    Muon([conv.weight])
    assert resolve_layout(torch.zeros(2, 3, 4, 5), "auto") == "conv"  # 4-D: a conv kernel
    with pytest.raises(ValueError, match="3-D"):
        Muon([dict(params=[torch.zeros(2, 3, 4, 5, requires_grad=True)], tensor_layout="experts")])
    e = nn.Parameter(torch.randn(2, 3, 4))
    tag(e, "experts")
    with pytest.raises(ValueError, match="no per-expert rule"):
        NorMuon([e])


def test_mark_layouts_knows_transformers_style_expert_modules():
    class MixtralExperts(nn.Module):  # transformers' naming: (E, 2I, D) and (E, D, I)
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(4, 6, 8))
            self.down_proj = nn.Parameter(torch.zeros(4, 8, 3))

    class GptOssExperts(MixtralExperts):
        is_transposed = True

    m = nn.ModuleDict(dict(a=MixtralExperts(), b=GptOssExperts()))
    got = mark_layouts(m)
    assert got == {
        "a.gate_up_proj": "experts",
        "a.down_proj": "experts",
        "b.gate_up_proj": "experts_transposed",
        "b.down_proj": "experts_transposed",
    }


def _model():
    torch.manual_seed(0)
    return build_model("moe-gpt", n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_experts=4, top_k=2, block_size=16)


def test_moe_gpt_forward_aux_loss_and_layouts():
    model = _model()
    idx = torch.randint(0, 256, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 256) and torch.isfinite(loss)
    ll = model.last_losses
    assert ll["aux"] > 0
    assert abs(ll["loss"] - (ll["ce"] + 0.01 * ll["aux"])) < 1e-5
    assert set(mark_layouts(model).values()) == {"experts"}
    with pytest.raises(ValueError, match="top_k"):
        MoEGPTConfig(n_experts=2, top_k=3)
    assert isinstance(model, MoEGPT)


@pytest.mark.parametrize("name", ["muon", "muon-per-head", "cm"])
def test_moe_gpt_trains(name, one_thread):
    from compositional_muon.training.recipes import build_optimizer

    model = _model()
    opt = build_optimizer(name, model, lr=0.02, adamw_lr=3e-3, options=dict(msign_dtype=torch.float32))
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 16, (8, 17), generator=g)  # a small alphabet: learnable in a few steps
    losses = []
    for _ in range(12):
        opt.zero_grad()
        _, loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    ups = [b.moe.experts.up for b in model.blocks]
    assert all(torch.isfinite(u).all() for u in ups)
    assert isinstance(opt, (Muon, PerHeadMuon, CompositionalMuon))


def test_transformers_mixtral_experts_are_found_and_stepped_per_expert(one_thread):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=3,
        num_experts_per_tok=2,
        vocab_size=32,
    )
    model = transformers.MixtralForCausalLM(cfg)  # float32: its grouped-mm experts take no float64
    tags = mark_layouts(model)
    stacks = {n: p for n, p in model.named_parameters() if p.ndim == 3}
    assert stacks and set(tags) == set(stacks) and set(tags.values()) == {"experts"}
    opt = PerHeadMuon.from_model(model, lr=0.1, backend="svd", nesterov=False, momentum=0.0)
    before = {n: p.detach().clone() for n, p in stacks.items()}
    ids = torch.randint(0, 32, (4, 32))  # enough tokens per expert for full-rank expert gradients
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in stacks.items()}
    opt.step()
    for n, p in stacks.items():
        for e in range(p.size(0)):
            m, k = p.shape[1:]
            want = before[n][e] - 0.1 * max(1.0, m / k) ** 0.5 * polar(grads[n][e])
            torch.testing.assert_close(p.detach()[e], want, rtol=1e-5, atol=1e-6)
