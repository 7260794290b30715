"""Per-head QK-clip: recomputed max logits land on tau, heads under tau are untouched bit for bit,
GQA policies, fused Conv1D + bias, the HF recording attention, and training with Muon / per-head / CM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compositional_muon import AttentionSpec, QKClip
from compositional_muon.qk_clip import hf_recording_attention, max_logits
from compositional_muon.training.models import build_model
from compositional_muon.training.models.layers import CausalSelfAttention


def _gpt(n_kv_head, seed=0, n_layer=1):
    """One layer: clipping a layer changes the inputs of the layers after it, so the recomputed
    maxima are compared on a layer whose inputs stay put."""
    torch.manual_seed(seed)
    return build_model("gpt", n_layer=n_layer, n_embd=32, n_head=4, n_kv_head=n_kv_head, block_size=16).double()


def _record(model, idx):
    model(idx)
    return {n: m.max_logits.clone() for n, m in model.named_modules() if isinstance(m, CausalSelfAttention)}


@pytest.mark.parametrize("n_kv_head,gqa", [(4, "query"), (2, "query"), (2, "group"), (1, "group")])
def test_clipped_heads_land_on_tau_and_the_rest_are_bit_identical(n_kv_head, gqa):
    model = _gpt(n_kv_head)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.q_proj.weight.mul_(60.0)  # large logits in every layer
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    clip = QKClip.from_model(model, tau=1.0, gqa=gqa)
    before = _record(model, idx)
    tau = float(torch.cat(list(before.values())).median())  # about half the heads are over tau
    clip.tau = tau
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    n = clip.clip()
    assert n > 0 and clip.last_max == pytest.approx(max(float(v.max()) for v in before.values()))
    after = _record(model, idx)
    d = 8
    for name, s in before.items():
        attn = model.get_submodule(name)
        over = s > tau
        s2 = after[name]
        assert float(s2.max()) <= tau * (1 + 1e-10)
        G = 4 // n_kv_head
        wq, wq0 = attn.q_proj.weight, w0[name + ".q_proj.weight"]
        wk, wk0 = attn.k_proj.weight, w0[name + ".k_proj.weight"]
        for h in range(4):
            rows = slice(h * d, (h + 1) * d)
            if over[h]:
                if G == 1 or gqa == "query" or float(s[h]) == float(s.view(n_kv_head, G)[h // G].max()):
                    assert float(s2[h]) == pytest.approx(tau, rel=1e-10)  # the worst head of its group: exactly tau
            else:
                assert torch.equal(wq[rows], wq0[rows])  # a head under tau: its query slice untouched
                if G == 1 or gqa == "query":
                    assert torch.equal(s2[h], s[h])  # and (key untouched) its logits too
        for g in range(n_kv_head):
            rows = slice(g * d, (g + 1) * d)
            group_over = bool(over[g * G : (g + 1) * G].any())
            if gqa == "query" and G > 1 or not group_over:
                assert torch.equal(wk[rows], wk0[rows])
        for p in ("v_proj", "o_proj"):
            assert torch.equal(getattr(attn, p).weight, w0[f"{name}.{p}.weight"])


def test_off_by_default_and_errors():
    model = _gpt(4, n_layer=2)
    model(torch.zeros(1, 4, dtype=torch.long))
    assert all(getattr(m, "max_logits", None) is None for m in model.modules())
    clip = QKClip.from_model(model, tau=5.0)
    with pytest.raises(ValueError, match="no max logits"):
        clip.clip()
    with pytest.raises(ValueError, match="tau"):
        QKClip.from_model(model, tau=0.0)
    with pytest.raises(ValueError, match="gqa"):
        QKClip.from_model(model, tau=1.0, gqa="key")
    with pytest.raises(ValueError, match="NaN"):
        clip.clip({n: torch.full((4,), float("nan")) for n in ("blocks.0.attn", "blocks.1.attn")})


class Conv1D(nn.Module):
    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(nf, dtype=torch.float64))

    def forward(self, x):
        return x @ self.weight + self.bias


class GPT2Attn(nn.Module):
    def __init__(self, D=12, H=3):
        super().__init__()
        self.n_head = H
        self.c_attn, self.c_proj = Conv1D(3 * D, D), Conv1D(D, D)

    def logits_max(self, x):
        B, T, D = x.shape
        q, k, _ = self.c_attn(x).split(D, dim=2)
        sh = lambda t: t.view(B, T, self.n_head, -1).transpose(1, 2)  # noqa: E731
        return max_logits(sh(q), sh(k), (D // self.n_head) ** -0.5)


def test_fused_conv1d_with_bias_and_passed_in_logits():
    torch.manual_seed(0)
    attn = GPT2Attn()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    s = attn.logits_max(x)
    tau = float(s.min() + s.max()) / 2
    clip = QKClip.from_model(attn, tau)
    assert clip.layers[0].name == ""
    w0, b0 = attn.c_attn.weight.detach().clone(), attn.c_attn.bias.detach().clone()
    clip.clip({"": s})
    s2 = attn.logits_max(x)
    for h in range(3):
        if s[h] > tau:
            assert float(s2[h]) == pytest.approx(tau, rel=1e-10)
        else:
            assert torch.equal(s2[h], s[h])
            cols = [c for c in range(36) if c // 4 in (h, 3 + h)]  # q and k columns of head h
            assert torch.equal(attn.c_attn.weight[:, cols], w0[:, cols])
            assert torch.equal(attn.c_attn.bias[cols], b0[cols])
    assert torch.equal(attn.c_attn.weight[:, 24:], w0[:, 24:])  # v untouched


def test_hf_recording_attention_matches_sdpa_and_records_the_max():
    torch.manual_seed(0)
    mod = nn.Module()
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.zeros(5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))[None, None]
    out, _ = hf_recording_attention(mod.eval(), q, k, v, mask, scaling=8**-0.5)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
    s = (q @ k.repeat_interleave(2, 1).mT) * 8**-0.5
    want = s.masked_fill(mask == float("-inf"), float("-inf")).amax((0, 2, 3))
    torch.testing.assert_close(mod.max_logits, want)


@pytest.mark.parametrize("name", ["muon", "muon-per-head", "cm"])
def test_training_with_clip_keeps_every_max_logit_under_tau(name, one_thread):
    from compositional_muon.training.recipes import build_optimizer

    torch.manual_seed(0)
    model = build_model("gpt", n_layer=1, n_embd=32, n_head=4, n_kv_head=2, block_size=16)
    opt = build_optimizer(name, model, lr=0.05, adamw_lr=1e-2, options=dict(msign_dtype=torch.float32))
    clip = QKClip.from_model(model, tau=1.0)
    data = torch.randint(0, 16, (4, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(data[:, :-1])
    clip.tau = tau = 0.7 * float(model.blocks[0].attn.max_logits.max())
    scaled = 0
    for _ in range(6):
        opt.zero_grad()
        _, loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        with torch.no_grad():
            model(data[:, :-1])  # the logits of the weights the clip sees
        scaled += clip.clip()
        with torch.no_grad():
            model(data[:, :-1])
        assert float(model.blocks[0].attn.max_logits.max()) <= tau * (1 + 1e-4)
    assert scaled > 0
    assert isinstance(clip.layers[0].spec, AttentionSpec)


def test_transformers_llama_gqa_rope_through_the_recording_attention(one_thread):
    transformers = pytest.importorskip("transformers")
    from compositional_muon.qk_clip import install_hf_logit_recorder

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    ref = model(input_ids=ids).logits
    install_hf_logit_recorder(model)
    torch.testing.assert_close(model(input_ids=ids).logits, ref)  # same attention as eager
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.weight.mul_(30.0)
    model(input_ids=ids)
    s = attn.max_logits.clone()
    tau = float(s.median())
    clip = QKClip.from_model(model, tau)
    assert clip.clip() > 0
    model(input_ids=ids)
    for h in range(4):
        if s[h] > tau:
            assert float(attn.max_logits[h]) == pytest.approx(tau, rel=1e-9)
        else:
            assert torch.equal(attn.max_logits[h], s[h])
