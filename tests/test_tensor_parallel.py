"""Tensor parallel, HSDP and FSDP x TP meshes on CPU/gloo (PyTorch's DeviceMesh, DTensor,
``parallelize_module`` and ``fully_shard``): every optimizer's parameters after 3 steps equal the
single-process run; CM's head-local factors communicate nothing under TP; the bytes per step of
every optimizer and mesh are recorded (``docs/distributed.md`` quotes them).

One spawned job per world size (2 ranks: TP; 4 ranks: HSDP, FSDP x TP), as in test_distributed.py.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from compositional_muon import (
    AdaMuon,
    CompositionalMuon,
    Mano,
    Muon,
    MuonWithAuxAdam,
    NewtonMuon,
    NorMuon,
    PerHeadMuon,
)
from compositional_muon import distributed as D
from compositional_muon.attention import DEFAULT_ADAMW_PATTERNS
from dist_harness import result as _result
from dist_harness import run_world
from test_distributed import TinyLM, batches

F32 = torch.float32
STEPS = 3
TOL = 1e-5


GQA = dict(V=32, D_=16, H=4, Hkv=2, d=4, L=2)  # heads align with 2 TP ranks
MHA = dict(V=32, D_=16, H=4, Hkv=4, d=4, L=2)  # heads align with 2 and 4 shards
SPLIT = dict(V=32, D_=16, H=2, Hkv=2, d=8, L=2)  # a head per TP rank; FSDP x TP splits heads


def tp_plan() -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    col, row = ColwiseParallel(), RowwiseParallel()
    return {"attn.q_proj": col, "attn.k_proj": col, "attn.v_proj": col, "attn.o_proj": row, "fc": col, "down": row}


def build_model(cfg, setting, seed=0):
    """``setting``: ``"single"``, ``"tp"`` (1-D mesh of all ranks), ``"fsdp"`` (1-D), ``"hsdp"`` (2 x W/2
    replicate x shard), ``"fsdp_tp"`` (2 x W/2 dp x tp) or ``"hsdp_tp"`` / ``"hsdp_tp_122"`` (3-D
    replicate x shard x tp, 2 x 1 x W/2 / 1 x 2 x W/2). Returns ``(model, dp_rank, dp_world)``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    torch.manual_seed(seed)
    model = TinyLM(**cfg)
    if setting == "single":
        return model, 0, 1
    world, rank = dist.get_world_size(), dist.get_rank()
    if setting == "tp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        for b in model.blocks:
            parallelize_module(b, mesh, tp_plan())
        return model, 0, 1
    if setting == "fsdp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, rank, world
    if setting == "cli_3d":  # the CLI's --dist fsdp2 --tp 2 --hsdp 1 (training.dist.wrap_model): 2 x 1 x 2
        from compositional_muon.training import dist as TD

        model = TD.wrap_model(model, "fsdp2", tp=2, hsdp=1)
        spec = TD.MeshSpec(world, tp=2, hsdp=1)
        return model, spec.dp_rank(rank), spec.dp_world
    if setting.startswith("hsdp_tp"):  # 3-D (replicate, shard, tp): "hsdp_tp" 2 x 1 x 2, "hsdp_tp_122" 1 x 2 x 2
        shape = (1, 2, world // 2) if setting.endswith("122") else (2, 1, world // 2)
        mesh3 = init_device_mesh("cpu", shape, mesh_dim_names=("rep", "shard", "tp"))
        for b in model.blocks:
            parallelize_module(b, mesh3["tp"], tp_plan())
            fully_shard(b, mesh=mesh3["rep", "shard"])
        fully_shard(model, mesh=mesh3["rep", "shard"])
        return model, mesh3["rep", "shard"]._flatten().get_local_rank(), shape[0] * shape[1]
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    if setting == "hsdp":
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, rank, world
    assert setting == "fsdp_tp"
    for b in model.blocks:
        parallelize_module(b, mesh["tp"], tp_plan())
        fully_shard(b, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model, mesh.get_local_rank("dp"), 2


def matrix_groups(model):
    mats, rest = [], []
    for n, p in model.named_parameters():
        (mats if p.ndim == 2 and "embed" not in n and "lm_head" not in n else rest).append(p)
    return [dict(params=mats, use_muon=True), dict(params=rest, use_muon=False, lr=1e-2)]


def build_opt(name, model, distributed="auto"):
    kw = dict(distributed=distributed)
    cm = dict(lr=0.02, adamw_lr=1e-2, msign_dtype=F32, **kw)
    if name == "muon":
        return Muon(matrix_groups(model), lr=0.02, msign_dtype=F32, weight_decay=0.01, **kw)
    if name == "muon_aux":
        gs = matrix_groups(model)
        gs[0].update(lr=0.02, msign_dtype=F32)
        return MuonWithAuxAdam(gs, **kw)
    if name == "cm":
        return CompositionalMuon.from_model(model, muon_lr=0.02, weight_decay=0.01, **cm)
    if name == "cm_iso":
        return CompositionalMuon.from_model(model, isotropic=True, hybrid=False, nesterov=True, **cm)
    if name == "cm_nohybrid":
        return CompositionalMuon.from_model(model, hybrid=False, **cm)
    if name == "cm_renorm":
        return CompositionalMuon.from_model(model, per_mat_renorm=True, msign_backend="newton_schulz", **cm)
    if name == "normuon":
        return NorMuon(matrix_groups(model), lr=0.01, msign_dtype=F32, **kw)
    if name == "adamuon":
        return AdaMuon(matrix_groups(model), lr=0.01, msign_dtype=F32, **kw)
    if name == "mano":
        return Mano(matrix_groups(model), lr=0.01, **kw)
    if name == "per_head":
        return PerHeadMuon.from_model(model, lr=0.02, adamw_lr=1e-2, weight_decay=0.01, msign_dtype=F32, **kw)
    if name == "per_head_attn":  # attention only (the MLP in AdamW): every byte is the per-head part's
        pats = DEFAULT_ADAMW_PATTERNS + ("*.fc.*", "*.down.*")
        return PerHeadMuon.from_model(model, lr=0.02, adamw_lr=1e-2, adamw_patterns=pats, msign_dtype=F32, **kw)
    if name == "newton":
        # refresh on the 3rd update: the counted (last) step gathers and averages the input Grams
        opt = NewtonMuon(matrix_groups(model), lr=0.02, msign_dtype=F32, refresh_interval=3, **kw)
        opt.register(model, warn=False)
        return opt
    raise KeyError(name)


OPTS = ("muon", "muon_aux", "cm", "cm_iso", "cm_nohybrid", "normuon", "adamuon", "mano", "per_head", "per_head_attn")


def train(model, opt, data, dp_rank=0, dp_world=1):
    per = data[0][0].size(0) // dp_world
    for x, y in data:
        xs, ys = x[dp_rank * per : (dp_rank + 1) * per], y[dp_rank * per : (dp_rank + 1) * per]
        opt.zero_grad(set_to_none=True)
        logits = model(xs)
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), ys.reshape(-1)).backward()
        opt.step()


