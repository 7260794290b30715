"""Bad inputs to the optimizers: every hyperparameter of every optimizer, at construction, in
add_param_group and after construction (set in ``param_groups`` then ``step``); state-dict
mismatches; float16/bfloat16 parameters; non-finite weights; attention head-count mismatches.

Each refusal is a one-line ``ValueError`` naming the optimizer, the group index and the key, and
leaves the weights, the optimizer state and the param groups bit-identical (also with
``nonfinite="skip"``)."""

import copy
import math

import pytest
import torch
from torch import nn

from compositional_muon import NonFiniteError, cm_ov, cm_qk
from compositional_muon.attention import find_attention
from compositional_muon.baselines import CircuitMuon
from compositional_muon.compositional import CompositionalMuon
from compositional_muon.muon import Muon, MuonWithAuxAdam
from compositional_muon.per_head import PerHeadMuon
from compositional_muon.state_check import CLASS_KEY
from compositional_muon.validation import RANGES
from compositional_muon.variants import AdaMuon, Mano, NewtonMuon, NorMuon

NAN, INF = float("nan"), float("inf")


class Attn(nn.Module):
    def __init__(self, D=16, H=4, Hkv=2):
        super().__init__()
        self.head_dim, self.num_heads, self.num_kv_heads = D // H, H, Hkv
        d = D // H
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, Hkv * d, bias=False)
        self.v_proj = nn.Linear(D, Hkv * d, bias=False)
        self.o_proj = nn.Linear(H * d, D, bias=False)


class Tiny(nn.Module):
    """Attention (GQA), an MLP matrix (Muon), an embedding, a norm and a head (AdamW)."""

    def __init__(self, D=16):
        super().__init__()
        self.embed = nn.Embedding(11, D)
        self.attn = Attn(D)
        self.mlp = nn.Linear(D, D, bias=False)
        self.norm = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, 11, bias=False)

    def matrices(self):
        a = self.attn
        return [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight, self.mlp.weight]

    def others(self):
        return [self.embed.weight, self.norm.weight, self.norm.bias, self.lm_head.weight]


def _routed(cls):
    def build(m, over, **kw):
        groups = [dict(params=m.matrices(), use_muon=True), dict(params=m.others(), use_muon=False)]
        for i, o in over.items():
            groups[i].update(o)
        return cls(groups, **kw)

    return build


def _newton(m, over, **kw):
    groups = [dict(params=m.matrices(), use_muon=True), dict(params=m.others(), use_muon=False)]
    for i, o in over.items():
        groups[i].update(o)
    return NewtonMuon.from_model(m, groups, **kw)


def _cm(m, over, **kw):
    groups = [
        dict(kind="cm", attention=find_attention(m)),
        dict(kind="muon", params=[m.mlp.weight]),
        dict(kind="adamw", params=m.others()),
    ]
    for i, o in over.items():
        groups[i].update(o)
    return CompositionalMuon(groups, **kw)


def _circuit(m, over, **kw):
    groups = [dict(params=m.matrices(), use_muon=True), dict(params=m.others(), use_muon=False)]
    for i, o in over.items():
        groups[i].update(o)
    pairs = [s for s in find_attention(m) if s.v is not None]
    return CircuitMuon(groups, pairs, **kw)


def _per_head(m, over, **kw):
    groups = [
        dict(kind="heads", attention=find_attention(m)),
        dict(kind="muon", params=[m.mlp.weight]),
        dict(kind="adamw", params=m.others()),
    ]
    for i, o in over.items():
        groups[i].update(o)
    return PerHeadMuon(groups, **kw)


BUILDERS = {
    "Muon": _routed(Muon),
    "MuonWithAuxAdam": _routed(MuonWithAuxAdam),
    "NorMuon": _routed(NorMuon),
    "AdaMuon": _routed(AdaMuon),
    "Mano": _routed(Mano),
    "NewtonMuon": _newton,
    "CompositionalMuon": _cm,
    "CircuitMuon": _circuit,
    "PerHeadMuon": _per_head,
}


