"""The example models: shapes, init loss, training, causality, GQA, init options, RoPE, generation,
configs, and the attention layout the optimizer relies on."""

import math

import pytest
import torch
from torch import nn

from compositional_muon import CompositionalMuon, find_attention
from compositional_muon.training.models import (
    GPT,
    MODELS,
    CausalSelfAttention,
    GPTConfig,
    LoopFormer,
    LoopFormerConfig,
    MoR,
    MoRConfig,
    build_model,
)
from compositional_muon.training.models.layers import apply_rope

NAMES = ["gpt", "loopformer", "mor", "moe-gpt"]
TINY = dict(n_embd=32, n_head=4, n_layer=2, block_size=32)
EXTRA = {
    "gpt": {},
    "loopformer": dict(n_layer=1, n_loops=4),
    "mor": dict(n_layer=1, n_recursions=3),
    "moe-gpt": dict(n_experts=3, top_k=2),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name, **kw):
    torch.manual_seed(0)
    return build_model(name, **{**TINY, **EXTRA[name], **kw})


def tokens(B=2, T=16, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_init_loss(name):
    m = tiny(name)
    x = tokens()
    logits, loss = m(x, x)
    assert logits.shape == (2, 16, 256)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert abs(m.last_losses["ce"] - math.log(256)) < 0.25
    assert all(isinstance(v, float) for v in m.last_losses.values())
    logits2, none = m(x)
    assert none is None and logits2.shape == (2, 16, 256)


@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases_on_a_repeated_batch(name):
    m = tiny(name)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x, y = tokens(T=24), tokens(T=24, seed=2)
    first = None
    for _ in range(30):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = m.last_losses["ce"] if first is None else first
    assert m.last_losses["ce"] < first - 1.0, (first, m.last_losses)


def _earlier_logits_change(m, x, j):
    """Max change of the logits before position j when token j is replaced (several values)."""
    base, _ = m(x)
    worst = 0.0
    for v in range(0, 256, 17):
        x2 = x.clone()
        x2[:, j] = v
        worst = max(worst, (m(x2)[0][:, :j] - base[:, :j]).abs().max().item())
    return worst


@pytest.mark.parametrize("name", ["gpt", "loopformer"])
@pytest.mark.parametrize("train", [False, True])
def test_causal_exactly(name, train):
    m = tiny(name).double().train(train)
    with torch.no_grad():
        assert _earlier_logits_change(m, tokens(T=20), 12) < 1e-12
        if name == "loopformer" and train:  # training forward with targets returns the long trajectory
            x = tokens(T=20)
            base = m(x, x)[0]
            x2 = x.clone()
            x2[:, 12] = (x2[:, 12] + 1) % 256
            assert (m(x2, x)[0][:, :12] - base[:, :12]).abs().max() < 1e-12


def test_mor_expert_choice_is_not_causal_but_threshold_routing_is():
    # Expert choice ranks a token against the whole sequence, so a later token can push an earlier one
    # out of the top-k: the logits before it change (training mode and eval_routing="topk").
    m = tiny("mor").double()
    x = tokens(T=20)
    with torch.no_grad():
        assert _earlier_logits_change(m.train(), x, 15) > 1e-6
        assert _earlier_logits_change(m.eval(), x, 15) > 1e-6
        # eval_routing="threshold" decides per token from its own state: strictly causal
        m.config.eval_routing = "threshold"
        assert _earlier_logits_change(m.eval(), x, 15) < 1e-12


def test_mor_threshold_path_matches_topk_path_when_everything_is_selected():
    m = tiny("mor", capacities=(1.0, 1.0, 1.0)).double().eval()
    x = tokens()
    with torch.no_grad():
        a = m(x)[0]
        m.config.eval_routing = "threshold"
        b = m(x)[0]
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_mor_routing_and_aux_loss():
    m = tiny("mor")
    x = tokens(T=24)
    _, loss = m(x, x)
    ll = m.last_losses
    assert [ll[f"frac_{r}"] for r in range(3)] == [1.0, 16 / 24, 8 / 24]
    assert ll["router_bce"] > 0
    assert loss.item() == pytest.approx(ll["ce"] + 0.001 * ll["router_bce"], rel=1e-5)
    loss.backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in m.routers)
    m.eval()
    _, loss = m(x, x)
    assert loss.item() == pytest.approx(m.last_losses["ce"])
    cyc = tiny("mor", sharing="cycle")
    assert cyc.first is None and cyc.last is None and len(find_attention(cyc)) == 1
    assert len(find_attention(m)) == 3