def full_params(model) -> dict:
    return {n: (p.full_tensor() if D.is_dtensor(p) else p).detach().clone() for n, p in model.named_parameters()}


def rel_error(got: dict, ref: dict) -> float:
    return max((got[n] - r).norm().item() / max(r.norm().item(), 1e-30) for n, r in ref.items())


def placements(model) -> dict:
    return {n: [str(pl) for pl in p.placements] for n, p in model.named_parameters() if D.is_dtensor(p)}


def sc_equivalence(rank, world, setting, opts, cfg):
    data = batches(cfg["V"], STEPS)
    out = {}
    for name in opts:
        ref = None
        if rank == 0:
            m0, _, _ = build_model(cfg, "single")
            train(m0, build_opt(name, m0, distributed=False), data)
            ref = full_params(m0)
        model, dpr, dpw = build_model(cfg, setting)
        opt = build_opt(name, model)
        counter = D.CommCounter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(model, opt, data[: STEPS - 1], dpr, dpw)
            with counter:
                train(model, opt, data[STEPS - 1 :], dpr, dpw)
        got = full_params(model)
        if rank == 0:
            out[name] = dict(
                rel=rel_error(got, ref),
                bytes=counter.by_tag(),
                calls=counter.count(),
                warnings=sorted({str(w.message) for w in caught if "fallback" in str(w.message)}),
                placements=placements(model),
            )
    return out


