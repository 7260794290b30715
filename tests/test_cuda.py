"""Device-sensitive checks: the optimizers on an accelerator compute what they compute on CPU.

They run on the device named by ``COMPOSITIONAL_MUON_TEST_DEVICE`` (``bench/gpu_check.sh`` sets
``cuda``; its ``--tiny`` dry run sets ``cpu``), else on CUDA when it is available, else they are
skipped. Comparisons pin ``msign_dtype=torch.float32`` on both sides and allow float32 rounding
(the CUDA and CPU GEMMs, and CPU's Cholesky vs the accelerator's eigh whitening, round differently).
"""

import copy
import os

import pytest
import torch
from torch import nn

from compositional_muon import AttentionSpec, CompositionalMuon, Muon, cm_ov, cm_qk
from compositional_muon.cm import CMConfig, compiled_pair_update, pair_update
from compositional_muon.msign import default_msign_dtype, msign

DEVICE = os.environ.get("COMPOSITIONAL_MUON_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no accelerator (set COMPOSITIONAL_MUON_TEST_DEVICE)")
F32 = torch.float32


class Attn(nn.Module):
    def __init__(self, D=64, H=4, hkv=2, layers=2):
        super().__init__()
        d = D // H
        self.d, self.specs = d, []
        self.lin = nn.ModuleList()
        for i in range(layers):
            q, k, v, o = (nn.Linear(D, n, bias=False) for n in (H * d, hkv * d, hkv * d, D))
            o.weight.data = torch.randn(D, H * d) * 0.1
            self.lin.extend([q, k, v, o])
            self.specs.append(AttentionSpec.separate(f"l{i}", q, k, v, o, head_dim=d))


def _pair(seed=0):
    torch.manual_seed(seed)
    cpu = Attn()
    dev = copy.deepcopy(cpu).to(DEVICE)
    dev.specs = [
        AttentionSpec.separate(f"l{i}", *dev.lin[4 * i : 4 * i + 4], head_dim=dev.d) for i in range(len(cpu.specs))
    ]
    return cpu, dev


def _grads(model, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = (0.1 * torch.randn(p.shape, generator=g)).to(p.device)


def _close(a, b, tol):
    for x, y in zip(a.parameters(), b.parameters()):
        err = (x.detach().cpu() - y.detach().cpu()).abs().max() / y.detach().abs().max()
        assert err < tol, f"relative difference {err:.2e} >= {tol}"


def test_default_msign_dtype_on_device():
    expect = torch.bfloat16 if DEVICE != "cpu" else default_msign_dtype("cpu")
    if os.environ.get("COMPOSITIONAL_MUON_MSIGN_DTYPE"):
        pytest.skip("precision forced by the environment")
    assert default_msign_dtype(DEVICE) == expect


@pytest.mark.parametrize("backend", ["polar_express", "newton_schulz"])
def test_msign_on_device_matches_cpu(backend):
    x = torch.randn(6, 16, 96, generator=torch.Generator().manual_seed(1))
    ref = msign(x, backend, dtype=F32)
    out = msign(x.to(DEVICE), backend, dtype=F32)
    assert out.device.type == torch.device(DEVICE).type and out.dtype == F32
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=2e-4)
    sv = torch.linalg.svdvals(msign(x.to(DEVICE), backend, dtype=torch.bfloat16).float().cpu())
    assert sv.min() > 0.5 and sv.max() < 1.25  # the band of the bf16 iteration


def test_muon_on_device_matches_cpu():
    cpu, dev = _pair()
    oc = Muon(cpu.parameters(), lr=0.02, msign_dtype=F32)
    od = Muon(dev.parameters(), lr=0.02, msign_dtype=F32)
    for s in range(3):
        _grads(cpu, s), _grads(dev, s)
        oc.step(), od.step()
    assert all(st["momentum_buffer"].device.type == torch.device(DEVICE).type for st in od.state.values())
    _close(dev, cpu, 1e-5)


@pytest.mark.parametrize("kw", [{}, dict(isotropic=True), dict(hybrid=False), dict(method="joint", hybrid=False)])
def test_compositional_muon_on_device_matches_cpu(kw):
    cpu, dev = _pair()
    oc = CompositionalMuon([dict(kind="cm", attention=cpu.specs, lr=0.02, msign_dtype=F32, **kw)])
    od = CompositionalMuon([dict(kind="cm", attention=dev.specs, lr=0.02, msign_dtype=F32, **kw)])
    for s in range(3):
        _grads(cpu, s), _grads(dev, s)
        oc.step(), od.step()
    _close(dev, cpu, 1e-4)


def test_stacked_step_equals_functional_per_layer_on_device():
    _, dev = _pair()
    ref = copy.deepcopy(dev)
    opt = CompositionalMuon([dict(kind="cm", attention=dev.specs, lr=0.02, msign_dtype=F32)])
    _grads(dev, 0)
    opt.step()
    _grads(ref, 0)
    for i in range(len(dev.specs)):
        q, k, v, o = ref.lin[4 * i : 4 * i + 4]
        ms = [torch.zeros_like(w.weight) for w in (q, k, v, o)]
        kw = dict(head_dim=ref.d, eta=0.02, msign_dtype=F32, num_kv_heads=k.weight.shape[0] // ref.d)
        with torch.no_grad():
            cm_qk(q.weight, k.weight, q.weight.grad, k.weight.grad, ms[0], ms[1], **kw)
            cm_ov(v.weight, o.weight, v.weight.grad, o.weight.grad, ms[2], ms[3], **kw)
    _close(dev, ref, 1e-5)


def test_compiled_pair_update_on_device():
    g = torch.Generator().manual_seed(3)
    # (layers, heads, d, D): 4 query heads sharing 2 key heads
    A, B, Ua, Ub = (torch.randn(2, h, 8, 32, generator=g).to(DEVICE) for h in (4, 2, 4, 2))
    cfg = CMConfig(msign_dtype=F32, hybrid=False)
    ref = pair_update(A, B, Ua, Ub, 0.02, cfg)
    out = compiled_pair_update(A, B, Ua, Ub, 0.02, cfg, backend="eager" if DEVICE == "cpu" else "inductor")
    for x, y in zip(out, ref):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_state_dict_moves_between_devices():
    cpu, dev = _pair()
    od = CompositionalMuon([dict(kind="cm", attention=dev.specs, lr=0.02, msign_dtype=F32)])
    _grads(dev, 0)
    od.step()
    cpu.load_state_dict({k: v.cpu() for k, v in dev.state_dict().items()})
    oc = CompositionalMuon([dict(kind="cm", attention=cpu.specs, lr=0.02, msign_dtype=F32)])
    oc.load_state_dict(copy.deepcopy(od.state_dict()))  # torch.optim moves state to each param's device
    _grads(cpu, 1), _grads(dev, 1)
    oc.step(), od.step()
    _close(dev, cpu, 1e-4)