def test_loopformer_objective_and_schedules():
    m = tiny("loopformer")
    m.generator = torch.Generator().manual_seed(0)
    x = tokens()
    _, loss = m(x, x)
    ll = m.last_losses
    assert loss.item() == pytest.approx(ll["ce"] + 0.1 * ll["ce_short"] + 0.1 * ll["consistency"], rel=1e-5)
    for kind in ("random", "equal"):
        m.config.short_trajectory = kind
        for _ in range(20):
            s = m.sample_short_schedule()
            assert 1 <= len(s) < 4 and sum(s) == pytest.approx(1.0) and all(v > 0 for v in s)
            assert all(abs(v * 4 - round(v * 4)) < 1e-9 for v in s) or kind == "equal"
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    m.generator = g1
    a = [m.sample_short_schedule() for _ in range(5)]
    m.generator = g2
    assert a == [m.sample_short_schedule() for _ in range(5)]
    m.eval()
    for blk in m.blocks:  # at init the zero adaLN gates make every schedule the identity map
        nn.init.normal_(blk.ada.weight, std=0.1)
    full = m(x)[0]
    assert torch.allclose(full, m(x, schedule=[0.25] * 4)[0])
    assert not torch.allclose(full, m(x, schedule=[0.5, 0.5])[0])
    with pytest.raises(ValueError, match="summing to 1"):
        m(x, schedule=[0.5, 0.4])
    m.train()
    with pytest.raises(ValueError, match="eval mode"):
        m(x, x, schedule=[1.0])


def test_loopformer_adaln_starts_at_zero():
    m = tiny("loopformer")
    for blk in m.blocks:
        assert blk.ada.weight.abs().sum() == 0 and blk.ada.bias.abs().sum() == 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_gqa_shapes(name, n_kv_head):
    m = tiny(name, n_kv_head=n_kv_head)
    attns = [a for a in m.modules() if isinstance(a, CausalSelfAttention)]
    for a in attns:
        assert a.q_proj.weight.shape == (32, 32)
        assert a.k_proj.weight.shape == a.v_proj.weight.shape == (n_kv_head * 8, 32)
        assert a.o_proj.weight.shape == (32, 32)
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (4, n_kv_head, 8)
    specs = find_attention(m)
    assert specs and all(s.num_kv_heads == n_kv_head and s.num_heads == 4 for s in specs)
    assert m(tokens(), tokens())[0].shape == (2, 16, 256)


@pytest.mark.parametrize("name", NAMES)
def test_zero_init_o(name):
    m = tiny(name, zero_init_o=True)
    outs = [mod.o_proj.weight for mod in m.modules() if hasattr(mod, "o_proj")]
    outs += [mod.down_proj.weight for mod in m.modules() if hasattr(mod, "down_proj")]
    assert outs and all(w.abs().sum() == 0 for w in outs)
    x = tokens()
    _, loss = m(x, x)
    loss.backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in outs), "zero-init outputs must still learn"
    default = tiny(name)
    assert all(mod.o_proj.weight.abs().sum() > 0 for mod in default.modules() if hasattr(mod, "o_proj"))


@pytest.mark.parametrize("name", NAMES)
def test_rope_on_off(name):
    on, off = tiny(name), tiny(name, rope=False)
    assert on.pos_embed is None and isinstance(off.pos_embed, nn.Embedding)
    assert off.pos_embed.weight.shape == (32, 32)
    x = tokens()
    assert torch.isfinite(off(x, x)[1])
    with pytest.raises(ValueError, match="block_size"):
        off(tokens(T=33))


def test_rope_is_relative():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(i, j):
        return (apply_rope(q, torch.tensor([i]), 1e4) * apply_rope(k, torch.tensor([j]), 1e4)).sum()

    assert torch.allclose(score(3, 1), score(10, 8)) and not torch.allclose(score(3, 1), score(3, 2))
    assert torch.allclose(apply_rope(q, torch.tensor([7]), 1e4).norm(), q.norm())


