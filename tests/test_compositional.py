"""CompositionalMuon: discovery across model families, equivalence with the functional core,
torch.optim conventions, checkpoints, safety and diagnostics."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compositional_muon import NonFiniteError, cm_ov, cm_qk
from compositional_muon.attention import AttentionSpec, HeadSlice, find_attention
from compositional_muon.compositional import CompositionalMuon
from compositional_muon.muon import Muon

# ------------------------------------------------------------------------------------------------
# Small models of each attention layout
# ------------------------------------------------------------------------------------------------


class SepAttn(nn.Module):
    """Llama-style: separate bias-free projections and a head_dim attribute."""

    def __init__(self, D, H, Hkv, zero_o=False):
        super().__init__()
        self.head_dim, self.n_rep = D // H, H // Hkv
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, Hkv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, Hkv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)
        if zero_o:
            nn.init.zeros_(self.o_proj.weight)

    def forward(self, x):
        B, T, D = x.shape
        sh = lambda t: t.view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k, v = sh(self.q_proj(x)), sh(self.k_proj(x)), sh(self.v_proj(x))
        k, v = k.repeat_interleave(self.n_rep, 1), v.repeat_interleave(self.n_rep, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))


class FusedAttn(nn.Module):
    """nanoGPT-style: fused c_attn, c_proj, n_head attribute (no head_dim)."""

    def __init__(self, D, H):
        super().__init__()
        self.n_head = H
        self.c_attn = nn.Linear(D, 3 * D, bias=False)
        self.c_proj = nn.Linear(D, D, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        sh = lambda t: t.view(B, T, self.n_head, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(sh(q), sh(k), sh(v), is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))


class TinyGPT(nn.Module):
    def __init__(self, V=64, D=32, H=4, Hkv=None, L=2, fused=False, zero_o=False):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList()
        for _ in range(L):
            blk = nn.Module()
            blk.ln1, blk.ln2 = nn.RMSNorm(D), nn.RMSNorm(D)
            blk.attn = FusedAttn(D, H) if fused else SepAttn(D, H, Hkv or H, zero_o)
            blk.fc, blk.proj = nn.Linear(D, 4 * D, bias=False), nn.Linear(4 * D, D, bias=False)
            self.blocks.append(blk)
        self.norm = nn.RMSNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)

    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for b in self.blocks:
            x = x + b.attn(b.ln1(x))
            x = x + b.proj(F.gelu(b.fc(b.ln2(x))))
        logits = self.lm_head(self.norm(x))
        return logits, (None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def batch(V=64, B=4, T=16, seed=0):
    """Learnable sequences: arithmetic progressions mod V with a random start and step."""
    g = torch.Generator().manual_seed(seed)
    start, step = torch.randint(0, V, (B, 1), generator=g), torch.randint(1, 4, (B, 1), generator=g)
    x = (start + step * torch.arange(T + 1)) % V
    return x[:, :-1], x[:, 1:]


def train(model, opt, steps, seed=0):
    losses = []
    for s in range(steps):
        x, y = batch(seed=seed + s)
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


EXACT = dict(msign_backend="svd")


# ------------------------------------------------------------------------------------------------
# Discovery and routing
# ------------------------------------------------------------------------------------------------


def test_from_model_routes_every_parameter_once():
    torch.manual_seed(0)
    m = TinyGPT(Hkv=2)
    opt = CompositionalMuon.from_model(m)
    kinds = {n: k for n, k, _ in opt.routing}
    assert set(kinds) == {n for n, _ in m.named_parameters()}
    assert all(kinds[f"blocks.{i}.attn.{p}_proj.weight"] == "cm" for i in range(2) for p in "qkvo")
    assert kinds["blocks.0.fc.weight"] == kinds["blocks.1.proj.weight"] == "muon"
    assert kinds["embed.weight"] == kinds["lm_head.weight"] == kinds["norm.weight"] == "adamw"
    text = opt.summary()
    assert "blocks.1.attn.qk" in text and "kv_heads=2" in text and "adamw" in text
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))


def test_discovery_errors_are_clear():
    m = TinyGPT()
    m.blocks[0].attn.head_dim = 5  # does not divide the width
    with pytest.raises(ValueError, match=r"blocks\.0\.attn.*not a multiple of head_dim=5"):
        CompositionalMuon.from_model(m)
    m2 = TinyGPT(fused=True)
    del m2.blocks[0].attn.n_head
    with pytest.raises(ValueError, match=r"blocks\.0\.attn.*pass head_dim= or num_heads="):
        CompositionalMuon.from_model(m2)
    with pytest.raises(ValueError, match="no attention layer found"):
        CompositionalMuon.from_model(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="unknown CM option"):
        CompositionalMuon.from_model(TinyGPT(), isotropik=True)
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        find_attention(TinyGPT(Hkv=2), num_kv_heads=3)


def test_explicit_spec_api_and_partial_coverage_error():
    torch.manual_seed(1)
    m = TinyGPT(fused=True, L=1)
    a = m.blocks[0].attn
    spec = AttentionSpec.fused("layer0", a.c_attn, a.c_proj, num_heads=4)
    opt = CompositionalMuon.from_model(m, attention=[spec])
    assert opt.param_groups[0]["cm_pairs"][0]["name"] == "layer0.qk"
    # a spec that leaves rows of a fused weight uncovered is refused
    bad = AttentionSpec(
        "bad",
        head_dim=8,
        num_heads=4,
        num_kv_heads=4,
        q=HeadSlice(a.c_attn.weight, 0, 0),
        k=HeadSlice(a.c_attn.weight, 0, 32),
    )
    with pytest.raises(ValueError, match="only partly covered"):
        CompositionalMuon.from_model(m, attention=[bad])
    with pytest.raises(ValueError, match="need 40 entries along axis 0"):
        AttentionSpec(
            "x",
            head_dim=8,
            num_heads=5,
            num_kv_heads=5,
            q=HeadSlice(torch.zeros(32, 8)),
            k=HeadSlice(torch.zeros(32, 8)),
        )


# ------------------------------------------------------------------------------------------------
# Equivalence with the functional core, fused layouts and layer batching
# ------------------------------------------------------------------------------------------------


def test_step_equals_functional_core_plus_muon_plus_adamw():
    torch.manual_seed(2)
    m = TinyGPT(Hkv=2).double()
    ref = copy.deepcopy(m)
    opt = CompositionalMuon.from_model(m, lr=0.05, muon_lr=0.03, adamw_lr=1e-3, weight_decay=0.1, **EXACT)
    muon_params = [p for n, p in ref.named_parameters() if n.endswith(("fc.weight", "proj.weight")) and "attn" not in n]
    adam_params = [p for n, p in ref.named_parameters() if p.ndim < 2 or "embed" in n or "lm_head" in n]
    ref_muon = Muon(muon_params, lr=0.03, weight_decay=0.1)
    ref_adam = torch.optim.AdamW(adam_params, lr=1e-3, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)
    bufs = {id(p): torch.zeros_like(p) for p in ref.parameters()}
    for s in range(3):
        for model in (m, ref):
            model.zero_grad()
            model(*batch(seed=s))[1].backward()
        opt.step()
        for b in ref.blocks:
            a = b.attn
            P = (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight)
            cm_qk(
                P[0],
                P[1],
                P[0].grad,
                P[1].grad,
                bufs[id(P[0])],
                bufs[id(P[1])],
                head_dim=8,
                eta=0.05,
                weight_decay=0.1,
                **EXACT,
            )
            cm_ov(
                P[2],
                P[3],
                P[2].grad,
                P[3].grad,
                bufs[id(P[2])],
                bufs[id(P[3])],
                head_dim=8,
                eta=0.05,
                weight_decay=0.1,
                **EXACT,
            )
        ref_muon.step()
        ref_adam.step()
        for (n, p), q in zip(m.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


def test_fused_qkv_equals_separate_projections():
    torch.manual_seed(3)
    sep, fused = TinyGPT(L=2).double(), TinyGPT(L=2, fused=True).double()
    with torch.no_grad():
        for bs, bf in zip(sep.blocks, fused.blocks):
            a = bs.attn
            bf.attn.c_attn.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            bf.attn.c_proj.weight.copy_(a.o_proj.weight)
        for name in ("embed", "norm", "lm_head"):
            getattr(fused, name).load_state_dict(getattr(sep, name).state_dict())
        for bs, bf in zip(sep.blocks, fused.blocks):
            for name in ("ln1", "ln2", "fc", "proj"):
                getattr(bf, name).load_state_dict(getattr(bs, name).state_dict())
    o1 = CompositionalMuon.from_model(sep, **EXACT)
    o2 = CompositionalMuon.from_model(fused, **EXACT)
    train(sep, o1, 3)
    train(fused, o2, 3)
    for bs, bf in zip(sep.blocks, fused.blocks):
        a = bs.attn
        torch.testing.assert_close(
            bf.attn.c_attn.weight, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        )
        torch.testing.assert_close(bf.attn.c_proj.weight, a.o_proj.weight)


def test_layer_batched_step_equals_per_layer_steps():
    # Same-shape pairs are stacked into one kernel call; it must equal one optimizer per layer.
    torch.manual_seed(4)
    m = TinyGPT(L=3).double()
    for n, p in m.named_parameters():
        p.requires_grad_("attn" in n)  # only the attention weights train here
    per_layer = copy.deepcopy(m)
    opt = CompositionalMuon.from_model(m, **EXACT)
    specs = find_attention(per_layer)
    opts = [CompositionalMuon([dict(kind="cm", attention=[s], **EXACT)]) for s in specs]
    for s in range(2):
        for model in (m, per_layer):
            model.zero_grad()
            model(*batch(seed=s))[1].backward()
        opt.step()
        for o in opts:
            o.step()
    for i in range(3):
        for p in "qkvo":
            torch.testing.assert_close(
                getattr(m.blocks[i].attn, f"{p}_proj").weight,
                getattr(per_layer.blocks[i].attn, f"{p}_proj").weight,
                rtol=0,
                atol=1e-13,
            )


# ------------------------------------------------------------------------------------------------
# torch.optim conventions
# ------------------------------------------------------------------------------------------------


def test_state_dict_resume_is_bit_identical():
    torch.manual_seed(8)
    m = TinyGPT(Hkv=2)
    opt = CompositionalMuon.from_model(m, lr=0.03, weight_decay=0.01)
    train(m, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    train(m, opt, 2, seed=100)
    buf.seek(0)
    ck = torch.load(buf)
    fresh = TinyGPT(Hkv=2)
    fresh.load_state_dict(ck["model"])
    fresh_opt = CompositionalMuon.from_model(fresh, lr=0.03, weight_decay=0.01)
    fresh_opt.load_state_dict(ck["opt"])
    train(fresh, fresh_opt, 2, seed=100)
    for (n, p), q in zip(m.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n


def test_state_dict_mismatch_is_refused():
    opt = CompositionalMuon.from_model(TinyGPT(Hkv=2))
    other = CompositionalMuon.from_model(TinyGPT(Hkv=4))
    with pytest.raises(ValueError, match="attention layout"):
        other.load_state_dict(opt.state_dict())
    bigger = CompositionalMuon.from_model(TinyGPT(L=3))
    with pytest.raises(ValueError, match="mismatch|doesn't match"):
        bigger.load_state_dict(CompositionalMuon.from_model(TinyGPT(L=2)).state_dict())


def _update_size(m, opt, seed=0):
    w = m.blocks[0].attn.q_proj.weight
    before = w.detach().clone()
    train(m, opt, 1, seed=seed)
    return (w - before).norm().item()


def test_lr_schedulers_change_the_cm_step():
    torch.manual_seed(9)
    m = TinyGPT()
    opt = CompositionalMuon.from_model(m, lr=0.02, momentum=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s == 0 else 0.25)
    a = _update_size(m, opt)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    b = _update_size(m, opt, seed=1)
    assert b / a == pytest.approx(0.25, rel=0.05)
    m2 = TinyGPT()
    opt2 = CompositionalMuon.from_model(m2, lr=0.02)
    one = torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=[0.02, 0.02, 1e-3], total_steps=10)
    lrs = []
    for s in range(5):
        train(m2, opt2, 1, seed=s)
        one.step()
        lrs.append(opt2.param_groups[0]["lr"])
    assert lrs[0] < lrs[2] and opt2.param_groups[0]["momentum"] != 0.95  # it cycles momentum too


def test_closure_zero_grad_missing_grads_and_add_param_group():
    torch.manual_seed(10)
    m = TinyGPT()
    extra = nn.Linear(8, 8)  # added later, as a Muon group
    opt = CompositionalMuon.from_model(m)
    x, y = batch()

    def closure():
        opt.zero_grad()
        loss = m(x, y)[1]
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.ndim == 0
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    # no grads: nothing moves, no state created
    snap = [p.detach().clone() for p in m.parameters()]
    n_state = len(opt.state)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(snap, m.parameters())) and len(opt.state) == n_state
    opt.add_param_group(dict(kind="muon", params=[extra.weight], lr=0.01))
    opt.add_param_group(dict(params=[extra.bias], use_muon=False, lr=1e-3))
    extra.weight.grad, extra.bias.grad = torch.randn(8, 8), torch.randn(8)
    w0, b0 = extra.weight.detach().clone(), extra.bias.detach().clone()
    opt.step()
    assert not torch.equal(w0, extra.weight) and not torch.equal(b0, extra.bias)
    with pytest.raises(ValueError, match="unknown param group kind"):
        opt.add_param_group(dict(kind="sgd", params=[nn.Parameter(torch.zeros(2, 2))]))


def test_pair_with_one_grad_raises_and_pair_with_none_is_skipped():
    torch.manual_seed(11)
    m = TinyGPT(L=1)
    opt = CompositionalMuon.from_model(m)
    a = m.blocks[0].attn
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    a.k_proj.weight.grad = None
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qk': W_k has no gradient but W_q has one"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, m.parameters())) and not opt.state
    a.q_proj.weight.grad = None  # neither: the pair is skipped whole, the rest steps
    q0, v0 = a.q_proj.weight.detach().clone(), a.v_proj.weight.detach().clone()
    opt.step()
    assert torch.equal(q0, a.q_proj.weight)
    assert not torch.equal(v0, a.v_proj.weight)


# ------------------------------------------------------------------------------------------------
# Safety
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_gradients_never_reach_weights(policy):
    torch.manual_seed(12)
    m = TinyGPT()
    opt = CompositionalMuon.from_model(m, nonfinite=policy)
    train(m, opt, 1)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    m.blocks[1].attn.v_proj.weight.grad[0, 0] = float("nan")
    snap = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in m.parameters()]
    if policy == "raise":
        with pytest.raises(NonFiniteError):
            opt.step()
    else:
        opt.step()
        assert all(g["skipped_steps"] == 1 for g in opt.param_groups)
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))
    for k, st in snap["state"].items():
        for name, v in st.items():
            assert torch.equal(v, opt.state_dict()["state"][k][name])


def test_sparse_and_complex_gradients_raise():
    m = TinyGPT()
    opt = CompositionalMuon.from_model(m)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    m.embed.weight.grad = m.embed.weight.grad.to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    m.embed.weight.grad = torch.randn_like(m.embed.weight)
    z = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    opt.add_param_group(dict(kind="muon", params=[z]))
    z.grad = torch.randn_like(z)
    with pytest.raises(TypeError, match="complex"):
        opt.step()


def test_singular_partner_without_ridge_raises_before_writing():
    m = TinyGPT(zero_o=True)
    opt = CompositionalMuon.from_model(m, lam=0.0)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    params = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(NonFiniteError, match="not finite"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))


def test_zero_initialized_o_proj_trains_without_blowup():
    torch.manual_seed(13)
    m = TinyGPT(D=64, H=4, L=2, zero_o=True)
    opt = CompositionalMuon.from_model(m, lr=0.02, muon_lr=0.02, adamw_lr=3e-3)
    attn_weights = [
        p
        for b in m.blocks
        for p in (b.attn.q_proj.weight, b.attn.k_proj.weight, b.attn.v_proj.weight, b.attn.o_proj.weight)
    ]
    largest, losses = 0.0, []
    for s in range(100):
        before = [w.detach().clone() for w in attn_weights]
        losses.extend(train(m, opt, 1, seed=s))
        for w, b in zip(attn_weights, before):
            largest = max(largest, torch.linalg.matrix_norm(w - b, 2).item())
    assert all(torch.isfinite(torch.tensor(losses)))
    # With lam = 1e-2 a zero partner enlarges a step by at most lam^(-1/2) = 10 over eta/2 per head
    # (and a whole-matrix step of H heads by at most sqrt(H) more); measured here: about 0.1.
    assert largest < 0.5 * 0.02 * 10 * 2
    assert sum(losses[-10:]) / 10 < losses[0] - 0.5


# ------------------------------------------------------------------------------------------------
# Diagnostics
# ------------------------------------------------------------------------------------------------


def test_diagnostics_per_head_steps_and_composed_norms():
    torch.manual_seed(14)
    m = TinyGPT(Hkv=2).double()
    opt = CompositionalMuon.from_model(m, lr=0.1, lam=0.0, track_stats=True, **EXACT)
    train(m, opt, 1)
    st = opt.last_stats
    assert set(st) == {f"blocks.{i}.attn.{k}" for i in range(2) for k in ("qk", "ov")}
    qk = st["blocks.0.attn.qk"]
    assert qk["q_step"].shape == (4,) and qk["k_step"].shape == (2,) and qk["composed"].shape == (4,)
    assert (qk["composed"] <= 0.1 + 1e-6).all() and (qk["composed"] > 0.01).all()
    assert set(st["blocks.0.attn.ov"]) == {"o_step", "v_step", "composed"}
    # q_step is the spectral norm of each head's actual update: check against the weights' change
    w = m.blocks[0].attn.q_proj.weight
    before = w.detach().clone()
    train(m, opt, 1, seed=1)
    steps = torch.linalg.matrix_norm((w - before).view(4, 8, 32), 2)
    torch.testing.assert_close(opt.last_stats["blocks.0.attn.qk"]["q_step"], steps.float(), rtol=1e-5, atol=1e-7)
    opt2 = CompositionalMuon.from_model(copy.deepcopy(m), lr=0.1, lam=0.0, track_stats=False, **EXACT)
    train(m, opt2, 1)
    assert opt2.last_stats == {}


def test_from_model_msign_dtype_reaches_the_muon_group():
    """One precision for the whole model: ``msign_dtype`` given to from_model also sets the Muon group's."""
    from compositional_muon.training.models import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
    opt = CompositionalMuon.from_model(model, msign_dtype=torch.float64)
    kinds = {g["kind"]: g for g in opt.param_groups}
    assert kinds["muon"]["msign_dtype"] == torch.float64 and kinds["cm"]["msign_dtype"] == torch.float64
    assert {g["kind"]: g for g in CompositionalMuon.from_model(model).param_groups}["muon"]["msign_dtype"] is None