def optimizer_state(model, opt) -> dict:
    """Every state tensor of ``opt`` as a full tensor, keyed by parameter name (call on every rank)."""
    out = {}
    for n, p in model.named_parameters():
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                out[f"{n}.{k}"] = (v.full_tensor() if D.is_dtensor(v) else v).detach().clone()
    return out


def sc_ckpt_save(rank, world, path, names):
    """2 steps at ``world`` ranks under FSDP, a DCP checkpoint, 2 more steps; rank 0 keeps the
    optimizer state at the checkpoint and the final weights (``path/<name>.pt``)."""
    from compositional_muon.training import dist as TD

    data = batches(32, 4)
    for name in names:
        model, dpr, dpw = build_model(MHA, "fsdp")
        opt = build_opt(name, model)
        train(model, opt, data[:2], dpr, dpw)
        TD.save_checkpoint(os.path.join(path, name), model, opt, extra=dict(step=2))
        state = optimizer_state(model, opt)
        train(model, opt, data[2:], dpr, dpw)
        final = full_params(model)
        if rank == 0:
            torch.save(dict(state=state, final=final), os.path.join(path, f"{name}.pt"))
    return {}


def sc_ckpt_load(rank, world, path, names, setting):
    """Resume :func:`sc_ckpt_save`'s checkpoints in ``setting`` at ``world`` ranks: the optimizer
    state equals the saved one and 2 more steps equal the uninterrupted run."""
    from compositional_muon.training import dist as TD

    data = batches(32, 4)
    out = {}
    for name in names:
        model, dpr, dpw = build_model(MHA, setting, seed=123)  # another init: all must come from the checkpoint
        opt = build_opt(name, model)
        extra = TD.load_checkpoint(os.path.join(path, name), model, opt)
        state = optimizer_state(model, opt)
        train(model, opt, data[2:], dpr, dpw)
        got = full_params(model)
        if rank == 0:
            want = torch.load(os.path.join(path, f"{name}.pt"))
            out[name] = dict(
                extra=extra,
                state_keys=sorted(state) == sorted(want["state"]),
                state_max_abs=max((state[k] - v).abs().max().item() for k, v in want["state"].items()),
                rel=rel_error(got, want["final"]),
            )
    return out


def sc_unsupported(rank, world):
    """Layouts the optimizers refuse, with the message, before any optimizer step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    out = {}
    mesh = init_device_mesh("cpu", (world,))
    mesh3 = init_device_mesh("cpu", (world, 1, 1))
    for key, w in (
        ("partial", distribute_tensor(torch.randn(8, 8), mesh, [Partial()])),
        ("mesh3", distribute_tensor(torch.randn(8, 8), mesh3, [Shard(0), Shard(1), Replicate()])),
    ):
        try:
            Muon([nn.Parameter(w)], lr=0.02)  # refused at construction, before any step
            out[key] = None
        except Exception as e:  # noqa: BLE001
            out[key] = f"{type(e).__name__}: {e}"
    return out


class SoftMoE(nn.Module):
    """Dense-routed experts ``up`` ``(E, F, D)``, ``down`` ``(E, D, F)`` (nn.Linear layout per
    expert); under expert parallelism each rank holds ``E / W`` whole experts (``Shard(0)``)."""

    def __init__(self, D_=16, E=4, F_=24):
        super().__init__()
        self.router = nn.Linear(D_, E, bias=False)
        self.up = nn.Parameter(torch.randn(E, F_, D_) / D_**0.5)
        self.down = nn.Parameter(torch.randn(E, D_, F_) / F_**0.5)
        self.tensor_layouts = {"up": "experts", "down": "experts"}

    def forward(self, x):
        full = lambda t: t.full_tensor() if D.is_dtensor(t) else t  # noqa: E731
        h = F.relu(torch.einsum("btd,efd->btef", x, full(self.up))).square()
        y = torch.einsum("btef,edf->bted", h, full(self.down))
        return (self.router(x).softmax(-1).unsqueeze(-1) * y).sum(-2)


class MoELM(nn.Module):
    def __init__(self, V=32, D_=16, E=4):
        super().__init__()
        self.embed = nn.Embedding(V, D_)
        self.moe = SoftMoE(D_, E)
        self.lm_head = nn.Linear(D_, V, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        return self.lm_head(F.rms_norm(x + self.moe(F.rms_norm(x, (x.size(-1),))), (x.size(-1),)))


def has_expert_layouts() -> bool:
    import inspect

    return "tensor_layout" in inspect.signature(Muon).parameters


def sc_expert_parallel(rank, world, names):
    """Experts split across ranks (``Shard(0)`` of ``(E, out, in)``): Muon and CM's Muon group
    orthogonalize each expert where it lives."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    data = batches(32, STEPS)
    out = {}

    def opt_for(model, name, distributed="auto"):
        experts = [model.moe.up, model.moe.down]
        rest = [p for n, p in model.named_parameters() if not n.startswith(("moe.up", "moe.down"))]
        groups = [dict(params=experts, use_muon=True, tensor_layout="experts"), dict(params=rest, use_muon=False)]
        return Muon(groups, lr=0.02, msign_dtype=F32, distributed=distributed)

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    for name in names:
        ref = None
        if rank == 0:
            torch.manual_seed(0)
            m0 = MoELM()
            train(m0, opt_for(m0, name, distributed=False), data)
            ref = full_params(m0)
        torch.manual_seed(0)
        model = MoELM()
        for k in ("up", "down"):
            w = getattr(model.moe, k)
            setattr(model.moe, k, nn.Parameter(distribute_tensor(w.detach(), mesh, [Shard(0)])))
        opt = opt_for(model, name)
        counter = D.CommCounter()
        train(model, opt, data[: STEPS - 1])
        with counter:
            train(model, opt, data[STEPS - 1 :])
        got = full_params(model)
        if rank == 0:
            out[name] = dict(rel=rel_error(got, ref), bytes=counter.by_tag(), placements=placements(model))
    return out