@pytest.mark.parametrize("name", NAMES)
def test_generate(name):
    m = tiny(name).train()
    x = tokens(B=2, T=5)
    out = m.generate(x, 30, top_k=10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 35) and out.dtype == x.dtype and torch.equal(out[:, :5], x)
    assert int(out.min()) >= 0 and int(out.max()) < 256
    assert m.training, "generate restores the previous mode"
    again = m.generate(x, 30, top_k=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    greedy = m.generate(x, 3, temperature=0)
    assert torch.equal(greedy, m.generate(x, 3, temperature=0))
    assert m.generate(x, 0).shape == (2, 5)
    with pytest.raises(ValueError):
        m.generate(x, -1)
    with pytest.raises(ValueError):
        m.generate(x, 2, top_k=0)


def test_build_model_errors_and_defaults():
    with pytest.raises(ValueError, match="gpt, loopformer, moe-gpt, mor"):
        build_model("llama")
    with pytest.raises(ValueError, match="n_layers"):
        build_model("gpt", n_layers=2)
    assert isinstance(build_model("GPT", **TINY), GPT)
    assert isinstance(build_model("loopformer", **TINY), LoopFormer)
    assert isinstance(build_model("mor", **TINY), MoR)
    assert set(MODELS) == set(NAMES)


@pytest.mark.parametrize(
    "cfg_cls,kw,field",
    [
        (GPTConfig, dict(n_embd=30, n_head=4), "n_embd"),
        (GPTConfig, dict(n_head=4, n_kv_head=3), "n_kv_head"),
        (GPTConfig, dict(n_layer=0), "n_layer"),
        (GPTConfig, dict(n_embd=-8), "n_embd"),
        (GPTConfig, dict(vocab_size=2.5), "vocab_size"),
        (GPTConfig, dict(mlp_act="swish"), "mlp_act"),
        (GPTConfig, dict(mlp_ratio=0), "mlp_ratio"),
        (GPTConfig, dict(rope="yes"), "rope"),
        (GPTConfig, dict(n_embd=12, n_head=4), "head_dim"),
        (LoopFormerConfig, dict(n_loops=0), "n_loops"),
        (LoopFormerConfig, dict(short_trajectory="long"), "short_trajectory"),
        (LoopFormerConfig, dict(short_weight=-1.0), "short_weight"),
        (MoRConfig, dict(sharing="sequence"), "sharing"),
        (MoRConfig, dict(n_recursions=2, capacities=(0.5, 1.0)), "non-increasing"),
        (MoRConfig, dict(n_recursions=2, capacities=(1.0,)), "capacities"),
        (MoRConfig, dict(router_alpha=0), "router_alpha"),
        (MoRConfig, dict(eval_routing="causal"), "eval_routing"),
    ],
)
def test_config_validation(cfg_cls, kw, field):
    with pytest.raises(ValueError, match=field):
        cfg_cls(**kw)


def test_model_input_errors():
    m = tiny("gpt")
    with pytest.raises(TypeError):
        m(tokens().float())
    with pytest.raises(ValueError, match="block_size"):
        m(tokens(T=40))
    with pytest.raises(ValueError, match="targets"):
        m(tokens(), tokens(T=8))
    with pytest.raises(TypeError):
        GPT(MoRConfig())


@pytest.mark.parametrize("name", NAMES)
def test_attention_layout_for_the_optimizer(name):
    m = tiny(name, n_kv_head=2)
    attns = [a for a in m.modules() if isinstance(a, CausalSelfAttention)]
    assert attns
    for a in attns:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(a, proj)
            assert isinstance(lin, nn.Linear) and lin.bias is None
        for attr in ("head_dim", "num_heads", "num_kv_heads"):
            assert type(getattr(a, attr)) is int
    assert len(find_attention(m)) == len(attns)
    opt = CompositionalMuon.from_model(m)
    x = tokens()
    _, loss = m(x, x)
    loss.backward()
    opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_init_tied_head_and_num_params(name):
    a, b = tiny(name), tiny(name)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    tied = tiny(name, tie_embeddings=True)
    assert tied.lm_head.weight is tied.embed.weight
    assert tied.num_params() == a.num_params() - 256 * 32
    assert a.num_params(exclude_embeddings=True) == a.num_params() - 256 * 32
