"""CompositionalMuon's CM step in byte-capped buckets (cm_stream.py): the same result as one
bucket, bounded memory, and the all-or-nothing guarantee with lam=0."""

import pytest
import torch
from torch import nn

from compositional_muon import AttentionSpec, CompositionalMuon, NonFiniteError, cm_stream
from compositional_muon.buckets import MIN_BUCKET_BYTES, pair_work_bytes
from compositional_muon.parallel.strategy import local_buckets

MIB = 2**20


class Attn(nn.Module):
    def __init__(self, D: int, H: int, hkv: int, d: int):
        super().__init__()
        self.q, self.k = nn.Linear(D, H * d, bias=False), nn.Linear(D, hkv * d, bias=False)
        self.v = nn.Linear(D, hkv * d, bias=False)
        self.o = nn.Linear(H * d, D, bias=False)
        self.spec = lambda name: AttentionSpec.separate(name, self.q, self.k, self.v, self.o, head_dim=d)


def _model(layers=4, D=64, H=4, hkv=4, d=16, gqa_layers=2, seed=0):
    """``layers`` MHA layers and ``gqa_layers`` GQA layers (2 kv heads): two shapes per pair kind."""
    torch.manual_seed(seed)
    m = nn.ModuleList([Attn(D, H, hkv, d) for _ in range(layers)] + [Attn(D, H, 2, d) for _ in range(gqa_layers)])
    m.add_module("mlp", nn.Linear(D, 2 * D, bias=False))  # a Muon matrix
    m.add_module("gain", nn.Linear(1, D))  # AdamW (weight and bias)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.05)
    return m


def _opt(m, bucket_bytes, muon=True, **cm):
    specs = [layer.spec(f"l{i}") for i, layer in enumerate(m[: len(m) - 2])]
    groups = [dict(kind="cm", attention=specs, lr=0.02, **cm)]
    if muon:
        groups += [
            dict(kind="muon", params=[m.mlp.weight], lr=0.02),
            dict(kind="adamw", params=[m.gain.weight, m.gain.bias], lr=1e-3),
        ]
    return CompositionalMuon(groups, bucket_bytes=bucket_bytes)


def _grads(m, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in m.parameters():
        p.grad = 0.01 * torch.randn(p.shape, generator=g)


def _snapshot(m, opt):
    params = [p.detach().clone() for p in m.parameters()]
    state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in m.parameters()]
    counters = [g["skipped_steps"] for g in opt.param_groups]
    return params, state, counters


def _assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    for sx, sy in zip(a[1], b[1]):
        assert sx.keys() == sy.keys()
        for k in sx:
            assert torch.equal(sx[k], sy[k]) if torch.is_tensor(sx[k]) else sx[k] == sy[k], k
    assert a[2] == b[2]


def _n_buckets(opt):
    g = opt.param_groups[0]
    return len(local_buckets(cm_stream.prepare(opt, g)))