def _tp_gqa_with_grads(opt_name):
    """The TP GQA model's optimizer ``opt_name`` after one backward, and fresh collective counters
    (this library's wrapper and DTensor's CommDebugMode)."""
    from torch.distributed.tensor.debug import CommDebugMode

    model, _, _ = build_model(GQA, "tp")
    opt = build_opt(opt_name, model)
    x, y = batches(32, 1)[0]
    F.cross_entropy(model(x).reshape(-1, 32), y.reshape(-1)).backward()
    return opt, D.CommCounter(), CommDebugMode()


def sc_tp_cm_comm(rank, world):
    """Every collective (c10d and DTensor dispatch, seen by CommDebugMode) of CM's plans under TP
    with ``hybrid=False``: only the 4-byte NaN/inf agreement."""
    opt, counter, mode = _tp_gqa_with_grads("cm_nohybrid")
    with counter, mode:
        plans = [opt._cm_plan(g) for g in opt.param_groups if g["kind"] == "cm"]
    return dict(
        paths=sorted({b.path for plan in plans for b in plan}),
        tags=counter.by_tag(),
        all_collectives=mode.get_total_counts(),
    )


def sc_tp_per_head_comm(rank, world):
    """Every collective (c10d and DTensor dispatch, seen by CommDebugMode) of a PerHeadMuon step on
    attention only under TP (heads aligned): only the 4-byte NaN/inf agreement."""
    opt, counter, mode = _tp_gqa_with_grads("per_head_attn")
    with counter, mode:
        opt.step()
    return dict(tags=counter.by_tag(), all_collectives=mode.get_total_counts())


def _run_world(world, jobs):
    return run_world(world, jobs, __name__, prefix="cm-tp")


@pytest.fixture(scope="module")
def ckpt_dir():
    return tempfile.mkdtemp(prefix="cm-reshard-")


CKPT_OPTS = ("cm", "muon", "normuon")
MESH3_OPTS = ("muon", "cm", "per_head", "newton")


@pytest.fixture(scope="module")
def world2(ckpt_dir):
    return _run_world(
        2,
        [
            ("tp_gqa", "sc_equivalence", ("tp", OPTS + ("cm_renorm", "newton"), GQA)),
            ("ckpt_save", "sc_ckpt_save", (ckpt_dir, CKPT_OPTS)),
            ("unsupported", "sc_unsupported", ()),
            ("ep", "sc_expert_parallel", (("muon",),)),
            ("tp_cm_comm", "sc_tp_cm_comm", ()),
            ("tp_per_head_comm", "sc_tp_per_head_comm", ()),
        ],
    )


