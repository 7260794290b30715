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