VARIANTS = {
    "full": {},
    "isotropic": dict(isotropic=True),
    "hybrid_off": dict(hybrid=False),
    "joint": dict(method="joint"),
    "joint_hybrid_off": dict(method="joint", hybrid=False),
    "whitening_pre": dict(whitening="pre"),
    "whitening_post": dict(whitening="post"),
    "whitening_none": dict(whitening="none"),
    "normuon": dict(transform="normuon"),
    "connection": dict(connection="frobenius", momentum_reproject=True),
    "nesterov_renorm": dict(nesterov=True, per_mat_renorm=True, weight_decay=0.1),
    "match_rms": dict(adjust_lr_fn="match_rms_adamw"),
    "lam0": dict(lam=0.0),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bucketed_cm_equals_one_bucket_bit_for_bit(variant, one_thread):
    a, b = _model(), _model()
    one, many = _opt(a, None, **VARIANTS[variant]), _opt(b, 1, **VARIANTS[variant])
    for s in range(3):
        _grads(a, s), _grads(b, s)
        assert _n_buckets(one) == 4 and _n_buckets(many) == 12  # (qk, ov) x (MHA, GQA); one pair each
        one.step(), many.step()
    _assert_same(_snapshot(a, one), _snapshot(b, many))


def test_bucket_bytes_is_a_cm_group_option(one_thread):
    m = _model()
    opt = _opt(m, 2**30, muon=False)
    _grads(m, 0)
    assert opt.param_groups[0]["bucket_bytes"] == 2**30  # the optimizer's, by default
    assert _n_buckets(opt) == 4
    opt.param_groups[0]["bucket_bytes"] = 1
    assert _n_buckets(opt) == 12
    with pytest.raises(ValueError, match="CM group's bucket_bytes"):
        CompositionalMuon([dict(kind="cm", attention=[m[0].spec("l0")], bucket_bytes=0.5)])
    opt.param_groups[0]["bucket_bytes"] = -3
    with pytest.raises(ValueError, match="param group 0: bucket_bytes"):
        opt.step()
    # a checkpoint written before the option existed: the optimizer's bucket_bytes applies
    opt.param_groups[0]["bucket_bytes"] = None
    sd = opt.state_dict()
    del sd["param_groups"][0]["bucket_bytes"]
    fresh = _opt(m, 1, muon=False)
    fresh.load_state_dict(sd)
    assert "bucket_bytes" not in fresh.param_groups[0] and _n_buckets(fresh) == 12
    fresh.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cm_step_memory_stays_under_the_cap(dtype, one_thread):
    from test_buckets import _peak_step_bytes

    def build(bucket_bytes):
        m = _model(layers=8, D=256, H=4, d=64, gqa_layers=0)  # 16 pairs, 8 MiB of CM weights
        opt = _opt(m, bucket_bytes, muon=False, msign_dtype=dtype)
        _grads(m, 0)
        opt.step()  # creates the momentum buffers (state, not transient)
        _grads(m, 1)
        return m, opt

    per = pair_work_bytes(2 * 256 * 256, torch.float32, dtype)
    cap = per + per // 2  # room for one pair per bucket, not two
    assert cap > MIN_BUCKET_BYTES  # the limit is the 4 MiB floor: 0.4 x 8 MiB is below it
    (m, opt), (m1, one) = build(cap), build(None)
    weights = sum(p.numel() * p.element_size() for p in opt.param_groups[0]["params"])
    assert _n_buckets(opt) == 16 and weights == 8 * MIB
    peak = _peak_step_bytes(opt)
    assert peak <= min(cap, MIN_BUCKET_BYTES), (peak, cap)  # the limit: min(cap, max(4 MiB, 0.4 x 8 MiB))
    assert _peak_step_bytes(one) > 2 * weights  # what the cap prevents
    for x, y in zip(m.parameters(), m1.parameters()):
        assert torch.equal(x, y)


def _singular_last_bucket(m):
    """Zero one value head of the last GQA layer: its OV pair (the last bucket) has a singular
    partner Gram ``B_g B_g^T``, so with lam=0 its ``dA`` is NaN."""
    with torch.no_grad():
        m[len(m) - 3].v.weight[:16].zero_()


@pytest.mark.parametrize("bucket_bytes", [1, None])
def test_lam0_singular_partner_in_the_last_bucket_writes_nothing(bucket_bytes, one_thread):
    m = _model()
    opt = _opt(m, bucket_bytes, lam=0.0)
    _grads(m, 0)
    opt.step()  # momenta, AdamW moments and step counters exist
    _singular_last_bucket(m)
    _grads(m, 1)
    before = _snapshot(m, opt)
    with pytest.raises(NonFiniteError, match=r"l5\.ov.*nothing was written"):
        opt.step()
    _assert_same(before, _snapshot(m, opt))


def test_without_the_prepass_a_late_failure_says_earlier_buckets_were_written(monkeypatch, one_thread):
    m = _model()
    opt = _opt(m, 1, muon=False, lam=0.0)
    _grads(m, 0)
    opt.step()
    _singular_last_bucket(m)
    _grads(m, 1)
    before = _snapshot(m, opt)
    monkeypatch.setattr(cm_stream, "_prepass", lambda jobs: None)
    with pytest.raises(NonFiniteError, match=r"11 earlier bucket\(s\) of this CM step were already written"):
        opt.step()
    changed = [not torch.equal(x, y) for x, y in zip(before[0], _snapshot(m, opt)[0])]
    assert any(changed) and all(torch.isfinite(p).all() for p in m.parameters())


def test_only_small_lam_runs_the_prepass(monkeypatch, one_thread):
    calls = []
    real = cm_stream._prepass
    monkeypatch.setattr(cm_stream, "_prepass", lambda jobs: calls.append(len(jobs)) or real(jobs))
    for lam in (1e-2, cm_stream.PREPASS_LAM, 1e-5, 0.0):
        m = _model()
        opt = _opt(m, 1, muon=False, lam=lam)
        _grads(m, 0)
        opt.step()
    assert calls == [0, 0, 1, 1]


def test_stack_views_reads_one_pair_in_place_and_keeps_each_layers_memory_layout():
    """A bucket of one pair reads its weights, gradients and momenta in place (no copy) for the
    rows of q/k/v and the columns of W_o; several are stacked in the layout of their views; a
    view that is not a permuted dense block (every other row) is stacked contiguously."""
    from compositional_muon.attention import head_view
    from compositional_muon.parallel.strategy import stack_views

    H, d, D = 4, 8, 32
    ws = [torch.randn(H * d, D) for _ in range(3)]
    for axis, make in ((0, lambda w: w), (1, lambda w: w.T.contiguous())):
        views = [head_view(make(w), axis, 0, d, H, d) for w in ws]
        one = stack_views(views[:1])
        assert one.shape == (1, H, d, D) and one.data_ptr() == views[0].data_ptr()
        assert one[0].stride() == views[0].stride()
        many = stack_views(views)
        assert torch.equal(many, torch.stack(views)) and many[1].stride() == views[1].stride()
    strided = [w[::2].unflatten(0, (H // 2, d)) for w in ws]
    out = stack_views(strided[:1])
    assert out.is_contiguous() and out.data_ptr() != strided[0].data_ptr()
    assert torch.equal(out[0], strided[0])
