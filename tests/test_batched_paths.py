"""The batched fast paths compute what the per-matrix paths compute (correctness only, no timing).

* msign of a stack of head blocks == msign of each block;
* the CM kernel on ``L`` stacked layers == the kernel on each layer, for every variant;
* CompositionalMuon's layer-stacked step == per-layer ``cm_qk`` / ``cm_ov`` calls;
* Muon's same-shape batching == one optimizer per matrix;
* the Cholesky whitening (CPU default for the half-split rule) == the symmetric eigh root;
* the compiled kernel == the eager kernel.
"""

import copy

import pytest
import torch
from torch import nn

from compositional_muon import AttentionSpec, CompositionalMuon, Muon, cm_ov, cm_qk
from compositional_muon.cm import CMConfig, compiled_pair_update, pair_update
from compositional_muon.inverse_root import inverse_cholesky_factor, inverse_sqrt_eigh
from compositional_muon.msign import DTYPE_ENV, default_msign_dtype, msign

F64 = torch.float64


def rnd(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# msign: per-head batch vs a loop
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["polar_express", "newton_schulz", "svd"])
@pytest.mark.parametrize("shape", [(3, 4, 8, 40), (2, 5, 40, 8), (6, 16, 16)])
def test_per_head_msign_batch_equals_loop(backend, shape):
    x = rnd(*shape, seed=1)
    kw = {} if backend == "svd" else dict(dtype=F64)
    y = msign(x, backend, **kw)
    flat_x, flat_y = x.reshape(-1, *shape[-2:]), y.reshape(-1, *shape[-2:])
    for i in range(flat_x.size(0)):
        torch.testing.assert_close(flat_y[i], msign(flat_x[i], backend, **kw), rtol=0, atol=1e-12)


def test_msign_float32_batch_equals_loop():
    x = rnd(12, 8, 48, seed=2, dtype=torch.float32)
    y = msign(x, "polar_express", dtype=torch.float32)
    for i in range(12):
        torch.testing.assert_close(y[i], msign(x[i], "polar_express", dtype=torch.float32), rtol=0, atol=1e-5)


def test_msign_empty_batch_and_dtype():
    y = msign(torch.zeros(0, 4, 6), "polar_express")
    assert y.shape == (0, 4, 6)
    assert msign(torch.randn(3, 5), "polar_express").dtype == torch.float32


def test_default_msign_dtype_choice_and_override(monkeypatch):
    from compositional_muon.msign import cpu_has_native_bf16

    monkeypatch.delenv(DTYPE_ENV, raising=False)  # the machine's own choice, whatever the suite forces
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert default_msign_dtype("cpu") == expected
    assert default_msign_dtype("cpu") is default_msign_dtype(torch.device("cpu"))  # cached per device type
    assert cpu_has_native_bf16("processor : 0\nflags : fpu sse2 avx avx2 fma\n") is False
    assert cpu_has_native_bf16("flags : avx2 avx512f avx512_bf16\n") is True
    assert cpu_has_native_bf16("flags : avx2 amx_tile amx_bf16\n") is True
    assert cpu_has_native_bf16("Features : fp asimd sve bf16\n") is True
    assert cpu_has_native_bf16("") is False
    monkeypatch.setenv(DTYPE_ENV, "bfloat16")
    assert default_msign_dtype("cpu") == torch.bfloat16
    x = torch.randn(8, 24)
    torch.testing.assert_close(msign(x), msign(x, dtype=torch.bfloat16), rtol=0, atol=0)
    monkeypatch.setenv(DTYPE_ENV, "int8")
    with pytest.raises(ValueError, match=DTYPE_ENV):
        default_msign_dtype("cpu")


# ------------------------------------------------------------------------------------------------
# The CM kernel: L stacked layers vs one layer at a time
# ------------------------------------------------------------------------------------------------

