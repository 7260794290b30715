"""The torchtitan adapter on torchtitan's own debug Llama (CPU): attention layouts (fused MHA,
separate GQA), a step in the fused layout equal to the separate one, and FSDP2 on a 2-rank gloo
mesh equal to one process, with a DCP checkpoint written and resumed through torchtitan's
ModelWrapper and the container (float64; see docs/integrations.md for what needs a GPU)."""

import dataclasses
import datetime
import functools
import json
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytest.importorskip("torchtitan")
from torchtitan.components.checkpointer.base import ModelWrapper  # noqa: E402
from torchtitan.models.common.attention import ScaledDotProductAttention  # noqa: E402
from torchtitan.models.common.config_utils import make_gqa_config  # noqa: E402
from torchtitan.models.llama3 import model_registry  # noqa: E402

from compositional_muon import CompositionalMuon, MuonWithAuxAdam  # noqa: E402
from compositional_muon.integrations.torchtitan import (  # noqa: E402
    BUILDERS,
    CMOptimizersContainer,
    register_optimizer,
    titan_attention,
)

CM64 = dict(msign_dtype=torch.float64, msign_backend="svd")
_INIT = {"weight": functools.partial(nn.init.trunc_normal_, std=0.02), "bias": nn.init.zeros_}


def debug_llama(layers=2, n_kv_heads=None, fuse_qkv=True, seed=0, dtype=torch.float64):
    """torchtitan's "debugmodel" Llama 3 (dim 256, 16 heads, vocab 2048), cut to ``layers`` blocks,
    with SDPA inner attention (FlexAttention has no CPU backward)."""
    mc = model_registry("debugmodel", attn_backend="flex").model
    new = []
    for lc in mc.layers[:layers]:
        a = lc.attention
        att = make_gqa_config(
            dim=mc.dim,
            n_heads=a.n_heads,
            n_kv_heads=n_kv_heads,
            wqkv_param_init=_INIT,
            wo_param_init=_INIT,
            inner_attention=ScaledDotProductAttention.Config(),
            rope=a.rope,
            fuse_qkv=fuse_qkv,
        )
        new.append(dataclasses.replace(lc, attention=att))
    torch.manual_seed(seed)
    model = dataclasses.replace(mc, layers=new).build()
    model.init_weights()
    return model._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)  # RoPE's table stays complex


def _batch(step, b=4, t=16):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 2048, (b, t + 1), generator=g)


def _train(model, opt, steps, first=0, rows=None):
    for s in range(first, first + steps):
        x = _batch(s)
        if rows is not None:
            x = x[rows]
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()


def _container(model, name="CompositionalMuon"):
    cfg = CMOptimizersContainer.Config(
        name=name, lr=0.02, adamw_lr=1e-3, cm_options=dict(CM64) if name != "Muon" else {}
    )
    return cfg.build(model_parts=[model])


def test_layouts_routing_and_names():
    fused = debug_llama()
    specs = titan_attention(fused)
    assert len(specs) == 2 and all((s.num_heads, s.num_kv_heads, s.head_dim) == (16, 16, 16) for s in specs)
    assert [(s.q.offset, s.k.offset, s.v.offset, s.q.stride) for s in specs] == [(0, 16, 32, 48)] * 2
    c = _container(fused)
    opt = c.optimizers[0]
    assert isinstance(opt, CompositionalMuon) and [g["kind"] for g in opt.param_groups] == ["cm", "muon", "adamw"]
    adamw = {id(p) for p in opt.param_groups[2]["params"]}
    assert id(fused.tok_embeddings.weight) in adamw and id(fused.lm_head.weight) in adamw
    gqa = debug_llama(n_kv_heads=4, fuse_qkv=False)
    assert {(s.num_heads, s.num_kv_heads) for s in titan_attention(gqa)} == {(16, 4)}
    assert isinstance(_container(gqa, "Muon").optimizers[0], MuonWithAuxAdam)
    with pytest.raises(ValueError, match="fuse_qkv=False"):
        titan_attention(debug_llama(n_kv_heads=4, fuse_qkv=True))
    with pytest.raises(ValueError, match="unknown optimizer 'Sgd'"):
        CMOptimizersContainer.Config(name="Sgd").build(model_parts=[gqa])
    register_optimizer("AdamOnly", lambda m, cfg: torch.optim.AdamW(m.parameters(), lr=cfg.adamw_lr))
    try:
        assert isinstance(
            CMOptimizersContainer.Config(name="AdamOnly").build(model_parts=[gqa]).optimizers[0], torch.optim.AdamW
        )
    finally:
        del BUILDERS["AdamOnly"]


def test_fused_wqkv_step_equals_separate_projections(one_thread):
    sep = debug_llama(fuse_qkv=False)
    fused = debug_llama(fuse_qkv=True)
    fused.load_state_dict(sep.state_dict())  # torchtitan's hooks merge wq/wk/wv into wqkv
    for m in (sep, fused):
        _train(m, _container(m), 2)
    got, want = fused.state_dict(), sep.state_dict()  # fused splits back into wq/wk/wv on save
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-10, msg=k)


# ---- 2 ranks, gloo, FSDP2 ------------------------------------------------------------------


def _sharded(seed=0):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = debug_llama(seed=seed)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(model):
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _scenario(rank, world, ckpt):
    import torch.distributed.checkpoint as dcp

    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    out = {}
    ref = debug_llama()
    _train(ref, _container(ref), 3)
    model = _sharded()
    c = _container(model)
    _train(model, c, 3, rows=rows)
    got = _full(model)
    out["max_err"] = max(float((got[n] - p).abs().max()) for n, p in ref.named_parameters())
    dcp.save({"model": ModelWrapper(model), "optimizer": c}, checkpoint_id=ckpt)
    _train(model, c, 2, first=3, rows=rows)
    cont = _full(model)
    fresh = _sharded(seed=1)  # different initial weights: everything must come from the checkpoint
    c2 = _container(fresh)
    state = {"model": ModelWrapper(fresh), "optimizer": c2}
    dcp.load(state, checkpoint_id=ckpt)
    _train(fresh, c2, 2, first=3, rows=rows)
    out["resume_err"] = max(float((a - b).abs().max()) for a, b in zip(cont.values(), _full(fresh).values()))
    return out


def _worker(rank, world, store, ckpt, outdir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    try:
        res = dict(ok=True, result=_scenario(rank, world, ckpt))
    except Exception:
        res = dict(ok=False, error=traceback.format_exc())
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_ranks_equal_one_process_and_dcp_resume():
    outdir = tempfile.mkdtemp(prefix="cm-titan-")
    mp.start_processes(
        _worker,
        args=(2, os.path.join(outdir, "store"), os.path.join(outdir, "ckpt"), outdir),
        nprocs=2,
        start_method="spawn",
    )
    for r in range(2):
        with open(os.path.join(outdir, f"rank{r}.json")) as f:
            res = json.load(f)
        assert res["ok"], res.get("error")
        assert res["result"]["max_err"] < 1e-10, res  # float64 weights and msign (measured 3.7e-14)
        assert res["result"]["resume_err"] == 0.0, res