def build(name, over=None, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    m = Tiny().to(dtype)
    return m, BUILDERS[name](m, over or {}, **kw)


def set_grads(m, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)


def bad_values(key):
    """Values the table must refuse for ``key``: non-finite and out of range, per its kind."""
    spec = RANGES[key]
    if spec.kind == "real":
        out = [NAN, INF if spec.hi == math.inf else spec.hi]
        out.append(spec.lo if spec.lo_open else spec.lo - 1.0)
        if key == "lr":
            out += [torch.tensor(NAN), None]
        return out
    return {
        "int": [0, 2.5],
        "bool": ["yes"],
        "choice": ["bogus"],
        "betas": [(1.0, 0.9), (0.9, NAN)],
        "dtype": [torch.int64],
    }[spec.kind]


ADAMW_KEYS = ("lr", "weight_decay", "betas", "eps", "use_muon", "kind")


def _keys(name):
    """Every table key of every group (AdamW groups also hold the matrix defaults torch copies into
    every group; only the keys AdamW reads are enumerated there)."""
    _, opt = build(name)
    return [
        (name, gi, k)
        for gi, g in enumerate(opt.param_groups)
        for k in g
        if k in RANGES and (g["use_muon"] or k in ADAMW_KEYS)
    ]


CASES = [c for name in BUILDERS for c in _keys(name)]
STRUCTURAL = ("use_muon", "kind")  # set by the group's flavour at construction; checked at step time


def same(a, b):
    """Bitwise equal, NaNs in the same places."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def snapshot(m, opt):
    params = [p.detach().clone() for p in m.parameters()]
    state = {i: copy.deepcopy(dict(opt.state[p])) for i, p in enumerate(m.parameters()) if p in opt.state}
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return params, state, groups


def assert_unchanged(snap, m, opt, skip=None):
    params, state, groups = snap
    for a, b in zip(params, m.parameters()):
        assert torch.equal(a, b)
    now = {i: dict(opt.state[p]) for i, p in enumerate(m.parameters()) if p in opt.state}
    assert now.keys() == state.keys()
    for i, st in state.items():
        assert now[i].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(v, now[i][k]) if isinstance(v, torch.Tensor) else v == now[i][k]
    for gi, (g, saved) in enumerate(zip(opt.param_groups, groups)):
        for k, v in saved.items():
            if (gi, k) != skip:
                assert g[k] == v, (gi, k)


# ------------------------------------------------------------------------------------------------
# Every key x every optimizer
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,gi,key", [c for c in CASES if c[2] not in STRUCTURAL])
def test_bad_value_refused_at_construction(name, gi, key):
    for bad in bad_values(key):
        with pytest.raises(ValueError, match=rf"^{name}: param group {gi}: `{key}`") as err:
            build(name, {gi: {key: bad}})
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name,gi,key", CASES)
def test_bad_value_set_after_construction_writes_nothing(name, gi, key):
    m, opt = build(name, nonfinite="skip")
    set_grads(m, 1)
    opt.step()  # state exists
    set_grads(m, 2)
    good = opt.param_groups[gi][key]
    for bad in bad_values(key):
        snap = snapshot(m, opt)
        opt.param_groups[gi][key] = bad
        with pytest.raises(ValueError, match=rf"^{name}: param group {gi}: `{key}`"):
            opt.step()
        assert_unchanged(snap, m, opt, skip=(gi, key))
        opt.param_groups[gi][key] = good
    opt.step()  # the restored value steps again


@pytest.mark.parametrize("name", list(BUILDERS))
def test_add_param_group_names_the_new_group(name):
    m, opt = build(name)
    extra = nn.Parameter(torch.randn(4, 4))
    kind = dict(kind="muon") if name == "CompositionalMuon" else dict(use_muon=True)
    with pytest.raises(ValueError, match=rf"^{name}: param group {len(opt.param_groups)}: `momentum`"):
        opt.add_param_group(dict(params=[extra], momentum=NAN, **kind))
    kind = dict(kind="adamw") if name == "CompositionalMuon" else dict(use_muon=False)
    with pytest.raises(ValueError, match=rf"param group {len(opt.param_groups)}: `betas`"):
        opt.add_param_group(dict(params=[nn.Parameter(torch.randn(4))], betas=(0.9, 1.0), **kind))
    assert all(extra is not p for g in opt.param_groups for p in g["params"])


def test_bad_setting_raises_before_a_nonfinite_gradient_is_skipped():
    m, opt = build("Muon", nonfinite="skip")
    set_grads(m)
    m.mlp.weight.grad[0, 0] = NAN
    opt.param_groups[0]["lr"] = INF
    with pytest.raises(ValueError, match="`lr` must be a finite number >= 0, got inf"):
        opt.step()
    assert [g["skipped_steps"] for g in opt.param_groups] == [0, 0] and not opt.state


@pytest.mark.parametrize(
    "name,gi,over,match",
    [
        ("Muon", 0, dict(lr=0.5, weight_decay=3.0), r"`lr` \* `weight_decay` must be <= 1"),
        ("Muon", 1, dict(lr=2.0, weight_decay=1.0), r"`lr` \* `weight_decay` must be <= 1"),
        ("CompositionalMuon", 0, dict(msign_backend="svd", msign_steps=3), "takes no `msign_steps`"),
        ("CompositionalMuon", 0, dict(momentum_reproject=True), "needs a connection other than 'none'"),
        ("CompositionalMuon", 0, dict(transform="normuon", method="joint"), "needs method='half_split'"),
        ("CompositionalMuon", 0, dict(transform="newton"), "o_proj"),
    ],
)
def test_rules_tying_keys_together(name, gi, over, match):
    with pytest.raises(ValueError, match=match):
        build(name, {gi: over})
    m, opt = build(name)
    set_grads(m)
    snap = snapshot(m, opt)
    opt.param_groups[gi].update(over)
    with pytest.raises(ValueError, match=rf"param group {gi}: .*{match}"):
        opt.step()
    params, state, _ = snap
    assert_unchanged((params, state, []), m, opt)


def test_circuit_muon_lam():
    with pytest.raises(ValueError, match="CircuitMuon: `lam` must be a finite number >= 0, got nan"):
        build("CircuitMuon", lam=NAN)
    m, opt = build("CircuitMuon")
    set_grads(m)
    opt.step()
    snap = snapshot(m, opt)
    opt.lam = INF
    with pytest.raises(ValueError, match="CircuitMuon: `lam`"):
        opt.step()
    assert_unchanged(snap, m, opt)


# ------------------------------------------------------------------------------------------------
# Functional cm_qk / cm_ov
# ------------------------------------------------------------------------------------------------


def _pair_tensors(ov):
    g = torch.Generator().manual_seed(3)
    shapes = [(8, 16), (16, 16)] if ov else [(16, 16), (8, 16)]  # (wv, wo) / (wq, wk): 4 heads of 4, 2 kv
    w = [torch.randn(s, generator=g) for s in shapes]
    return w + [torch.randn(s, generator=g) for s in shapes] + [torch.randn(s, generator=g) for s in shapes]


@pytest.mark.parametrize("fn", [cm_qk, cm_ov])
@pytest.mark.parametrize(
    "over",
    [
        dict(eta=NAN),
        dict(eta=INF),
        dict(weight_decay=NAN),
        dict(weight_decay=INF),
        dict(beta=NAN),
        dict(lam=INF),
        dict(lam=NAN),
        dict(msign_steps=2.5),
        dict(eta=0.5, weight_decay=4.0),
    ],
)
def test_functional_bad_scalars_write_nothing(fn, over):
    ts = _pair_tensors(fn is cm_ov)
    before = [t.clone() for t in ts]
    key = next(iter(over)) if len(over) == 1 else "eta"
    with pytest.raises(ValueError, match=rf"`{key}`"):
        fn(*ts, head_dim=4, **{"eta": 0.1, "on_nonfinite": "skip", **over})
    assert all(torch.equal(a, b) for a, b in zip(before, ts))


# ------------------------------------------------------------------------------------------------
# Non-finite weights are named as weights
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_nonfinite_weights_with_nonfinite_grads_are_named(name, policy):
    m, opt = build(name, nonfinite=policy)
    set_grads(m)
    with torch.no_grad():
        m.mlp.weight[1, 2] = NAN
    m.mlp.weight.grad[1, 2] = NAN  # what a NaN weight does to the next backward
    snap = snapshot(m, opt)
    with pytest.raises(
        NonFiniteError,
        match=r"the weights themselves hold NaN/inf \(parameter \d of param group \d \(shape \(16, 16\)\)\)",
    ):
        opt.step()
    assert all(same(a, b) for a, b in zip(snap[0], m.parameters()))
    assert all(g["skipped_steps"] == 0 for g in opt.param_groups) and not opt.state


def test_cm_nonfinite_weight_is_not_called_a_singular_gram():
    m, opt = build("CompositionalMuon")
    set_grads(m)
    with torch.no_grad():
        m.attn.k_proj.weight[0, 0] = INF
    with pytest.raises(NonFiniteError, match=r"the weights of \['attn.qk'\] hold NaN/inf") as err:
        opt.step()
    assert "singular" not in str(err.value)
    assert torch.equal(m.attn.q_proj.weight, build("CompositionalMuon")[0].attn.q_proj.weight)


@pytest.mark.parametrize("fn,index,name", [(cm_qk, 1, "wk"), (cm_ov, 0, "wv")])
def test_functional_nonfinite_weight_is_named(fn, index, name):
    ts = _pair_tensors(fn is cm_ov)
    ts[index][0, 0] = NAN
    before = [t.clone() for t in ts]
    with pytest.raises(NonFiniteError, match=rf"the weights `{name}` hold NaN/inf") as err:
        fn(*ts, head_dim=4, eta=0.1)
    assert "singular" not in str(err.value)
    assert all(same(a, b) for a, b in zip(before, ts))


# ------------------------------------------------------------------------------------------------
# float16 / bfloat16 parameters
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_low_precision_params_stay_finite(name, dtype):
    m, opt = build(name, dtype=dtype)
    start = [p.detach().clone() for p in m.parameters()]
    for step in range(3):
        set_grads(m, seed=step, scale=1e-4)  # small gradients: (1 - b2) g^2 underflows in float16
        opt.step()
    moved = {p: not torch.equal(p, p0) for p, p0 in zip(m.parameters(), start)}
    for p in m.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()
    for g in opt.param_groups:  # (an update below half an ulp leaves a bfloat16 weight unchanged)
        assert any(moved[p] for p in g["params"])
    for p in m.others():
        st = opt.state[p]
        want = torch.float32 if dtype == torch.float16 else dtype
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == want


def test_float16_adamw_matches_a_float64_reference():
    m, opt = build("Muon", dtype=torch.float16)
    p = m.lm_head.weight
    w = p.detach().double()
    mom, v = torch.zeros_like(w), torch.zeros_like(w)
    g = opt.param_groups[1]
    (b1, b2), eps, lr = g["betas"], g["eps"], g["lr"]
    for t in range(1, 4):
        set_grads(m, seed=t, scale=1e-4)
        gr = p.grad.double()
        mom = b1 * mom + (1 - b1) * gr
        v = b2 * v + (1 - b2) * gr * gr
        w = w - lr * (mom / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        opt.step()
        # one float16 rounding of the weight per step: within a few ulps of the exact result
        assert torch.allclose(p.double(), w, rtol=0, atol=4 * 2**-10 * w.abs().max().item())
        w = p.detach().double()  # continue from the stored (rounded) weight, as the optimizer does


@pytest.mark.parametrize("name,dtype", [("Muon", torch.float16), ("CompositionalMuon", torch.bfloat16)])
def test_high_precision_state_survives_a_state_dict_round_trip(name, dtype):
    over = {0: dict(transform="normuon")} if name == "CompositionalMuon" else {}
    m, opt = build(name, over, dtype=dtype)
    set_grads(m, 1, 1e-3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    m2, opt2 = build(name, over, dtype=dtype)
    m2.load_state_dict(m.state_dict())
    opt2.load_state_dict(sd)
    for p, p2 in zip(m.parameters(), m2.parameters()):
        for k, v in opt.state.get(p, {}).items():
            v2 = opt2.state[p2][k]
            assert torch.equal(v, v2) and v.dtype == v2.dtype if isinstance(v, torch.Tensor) else v == v2
    for mm, oo in ((m, opt), (m2, opt2)):
        set_grads(mm, 2, 1e-3)
        oo.step()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


# ------------------------------------------------------------------------------------------------
# load_state_dict
# ------------------------------------------------------------------------------------------------


def _trained(name, **kw):
    m, opt = build(name, **kw)
    set_grads(m, 1)
    opt.step()
    return m, opt


@pytest.mark.parametrize("name", list(BUILDERS))
def test_state_dict_round_trip_records_the_class_and_resumes_exactly(name):
    m, opt = _trained(name)
    sd = copy.deepcopy(opt.state_dict())
    assert sd[CLASS_KEY] == name
    m2, opt2 = build(name)
    m2.load_state_dict(m.state_dict())
    legacy = {k: v for k, v in sd.items() if k != CLASS_KEY}  # written before the record existed
    opt2.load_state_dict(legacy)
    for mm, oo in ((m, opt), (m2, opt2)):
        set_grads(mm, 2)
        oo.step()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


def _mutate(sd, how):
    sd = copy.deepcopy(sd)
    if how == "group_count":
        sd["param_groups"].pop()
    elif how == "param_count":
        sd["param_groups"][0]["params"].pop()
    elif how == "use_muon":
        sd["param_groups"][1]["use_muon"] = True
    elif how == "shape":
        sd["state"][0]["momentum_buffer"] = torch.zeros(3, 3)
    elif how == "adam_shape":
        sd["state"][5]["exp_avg"] = torch.zeros(2)
    elif how == "saved_lr":
        sd["param_groups"][0]["lr"] = NAN
    elif how == "unknown_id":
        sd["state"][99] = {}
    elif how == "not_a_dict":
        sd = [sd]
    return sd


@pytest.mark.parametrize(
    "how,match",
    [
        ("group_count", "the state dict has 1 param groups, this optimizer has 2"),
        ("param_count", "param group 0: 4 parameters in the state dict, 5 here"),
        ("use_muon", "param group 1: the state dict has use_muon=True, this optimizer use_muon=False"),
        ("shape", r"state 'momentum_buffer' of parameter 0 has shape \(3, 3\), expected \(16, 16\)"),
        ("adam_shape", r"state 'exp_avg' of parameter 5 has shape \(2,\), expected \(11, 16\)"),
        ("saved_lr", "saved param group 0: `lr` must be a finite number >= 0, got nan"),
        ("unknown_id", "state for parameter id 99"),
        ("not_a_dict", "expected a dict with 'state' and 'param_groups'"),
    ],
)
@pytest.mark.parametrize("name", ["Muon", "NorMuon"])
def test_mismatched_state_dict_is_refused_and_changes_nothing(name, how, match):
    m, opt = _trained(name)
    bad = _mutate(opt.state_dict(), how)
    m2, opt2 = _trained(name)
    snap = snapshot(m2, opt2)
    with pytest.raises(ValueError, match=rf"^{name}\.load_state_dict: state dict mismatch: .*{match}"):
        opt2.load_state_dict(bad)
    assert_unchanged(snap, m2, opt2)


@pytest.mark.parametrize(
    "src,dst",
    [("NorMuon", "AdaMuon"), ("AdaMuon", "NorMuon"), ("Muon", "NorMuon"), ("Mano", "Muon"), ("Muon", "AdaMuon")],
)
@pytest.mark.parametrize("recorded", [True, False])
def test_another_optimizers_state_dict_is_refused(src, dst, recorded):
    _, opt = _trained(src)
    sd = opt.state_dict()
    if not recorded:
        del sd[CLASS_KEY]
    m2, opt2 = _trained(dst)
    snap = snapshot(m2, opt2)
    match = f"saved by {src}, not {dst}" if recorded else "hyperparameters differ from this optimizer's"
    with pytest.raises(ValueError, match=match):
        opt2.load_state_dict(sd)
    assert_unchanged(snap, m2, opt2)


def test_state_dict_into_compositional_muon_names_the_class_first():
    _, opt = _trained("NorMuon")
    m2, opt2 = _trained("CompositionalMuon")
    snap = snapshot(m2, opt2)
    with pytest.raises(ValueError, match="saved by NorMuon, not CompositionalMuon"):
        opt2.load_state_dict(opt.state_dict())
    assert_unchanged(snap, m2, opt2)


def test_wrong_shape_second_moment_is_refused():
    _, opt = _trained("NorMuon")
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["second_moment"] = torch.zeros(16, 16)  # NorMuon keeps one value per row
    m2, opt2 = _trained("NorMuon")
    with pytest.raises(ValueError, match=r"'second_moment' of parameter 0 has shape \(16, 16\), expected \(16, 1\)"):
        opt2.load_state_dict(sd)


def test_scheduler_keys_in_a_saved_group_load():
    m, opt = _trained("Muon")
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=10)  # adds momentum/max_lr/... to groups
    sd = opt.state_dict()
    _, opt2 = _trained("Muon")
    opt2.load_state_dict(sd)  # before a scheduler was attached to opt2
    assert opt2.param_groups[1]["momentum"] == opt.param_groups[1]["momentum"]


# ------------------------------------------------------------------------------------------------
# CompositionalMuon.from_model head counts, pairs with one gradient / one frozen weight
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_heads=5), "num_heads=5 was passed but the module has num_heads=4"),
        (dict(num_heads=2), "num_heads=2 was passed but the module has num_heads=4"),
        (dict(head_dim=8), "head_dim=8 was passed but the module has head_dim=4"),
        (dict(num_kv_heads=4), "num_kv_heads=4 was passed but the module has num_kv_heads=2"),
    ],
)
def test_from_model_head_counts_must_match_the_model(kw, match):
    with pytest.raises(ValueError, match=rf"attention 'attn': {match}"):
        CompositionalMuon.from_model(Tiny(), **kw)
    opt = CompositionalMuon.from_model(Tiny(), num_heads=4, head_dim=4, num_kv_heads=2)
    assert opt.param_groups[0]["cm_pairs"][0]["num_heads"] == 4


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_heads=5), "16 query rows are not divisible by num_heads=5"),
        (dict(num_heads=2, head_dim=4), r"num_heads=2 but 16 query rows / head_dim=4 = 4"),
        (dict(num_heads=4, num_kv_heads=4), "num_kv_heads=4 but the k weight has 2 heads"),
    ],
)
def test_from_model_head_counts_without_module_attributes_are_checked_against_the_weights(kw, match):
    m = Tiny()
    del m.attn.head_dim, m.attn.num_heads, m.attn.num_kv_heads
    with pytest.raises(ValueError, match=rf"attention 'attn': {match}"):
        CompositionalMuon.from_model(m, **kw)


def test_pair_with_one_gradient_raises_and_writes_nothing():
    m, opt = build("CompositionalMuon")
    set_grads(m)
    m.attn.o_proj.weight.grad = None
    with pytest.raises(ValueError, match=r"param group 0: CM pair 'attn.ov': W_o has no gradient but W_v has one"):
        opt.step()
    assert not opt.state
    m.attn.v_proj.weight.grad = None  # neither: skipped, the rest steps
    v0 = m.attn.v_proj.weight.detach().clone()
    opt.step()
    assert torch.equal(v0, m.attn.v_proj.weight) and not torch.equal(
        m.attn.k_proj.weight, build("Muon")[0].attn.k_proj.weight
    )


def test_pair_with_one_frozen_weight_is_refused_at_construction():
    m = Tiny()
    m.attn.k_proj.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"param group 0: CM pair 'attn.qk': W_k is frozen"):
        CompositionalMuon.from_model(m)
    m.attn.q_proj.weight.requires_grad_(False)  # both frozen: fine, the pair never has gradients
    CompositionalMuon.from_model(m)
