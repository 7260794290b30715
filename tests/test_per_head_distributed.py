"""PerHeadMuon and expert stacks under DDP and FSDP2 (gloo, 2 ranks): equal to one process.

PerHeadMuon: float32 msigns (pinned), tolerance 1e-5 relative, as tests/test_distributed.py. The
MoE model runs in float64 (tolerance 1e-9): in float32, CM's whitened W_o update amplifies the
~1e-7 rounding differences of the sharded gradients to ~2e-5 of the weights, which is rounding, not
a path difference.
"""

from __future__ import annotations

import pytest
import torch

from compositional_muon import CompositionalMuon, Muon, PerHeadMuon
from compositional_muon.training import dist as TD
from compositional_muon.training.models import build_model
from dist_harness import result as _result
from dist_harness import run_world
from test_distributed import GQA, MHA, batches, full_params, make_model, rel_errors, train

F32 = torch.float32
F64 = torch.float64
TOL = 1e-5
STEPS = 3
MOE = dict(n_layer=1, n_embd=16, n_head=4, n_kv_head=2, n_experts=4, top_k=2, block_size=8, aux_loss_weight=0.0)


def build(name, model, distributed="auto"):
    if name == "per_head":
        return PerHeadMuon.from_model(
            model, lr=0.02, adamw_lr=1e-2, weight_decay=0.01, msign_dtype=F32, distributed=distributed
        )
    if name == "per_head_rms":
        return PerHeadMuon.from_model(
            model, lr=3e-3, adamw_lr=1e-2, adjust_lr_fn="match_rms_adamw", msign_dtype=F32, distributed=distributed
        )
    if name == "muon_moe":
        from compositional_muon.training.recipes import matrix_and_adamw_groups

        groups = matrix_and_adamw_groups(model, lr=0.02, adamw_lr=1e-2, weight_decay=0.0, adamw_weight_decay=0.0)
        return Muon(groups, msign_dtype=F64, distributed=distributed)
    if name == "cm_moe":
        return CompositionalMuon.from_model(model, lr=0.02, adamw_lr=1e-2, msign_dtype=F64, distributed=distributed)
    raise KeyError(name)


def moe_model():
    torch.manual_seed(0)
    return build_model("moe-gpt", **MOE).double()


def moe_train(model, opt, rank=0, world=1):
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randint(0, 256, (4, 8), generator=g)
        per = 4 // world
        xs = x[rank * per : (rank + 1) * per]
        opt.zero_grad(set_to_none=True)
        _, loss = model(xs[:, :-1], xs[:, 1:])
        loss.backward()
        opt.step()


def sc_per_head(rank, world):
    out = {}
    for cfg_name, cfg in (
        ("gqa", GQA),
        ("mha", MHA),
        ("fused", dict(MHA, attn="fused")),
        ("conv1d", dict(MHA, attn="conv1d")),
    ):
        data = batches(cfg["V"], STEPS)
        for name in ("per_head", "per_head_rms"):
            if rank == 0:
                ref_model = make_model(cfg)
                init = full_params(ref_model)
                train(ref_model, build(name, ref_model, distributed=False), data)
                ref = full_params(ref_model)
            for mode in ("ddp", "fsdp2"):
                model = TD.wrap_model(make_model(cfg), mode)
                train(model, build(name, TD.unwrap_model(model)), data, rank, world)
                got = full_params(model)
                if rank == 0:
                    out[f"{cfg_name}/{name}/{mode}"] = rel_errors(got, ref, init)[0]
    return out


def sc_moe(rank, world):
    out = {}
    for name in ("muon_moe", "cm_moe"):
        if rank == 0:
            ref_model = moe_model()
            init = full_params(ref_model)
            moe_train(ref_model, build(name, ref_model, distributed=False))
            ref = full_params(ref_model)
        for mode in ("ddp", "fsdp2"):
            model = TD.wrap_model(moe_model(), mode)
            moe_train(model, build(name, TD.unwrap_model(model)), rank, world)
            got = full_params(model)
            if rank == 0:
                out[f"{name}/{mode}"] = rel_errors(got, ref, init)[0]
    return out


@pytest.fixture(scope="module")
def world2():
    jobs = [("per_head", "sc_per_head", ()), ("moe", "sc_moe", ())]
    return run_world(2, jobs, __name__, prefix="cm-perhead")


def test_per_head_muon_ddp_and_fsdp2_equal_one_process(world2):
    res = _result(world2, "per_head")
    assert len(res) == 16
    for key, rel in res.items():
        assert rel < TOL, (key, rel)


def test_expert_stacks_ddp_and_fsdp2_equal_one_process(world2):
    res = _result(world2, "moe")
    assert len(res) == 4
    for key, rel in res.items():
        assert rel < 1e-9, (key, rel)