@pytest.fixture(scope="module")
def world4(world2, ckpt_dir):
    _result(world2, "ckpt_save")
    return _run_world(
        4,
        [
            ("hsdp", "sc_equivalence", ("hsdp", OPTS + ("newton",), MHA)),
            ("fsdp_tp", "sc_equivalence", ("fsdp_tp", OPTS + ("cm_renorm", "newton"), MHA)),
            ("hsdp_tp_122", "sc_equivalence", ("hsdp_tp_122", OPTS + ("newton",), MHA)),
            ("hsdp_tp", "sc_equivalence", ("hsdp_tp", MESH3_OPTS, MHA)),
            ("cli_3d", "sc_equivalence", ("cli_3d", ("cm", "per_head"), MHA)),
            ("fsdp_tp_split", "sc_equivalence", ("fsdp_tp", ("cm", "per_head"), SPLIT)),
            ("load_fsdp", "sc_ckpt_load", (ckpt_dir, CKPT_OPTS, "fsdp")),
            ("load_fsdp_tp", "sc_ckpt_load", (ckpt_dir, CKPT_OPTS, "fsdp_tp")),
        ],
    )


def _check(res: dict, tol=TOL) -> None:
    for name, r in res.items():
        assert r["rel"] < tol, (name, r)


@pytest.mark.parametrize("name", OPTS + ("cm_renorm", "newton"))
def test_tp2_matches_single_process(world2, name):
    r = _result(world2, "tp_gqa")[name]
    assert r["rel"] < TOL, r
    assert not r["warnings"], r["warnings"]


# Bytes this rank (rank 0) sends per optimizer step, by CommCounter tag: the table in
# docs/distributed.md ("Measured on the tests' model"). ``finite`` (the NaN/inf agreement) omitted.
EXPECTED_BYTES = {
    ("tp_gqa", "muon"): {"muon.msign": 7168},
    ("tp_gqa", "muon_aux"): {"muon.msign": 7168},
    ("tp_gqa", "normuon"): {"muon.msign": 7168},
    ("tp_gqa", "adamuon"): {"muon.msign": 7168},
    ("tp_gqa", "mano"): {},
    ("tp_gqa", "cm"): {"cm.ov.hybrid": 1024, "muon.msign": 4096},
    ("tp_gqa", "cm_nohybrid"): {"muon.msign": 4096},
    ("tp_gqa", "cm_iso"): {"muon.msign": 4096},
    ("tp_gqa", "cm_renorm"): {"cm.qk.renorm": 32, "cm.ov.renorm": 32, "cm.ov.hybrid": 1024, "muon.msign": 4096},
    ("tp_gqa", "per_head"): {"muon.msign": 4096},  # the MLP's Muon; attention: 0
    ("tp_gqa", "per_head_attn"): {},
    # NewtonMuon on a refresh step: row-parallel inputs gathered, Grams averaged, G K^-1 of the
    # column-sharded gradients on the gathered gradient (map_local), then Muon's msign
    ("tp_gqa", "newton"): {"newton.input": 4608, "newton.gram": 18480, "map_local": 3072, "muon.msign": 7168},
    ("hsdp", "muon"): {"muon.msign": 8192},
    ("hsdp", "mano"): {},
    ("hsdp", "newton"): {"newton.gram": 18480, "muon.msign": 8192},
    ("hsdp", "cm"): {"cm.ov.gram": 1024, "cm.ov.hybrid": 1024, "muon.msign": 4096},
    ("hsdp", "cm_nohybrid"): {"cm.ov.gram": 1024, "cm.ov.msign": 512, "muon.msign": 4096},
    ("hsdp", "cm_iso"): {"cm.ov.gram": 64, "cm.ov.msign": 512, "muon.msign": 4096},
    ("hsdp", "per_head"): {"per_head.gram": 512, "muon.msign": 4096},
    ("hsdp", "per_head_attn"): {"per_head.gram": 512},
    ("fsdp_tp", "muon"): {"muon.msign": 6144},
    ("fsdp_tp", "mano"): {},
    ("fsdp_tp", "cm"): {"cm.ov.gram": 1024, "cm.ov.hybrid": 1024, "muon.msign": 3072},
    ("fsdp_tp", "cm_nohybrid"): {"cm.ov.gram": 1024, "cm.ov.msign": 256, "muon.msign": 3072},
    ("fsdp_tp", "cm_iso"): {"cm.ov.gram": 64, "cm.ov.msign": 256, "muon.msign": 3072},
    ("fsdp_tp", "per_head"): {"per_head.gram": 256, "muon.msign": 3072},
    ("fsdp_tp", "per_head_attn"): {"per_head.gram": 256},
    ("fsdp_tp", "newton"): {"newton.input": 2304, "newton.gram": 18480, "map_local": 1536, "muon.msign": 6144},
    # 3-D replicate x shard x tp, 1 x 2 x 2: as FSDP x TP
    ("hsdp_tp_122", "muon"): {"muon.msign": 6144},
    ("hsdp_tp_122", "cm"): {"cm.ov.gram": 1024, "cm.ov.hybrid": 1024, "muon.msign": 3072},
    ("hsdp_tp_122", "per_head"): {"per_head.gram": 256, "muon.msign": 3072},
    ("hsdp_tp_122", "newton"): {"newton.input": 2304, "newton.gram": 18480, "map_local": 1536, "muon.msign": 6144},
    ("hsdp_tp_122", "mano"): {},
    # 2 x 1 x 2: as TP (2) inside each replica group
    ("hsdp_tp", "muon"): {"muon.msign": 8192},
    ("hsdp_tp", "cm"): {"cm.ov.hybrid": 1024, "muon.msign": 4096},
    ("hsdp_tp", "per_head"): {"muon.msign": 4096},
    ("hsdp_tp", "newton"): {"newton.input": 2304, "newton.gram": 18480, "map_local": 3072, "muon.msign": 8192},
}


