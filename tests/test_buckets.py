"""Byte-capped buckets: the plan keeps every bucket under its limit and same shapes together."""

import itertools

import pytest
import torch

from compositional_muon.buckets import MIN_BUCKET_BYTES, check_bucket_bytes, plan, work_bytes

MIB = 2**20


def test_work_bytes_counts_the_msign_working_set():
    p = torch.zeros(64, 256)  # fp32, working bf16: 64*256*(3*4 + 3*2) + 2*64*64*2
    assert work_bytes(p, torch.bfloat16) == 64 * 256 * 18 + 2 * 64 * 64 * 2
    conv = torch.zeros(8, 4, 3, 3)  # as the 8 x 36 matrix
    assert work_bytes(conv, torch.float32) == 8 * 36 * 24 + 2 * 8 * 8 * 4


def test_plan_respects_the_limit_and_keeps_every_param_once():
    ps = [torch.zeros(256, 256) for _ in range(6)] + [torch.zeros(128, 256) for _ in range(5)] + [torch.zeros(256, 64)]
    cap = 3 * MIB
    buckets = plan(ps, cap, torch.float32)
    assert sorted(id(p) for b in buckets for p in b) == sorted(id(p) for p in ps)
    for b in buckets:
        assert len(b) == 1 or sum(work_bytes(p, torch.float32) for p in b) <= cap
    # same shapes stay adjacent (one run per shape), so they still share batched msign calls
    runs = [k for k, _ in itertools.groupby(tuple(p.shape) for b in buckets for p in b)]
    assert len(runs) == len(set(runs)) == 3


def test_small_groups_use_a_fraction_of_their_weights_and_none_is_one_bucket():
    ps = [torch.zeros(512, 512) for _ in range(40)]  # 40 MiB of weights, 16 MiB limit at 0.4x
    buckets = plan(ps, 2**40, torch.bfloat16)
    per = work_bytes(ps[0], torch.bfloat16)
    assert all(len(b) == max(1, int(16 * MIB // per)) for b in buckets[:-1])
    assert plan(ps, None) == [ps] and plan([], 10) == []
    tiny = [torch.zeros(8, 8) for _ in range(4)]
    assert len(plan(tiny, 2**40)) == 1  # under MIN_BUCKET_BYTES: one bucket
    assert MIN_BUCKET_BYTES == 4 * MIB


def test_a_matrix_over_the_cap_is_its_own_bucket():
    big, small = torch.zeros(1024, 1024), torch.zeros(16, 16)
    buckets = plan([small, big, small.clone()], 1 * MIB, torch.float32)
    assert [len(b) for b in buckets] == [2, 1] and buckets[1][0] is big


@pytest.mark.parametrize("bad", [0, -1, 1.5, float("inf"), float("nan"), True, "256MiB"])
def test_bad_bucket_bytes_raise(bad):
    with pytest.raises(ValueError, match="bucket_bytes"):
        check_bucket_bytes(bad)
    assert check_bucket_bytes(None) is None and check_bucket_bytes(2**28) == 2**28


# ------------------------------------------------------------------------------------------------
# The optimizers on buckets: same result, bounded memory
# ------------------------------------------------------------------------------------------------


def _mats(n=16, shape=(256, 256), seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(0.02 * torch.randn(*shape, generator=g)) for _ in range(n)]
    ps += [torch.nn.Parameter(0.02 * torch.randn(128, 256, generator=g)) for _ in range(3)]
    return ps


def _set_grads(ps, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.grad = 0.01 * torch.randn(p.shape, generator=g)


def _peak_step_bytes(opt) -> int:
    """Most tensor memory allocated at once during ``opt.step()`` beyond what existed before it
    (the profiler's allocation events, summed in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    run = peak = 0
    for e in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if e.name() == "[memory]":
            run += e.nbytes()
            peak = max(peak, run)
    return peak


@pytest.mark.filterwarnings("ignore:NewtonMuon")
@pytest.mark.parametrize("name", ["Muon", "NorMuon", "AdaMuon", "Mano", "NewtonMuon"])
def test_bucketed_steps_equal_the_one_bucket_step(name, one_thread):
    from compositional_muon import Muon
    from compositional_muon.variants import AdaMuon, Mano, NewtonMuon, NorMuon

    cls = dict(Muon=Muon, NorMuon=NorMuon, AdaMuon=AdaMuon, Mano=Mano, NewtonMuon=NewtonMuon)[name]
    a, b = _mats(), _mats()
    kw = {} if name == "Mano" else dict(msign_dtype=torch.float32)
    one = cls(a, lr=0.02, bucket_bytes=None, **kw)
    many = cls(b, lr=0.02, bucket_bytes=MIB, **kw)
    assert len(plan(b, MIB, torch.float32)) > 4
    for s in range(3):
        _set_grads(a, s), _set_grads(b, s)
        one.step(), many.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_muon_step_memory_stays_under_the_cap_when_the_matrices_exceed_it(dtype, one_thread):
    from compositional_muon import Muon

    ps = _mats(n=24, shape=(256, 512))  # 12.8 MiB of weights, well over the cap
    per = work_bytes(ps[0], dtype)
    cap = per + per // 2  # room for one matrix per bucket, not two
    opt = Muon(ps, lr=0.02, msign_dtype=dtype, bucket_bytes=cap)
    _set_grads(ps, 0)
    opt.step()  # creates the momentum buffers (state, not transient)
    _set_grads(ps, 1)
    peak = _peak_step_bytes(opt)
    weights = sum(p.numel() * p.element_size() for p in ps)
    assert peak <= cap, (peak, cap)
    unbounded = Muon(_mats(n=24, shape=(256, 512)), lr=0.02, msign_dtype=dtype, bucket_bytes=None)
    _set_grads(unbounded.param_groups[0]["params"], 0)
    unbounded.step()
    _set_grads(unbounded.param_groups[0]["params"], 1)
    assert _peak_step_bytes(unbounded) > 2 * weights  # what the cap prevents