VARIANTS = [
    dict(),
    dict(hybrid=True),
    dict(isotropic=True),
    dict(method="joint"),
    dict(method="joint", hybrid=True),
    dict(whitening="pre"),
    dict(whitening="post"),
    dict(whitening="none", per_mat_renorm=True),
    dict(per_mat_renorm=True, hybrid=True),
    dict(connection="frobenius"),
    dict(connection="scale_aware"),
    dict(connection="frobenius_scalar"),
    dict(connection="scale_aware_scalar", isotropic=True),
    dict(root_method="newton"),
]


def kernel_inputs(L, H, hkv, d=4, D=12, seed=0):
    return (
        rnd(L, H, d, D, seed=seed),
        rnd(L, hkv, d, D, seed=seed + 1),
        rnd(L, H, d, D, seed=seed + 2),
        rnd(L, hkv, d, D, seed=seed + 3),
    )


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("H,hkv", [(4, 4), (4, 2)])
def test_layer_stacked_kernel_equals_per_layer(kw, H, hkv):
    # hybrid=False unless the variant says so (CMConfig's default is the reference's hybrid=True)
    cfg = CMConfig(msign_backend="polar_express", msign_dtype=F64, msign_steps=12, **{"hybrid": False, **kw})
    A, B, Ua, Ub = kernel_inputs(3, H, hkv)
    dA, dB = pair_update(A, B, Ua, Ub, 0.1, cfg)
    for layer in range(3):
        a, b = pair_update(
            A[layer : layer + 1], B[layer : layer + 1], Ua[layer : layer + 1], Ub[layer : layer + 1], 0.1, cfg
        )
        torch.testing.assert_close(dA[layer], a[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(dB[layer], b[0], rtol=0, atol=1e-12)


def test_per_head_kernel_equals_one_head_at_a_time():
    # hybrid=False, MHA: every (A_h, B_h) pair is independent, so the kernel on H heads must equal
    # the kernel on each single-head slice (the batched msign over [A heads | B heads] included).
    cfg = CMConfig(msign_backend="polar_express", msign_dtype=F64, hybrid=False)
    A, B, Ua, Ub = kernel_inputs(2, 3, 3, seed=4)
    dA, dB = pair_update(A, B, Ua, Ub, 0.2, cfg)
    for h in range(3):
        a, b = pair_update(A[:, h : h + 1], B[:, h : h + 1], Ua[:, h : h + 1], Ub[:, h : h + 1], 0.2, cfg)
        torch.testing.assert_close(dA[:, h], a[:, 0], rtol=0, atol=1e-12)
        torch.testing.assert_close(dB[:, h], b[:, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("H,hkv,hybrid", [(4, 4, False), (4, 2, False), (4, 4, True), (4, 1, True)])
def test_cholesky_whitening_equals_symmetric_root(H, hkv, hybrid):
    # auto on CPU whitens the half-split rule with L^-1 / L^-T; "eigh" uses the symmetric root.
    A, B, Ua, Ub = kernel_inputs(2, H, hkv, seed=7)
    for lam in (1e-2, 0.0):
        ms = dict(msign_backend="svd", lam=lam, hybrid=hybrid)
        fast = pair_update(A, B, Ua, Ub, 0.1, CMConfig(root_method="auto", **ms))
        ref = pair_update(A, B, Ua, Ub, 0.1, CMConfig(root_method="eigh", **ms))
        for x, y in zip(fast, ref):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-11)


def test_inverse_cholesky_factor_whitens_and_flags_singular():
    w = rnd(5, 6, 20, seed=3)
    G = w @ w.mT
    Linv = inverse_cholesky_factor(G, 1e-2)
    eye = torch.eye(6, dtype=F64)
    torch.testing.assert_close(Linv @ (G + 1e-2 * eye) @ Linv.mT, eye.expand(5, 6, 6), rtol=0, atol=1e-10)
    R = inverse_sqrt_eigh(G, 1e-2)
    torch.testing.assert_close(Linv.mT @ Linv, R @ R, rtol=0, atol=1e-9)  # both give (G + lam I)^-1
    assert torch.isnan(inverse_cholesky_factor(torch.zeros(2, 3, 3), 0.0)).all()


# ------------------------------------------------------------------------------------------------
# CompositionalMuon: one stacked kernel call vs per-layer functional calls
# ------------------------------------------------------------------------------------------------


class Layer(nn.Module):
    def __init__(self, D, H, hkv):
        super().__init__()
        d = D // H
        self.q_proj, self.o_proj = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
        self.k_proj, self.v_proj = nn.Linear(D, hkv * d, bias=False), nn.Linear(D, hkv * d, bias=False)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(isotropic=True),
        dict(method="joint", hybrid=False),
        dict(connection="frobenius"),
        dict(hybrid=False, whitening="post"),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default",
)
@pytest.mark.parametrize("hkv", [4, 2])
def test_compositional_muon_stacked_equals_per_layer_cm_calls(kw, hkv):
    torch.manual_seed(0)
    D, H, d, L = 16, 4, 4, 3
    layers = nn.ModuleList(Layer(D, H, hkv) for _ in range(L)).double()
    ref = copy.deepcopy(layers)
    for m in (layers, ref):
        for p in m.parameters():
            p.grad = torch.randn(p.shape, dtype=F64, generator=torch.Generator().manual_seed(p.numel() + p.shape[0]))
    specs = [
        AttentionSpec.separate(f"l{i}", l.q_proj, l.k_proj, l.v_proj, l.o_proj, head_dim=d)
        for i, l in enumerate(layers)
    ]
    opt = CompositionalMuon([dict(kind="cm", attention=specs, lr=0.05, msign_backend="svd", **kw)])
    momenta = {id(p): torch.zeros_like(p) for p in ref.parameters()}
    for step in range(2):
        opt.step()
        for l in ref:
            q, k, v, o = l.q_proj.weight, l.k_proj.weight, l.v_proj.weight, l.o_proj.weight
            common = dict(
                head_dim=d, eta=0.05, msign_backend="svd", **{k_: v_ for k_, v_ in kw.items() if k_ != "hybrid"}
            )
            with torch.no_grad():
                cm_qk(q, k, q.grad, k.grad, momenta[id(q)], momenta[id(k)], **common)
                cm_ov(v, o, v.grad, o.grad, momenta[id(v)], momenta[id(o)], hybrid=kw.get("hybrid", True), **common)
        for p, r in zip(layers.parameters(), ref.parameters()):
            torch.testing.assert_close(p, r, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Muon: same-shape batching vs one matrix per optimizer
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["newton_schulz", "svd"])
def test_muon_same_shape_batching_equals_separate(backend):
    torch.manual_seed(1)
    shapes = [(8, 12), (8, 12), (12, 8), (8, 12), (5, 5)]
    ps = [nn.Parameter(torch.randn(s, dtype=F64)) for s in shapes]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(lr=0.03, backend=backend, msign_dtype=F64 if backend != "svd" else None)
    batched = Muon(ps, **kw)
    separate = [Muon([q], **kw) for q in qs]
    for step in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, dtype=F64, generator=torch.Generator().manual_seed(step * 10 + p.numel()))
            q.grad = p.grad.clone()
        batched.step()
        for o in separate:
            o.step()
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------


def _compile_available() -> bool:
    if not hasattr(torch, "compile"):
        return False
    try:
        from torch._dynamo import is_dynamo_supported
    except ImportError:
        return False
    return is_dynamo_supported()


@pytest.mark.skipif(not _compile_available(), reason="torch.compile is unavailable in this build / Python")
def test_compiled_pair_update_equals_eager():
    # tiny shapes: compiling is slow on a small CPU
    cfg = CMConfig(msign_dtype=torch.float32, hybrid=True)
    A, B, Ua, Ub = (t.float() for t in kernel_inputs(2, 2, 2, d=4, D=8, seed=11))
    eager = pair_update(A, B, Ua, Ub, 0.1, cfg)
    for eta in (0.1, 0.05):  # a new learning rate must not change the result's correctness
        got = compiled_pair_update(A, B, Ua, Ub, eta, cfg)
        want = pair_update(A, B, Ua, Ub, eta, cfg)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_pair_update(A, B, Ua, Ub, 0.1, cfg)[0], eager[0], rtol=1e-4, atol=1e-5)