def test_tp2_cm_heads_are_local(world2):
    """Heads split across TP ranks: CM's QK and non-hybrid OV updates issue no collective; the
    hybrid W_o msign is the only CM traffic (no fallback anywhere)."""
    res = _result(world2, "tp_gqa")
    for name in ("cm_iso", "cm_nohybrid"):
        assert not any(t.startswith("cm.") for t in res[name]["bytes"]), res[name]["bytes"]
    assert [t for t in res["cm"]["bytes"] if t.startswith("cm.")] == ["cm.ov.hybrid"], res["cm"]["bytes"]
    pl = res["cm"]["placements"]
    assert pl["blocks.0.attn.q_proj.weight"] == ["S(0)"] and pl["blocks.0.attn.o_proj.weight"] == ["S(1)"], pl


@pytest.mark.slow
@pytest.mark.parametrize("key,name", sorted(EXPECTED_BYTES))
def test_bytes_match_documented_table(world2, world4, key, name):
    res = _result(world2 if key == "tp_gqa" else world4, key)[name]
    got = {t: b for t, b in res["bytes"].items() if t != "finite"}
    assert got == EXPECTED_BYTES[(key, name)], (key, name, got)


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTS + ("newton",))
def test_hsdp_matches_single_process(world4, name):
    r = _result(world4, "hsdp")[name]
    assert r["rel"] < TOL and not r["warnings"], r
    assert r["placements"]["blocks.0.attn.o_proj.weight"] == ["R", "S(0)"], r["placements"]


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTS + ("cm_renorm", "newton"))
def test_fsdp_x_tp_matches_single_process(world4, name):
    r = _result(world4, "fsdp_tp")[name]
    assert r["rel"] < TOL, r
    # QK stays head-local (q/k rows: TP then FSDP chunks, whole heads); W_o is a row x column box
    # (width rows over dp, head columns over tp): OV all-reduces its Grams over dp, no fallback
    assert not r["warnings"], r["warnings"]
    pl = r["placements"]
    assert pl["blocks.0.attn.q_proj.weight"] == ["_S(0, 2)", "S(0)"], pl
    assert pl["blocks.0.attn.o_proj.weight"] == ["S(0)", "S(1)"], pl


@pytest.mark.slow
def test_fsdp_x_tp_heads_straddling_shards_fall_back_exactly(world4):
    r = _result(world4, "fsdp_tp_split")["cm"]
    assert r["rel"] < TOL, r
    assert any(".qk'" in w and "straddles" in w for w in r["warnings"]), r["warnings"]
    assert r["bytes"]["cm.fallback"] > 0, r


