"""CompositionalMuon on real model classes: transformers (Llama, Qwen2, Mistral, GPT-2) built from
small configs (no downloads), a timm-style ViT attention, and timm itself when it is installed."""

import pytest
import torch
from torch import nn

from compositional_muon import cm_qk
from compositional_muon.attention import AttentionSpec, find_attention
from compositional_muon.compositional import CompositionalMuon

EXACT = dict(msign_backend="svd")

transformers = pytest.importorskip("transformers")


def _hf_step_and_check(model, n_layers, kv_heads, heads=4):
    opt = CompositionalMuon.from_model(model, lr=0.02, track_stats=True)
    pairs = opt.param_groups[0]["cm_pairs"]
    assert len(pairs) == 2 * n_layers
    assert {p["num_kv_heads"] for p in pairs} == {kv_heads} and {p["num_heads"] for p in pairs} == {heads}
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert not torch.equal(before[n], p), f"{n} did not move"
    for name, st in opt.last_stats.items():
        assert (st["composed"] <= 0.02 + 1e-6).all(), name  # ||dM_h||_op <= eta
    return opt


def test_hf_llama_gqa():
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    torch.manual_seed(5)
    _hf_step_and_check(transformers.LlamaForCausalLM(cfg), 2, 2)


def test_hf_qwen2_mqa_with_qkv_bias_and_mistral():
    torch.manual_seed(6)
    q = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=1,
            vocab_size=100,
        )
    )
    opt = _hf_step_and_check(q, 1, 1)
    kinds = {n: k for n, k, _ in opt.routing}
    assert kinds["model.layers.0.self_attn.q_proj.bias"] == "adamw"
    mi = transformers.MistralForCausalLM(
        transformers.MistralConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
        )
    )
    _hf_step_and_check(mi, 1, 2)


def test_hf_gpt2_conv1d_views():
    torch.manual_seed(7)
    g = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    )
    opt = _hf_step_and_check(g, 2, 4)
    kinds = {n: k for n, k, _ in opt.routing}
    assert kinds["transformer.h.0.attn.c_attn.weight"] == "cm" and kinds["transformer.h.0.mlp.c_fc.weight"] == "muon"
    assert kinds["transformer.wte.weight"] == "adamw"
    # the Conv1D (in x out) update equals CM applied to the nn.Linear-layout copy of the weights
    attn = g.transformer.h[0].attn
    W = attn.c_attn.weight.detach().clone().double()
    Gr = torch.randn_like(W)
    P = attn.c_proj.weight.detach().clone().double()
    spec = AttentionSpec.fused("x", W, P, num_heads=4, transposed=True)
    W.grad, P.grad = Gr, torch.randn_like(P)
    o = CompositionalMuon([dict(kind="cm", attention=[spec], **EXACT)])
    Wl, Gl = W.detach().T.clone(), Gr.T.clone()
    o.step()
    D = 64
    cm_qk(
        Wl[:D],
        Wl[D : 2 * D],
        Gl[:D],
        Gl[D : 2 * D],
        torch.zeros(D, D, dtype=W.dtype),
        torch.zeros(D, D, dtype=W.dtype),
        head_dim=16,
        eta=0.02,
        **EXACT,
    )
    torch.testing.assert_close(W.T[: 2 * D], Wl[: 2 * D])


def test_vit_style_fused_qkv_with_bias():
    # timm's Attention layout: qkv Linear(D, 3D) with bias, proj Linear, num_heads/head_dim attributes.
    class ViTAttn(nn.Module):
        def __init__(self, D=48, H=3):
            super().__init__()
            self.num_heads, self.head_dim = H, D // H
            self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    m = nn.Sequential(nn.Linear(10, 48), ViTAttn(), nn.Linear(48, 5))
    specs = find_attention(m)
    assert len(specs) == 1 and specs[0].num_heads == 3 and specs[0].head_dim == 16
    opt = CompositionalMuon.from_model(m, adamw_patterns=("2.*",))
    kinds = {n: k for n, k, _ in opt.routing}
    assert kinds == {
        "0.weight": "muon",
        "0.bias": "adamw",
        "1.qkv.weight": "cm",
        "1.qkv.bias": "adamw",
        "1.proj.weight": "cm",
        "1.proj.bias": "adamw",
        "2.weight": "adamw",
        "2.bias": "adamw",
    }


def test_timm_vit_if_installed():
    timm = pytest.importorskip("timm")
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8, depth=2)
    opt = CompositionalMuon.from_model(m)
    assert len(opt.param_groups[0]["cm_pairs"]) == 4
