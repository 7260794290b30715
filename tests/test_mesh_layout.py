"""Placements -> boxes of global indices (mesh_layout), without a process group."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from compositional_muon.parallel.mesh import UnsupportedLayout, _box, _index_sets


def boxes(shape, mesh_shape, placements):
    out = {}
    for c in [(i, j) for i in range(mesh_shape[0]) for j in range(mesh_shape[1])]:
        out[c] = _box(_index_sets(shape, mesh_shape, c, placements), shape, "w")
    return out


def test_fsdp_x_tp_colwise_rows_are_tp_major_ranges():
    # parallelize_module(ColwiseParallel) over tp, then fully_shard over dp: rows 16 on a 2 x 2 mesh
    got = boxes((16, 8), (2, 2), (_StridedShard(0, split_factor=2), Shard(0)))
    assert got == {
        (0, 0): ((0, 4), (0, 8)),
        (1, 0): ((4, 8), (0, 8)),
        (0, 1): ((8, 12), (0, 8)),
        (1, 1): ((12, 16), (0, 8)),
    }


def test_fsdp_x_tp_rowwise_is_a_box_and_hsdp_copies():
    got = boxes((8, 16), (2, 2), (Shard(0), Shard(1)))
    assert got[(1, 0)] == ((4, 8), (0, 8)) and got[(0, 1)] == ((0, 4), (8, 16))
    hsdp = boxes((6, 4), (2, 2), (Replicate(), Shard(0)))
    assert hsdp[(0, 1)] == hsdp[(1, 1)] == ((3, 6), (0, 4))


def test_uneven_and_empty_parts():
    got = boxes((5, 3), (1, 4), (Replicate(), Shard(0)))
    assert [got[(0, j)][0] for j in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]


def test_a_strided_part_that_is_not_a_range_is_refused():
    # _StridedShard alone on a mesh dim: rank 0 holds rows {0, 1, 4, 5}
    with pytest.raises(UnsupportedLayout, match="not contiguous"):
        boxes((8, 2), (2, 1), (_StridedShard(0, split_factor=2), Replicate()))


def test_three_d_expert_stacks():
    idx = _index_sets((4, 3, 2), (2,), (1,), (Shard(0),))
    assert _box(idx, (4, 3, 2), "experts") == ((2, 4), (0, 3), (0, 2))
    assert torch.equal(idx[0], torch.tensor([2, 3]))