@pytest.mark.slow
@pytest.mark.parametrize(
    "key,name", [("hsdp_tp_122", n) for n in OPTS + ("newton",)] + [("hsdp_tp", n) for n in MESH3_OPTS]
)
def test_hsdp_x_tp_3d_mesh_matches_single_process(world4, key, name):
    """3-D replicate x shard x tp meshes (4 ranks: 1 x 2 x 2 and 2 x 1 x 2): the shard x tp dims
    are flattened into one process group; every optimizer equals the single process."""
    r = _result(world4, key)[name]
    assert r["rel"] < TOL and not r["warnings"], r
    assert r["placements"]["blocks.0.attn.o_proj.weight"] == ["R", "S(0)", "S(1)"], r["placements"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cm", "per_head"])
def test_cli_wrap_model_builds_the_3d_mesh(world4, name):
    """``wrap_model(model, "fsdp2", tp=2, hsdp=1)`` (the CLI's ``--tp 2 --hsdp 1`` on 4 ranks) gives
    the replicate x shard x tp placements, and the optimizers equal the single process on it."""
    r = _result(world4, "cli_3d")[name]
    assert r["rel"] < TOL and not r["warnings"], r
    assert r["placements"]["blocks.0.attn.q_proj.weight"] == ["R", "_S(0, 2)", "S(0)"], r["placements"]


@pytest.mark.slow
def test_per_head_heads_straddling_shards_gather_exactly(world4):
    """FSDP x TP with a head across two row chunks: q/k/v take the gather fallback (exact), W_o's
    whole-head columns still take the d x d Gram route."""
    r = _result(world4, "fsdp_tp_split")["per_head"]
    assert r["rel"] < TOL, r
    assert r["bytes"]["per_head.gather"] > 0 and r["bytes"]["per_head.gram"] > 0, r


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["fsdp", "fsdp_tp"])
def test_checkpoint_reshards_from_2_to_4_ranks(world4, setting):
    """Written by 2-rank FSDP, resumed by 4-rank FSDP and 2 x 2 FSDP x TP: the same optimizer
    state, and 2 more steps equal the uninterrupted 2-rank run."""
    res = _result(world4, f"load_{setting}")
    assert sorted(res) == sorted(CKPT_OPTS)
    for name, r in res.items():
        assert r["extra"] == {"step": 2} and r["state_keys"], (name, r)
        assert r["state_max_abs"] == 0.0, (name, r)
        assert r["rel"] < TOL, (name, r)


def test_unsupported_layouts_raise_before_any_step(world2):
    r = _result(world2, "unsupported")
    assert r["partial"] and "UnsupportedLayout" in r["partial"] and "Partial placement" in r["partial"], r
    assert r["mesh3"] and "UnsupportedLayout" in r["mesh3"] and "2 of the 3 dims" in r["mesh3"], r
    assert "without dim names" in r["mesh3"] and "replicate x shard x tp" in r["mesh3"], r


def test_timing_budget(world2, world4):
    assert world2["_seconds"] + world4["_seconds"] < 240, (world2["_seconds"], world4["_seconds"])


@pytest.mark.skipif(not has_expert_layouts(), reason="Muon has no tensor_layout='experts' (MoE support) here")
def test_expert_parallel_updates_each_expert_locally(world2):
    r = _result(world2, "ep")["muon"]
    assert r["rel"] < TOL, r
    assert r["placements"]["moe.up"] == ["S(0)"], r["placements"]
    assert "muon.msign" not in r["bytes"], r["bytes"]  # whole experts on every rank: nothing to move


def test_tp2_per_head_attention_is_local(world2):
    """PerHeadMuon under TP with heads aligned (q/k/v whole rows, o whole columns per rank): the
    attention step issues no collective but the NaN/inf agreement, and the whole model's only
    optimizer traffic is the MLP's Muon."""
    r = _result(world2, "tp_per_head_comm")
    assert r["tags"] == {"finite": 4} and r["all_collectives"] == 1, r
    res = _result(world2, "tp_gqa")
    assert {t: b for t, b in res["per_head_attn"]["bytes"].items() if t != "finite"} == {}, res["per_head_attn"]
    assert not any(t.startswith("per_head") for t in res["per_head"]["bytes"]), res["per_head"]


def test_tp2_cm_plan_issues_no_collective_but_the_finite_agreement(world2):
    r = _result(world2, "tp_cm_comm")
    assert r["paths"] == ["local"], r
    assert r["tags"] == {"finite": 4} and r["all_collectives"] == 1, r
