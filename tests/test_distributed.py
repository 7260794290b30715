"""Distributed optimizers on CPU/gloo: DDP and FSDP2 (DTensor) runs equal single-process runs,
CM's aligned QK step communicates nothing, the unaligned fallback, DCP checkpoints.

The multi-process scenarios run in one spawned job per world size (2 and 4 processes, one
process group each, to pay the start-up once); each test asserts on its scenario's recorded result.
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

from compositional_muon import AdaMuon, CompositionalMuon, Mano, Muon, MuonWithAuxAdam, NewtonMuon, NorMuon
from compositional_muon import distributed as D
from compositional_muon.msign import msign
from compositional_muon.training import dist as TD
from dist_harness import result as _result
from dist_harness import run_world

F32 = torch.float32
STEPS = 3
TOL = 1e-5


# ------------------------------------------------------------------------------------------------
# A tiny transformer (separate q/k/v/o projections, GQA, an MLP, embedding, gain, head)
# ------------------------------------------------------------------------------------------------


class Attn(nn.Module):
    """q/k/v/o projections whose forward works on the heads the weights hold (all of them here; a
    rank's ``H / tp`` under tensor parallelism, test_tensor_parallel)."""

    def __init__(self, D_, H, Hkv, d):
        super().__init__()
        self.head_dim, self.num_heads, self.num_key_value_heads = d, H, Hkv
        self.q_proj = nn.Linear(D_, H * d, bias=False)
        self.k_proj = nn.Linear(D_, Hkv * d, bias=False)
        self.v_proj = nn.Linear(D_, Hkv * d, bias=False)
        self.o_proj = nn.Linear(H * d, D_, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        d, G = self.head_dim, self.num_heads // self.num_key_value_heads
        q = self.q_proj(x).view(B, T, -1, d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, d).transpose(1, 2).repeat_interleave(G, 1)
        v = self.v_proj(x).view(B, T, -1, d).transpose(1, 2).repeat_interleave(G, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Conv1D(nn.Module):
    """transformers' GPT-2 ``Conv1D``: the weight is stored transposed, ``(in, out)``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)

    def forward(self, x):
        return x @ self.weight


class FusedAttn(nn.Module):
    """GPT-2 (``conv=True``: Conv1D ``c_attn``/``c_proj``) or nanoGPT (fused ``nn.Linear``) attention."""

    def __init__(self, D_, H, conv):
        super().__init__()
        self.n_head = H
        self.c_attn = Conv1D(3 * D_, D_) if conv else nn.Linear(D_, 3 * D_, bias=False)
        self.c_proj = Conv1D(D_, D_) if conv else nn.Linear(D_, D_, bias=False)

    def forward(self, x):
        B, T, D_ = x.shape
        q, k, v = self.c_attn(x).split(D_, dim=2)
        sh = lambda t: t.view(B, T, self.n_head, -1).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(sh(q), sh(k), sh(v), is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D_))


class Block(nn.Module):
    def __init__(self, D_, H, Hkv, d, attn="separate"):
        super().__init__()
        self.attn = Attn(D_, H, Hkv, d) if attn == "separate" else FusedAttn(D_, H, attn == "conv1d")
        self.fc = nn.Linear(D_, 2 * D_, bias=False)
        self.down = nn.Linear(2 * D_, D_, bias=False)

    def forward(self, x):
        x = x + self.attn(F.rms_norm(x, (x.size(-1),)))
        return x + self.down(F.relu(self.fc(F.rms_norm(x, (x.size(-1),)))).square())


class TinyLM(nn.Module):
    def __init__(self, V=32, D_=16, H=4, Hkv=2, d=4, L=2, attn="separate"):
        super().__init__()
        self.embed = nn.Embedding(V, D_)
        self.blocks = nn.ModuleList(Block(D_, H, Hkv, d, attn) for _ in range(L))
        self.gain = nn.Parameter(torch.ones(D_))
        self.lm_head = nn.Linear(D_, V, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(F.rms_norm(x, (x.size(-1),)) * self.gain)


def make_model(cfg, seed=0):
    torch.manual_seed(seed)
    return TinyLM(**cfg)


def batches(V, n, B=4, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)) for _ in range(n)]


def matrix_groups(model, **adamw):
    """Muon-family groups: hidden matrices use_muon=True; embedding, head and gains AdamW."""
    mats, rest = [], []
    for n, p in model.named_parameters():
        (mats if p.ndim == 2 and "embed" not in n and "lm_head" not in n else rest).append(p)
    return [dict(params=mats, use_muon=True), dict(params=rest, use_muon=False, lr=1e-2, **adamw)]


def build_opt(name, model, distributed="auto"):
    """Optimizer ``name`` on ``model`` (the inner module under DDP), float32 msigns."""
    kw = dict(distributed=distributed)
    if name == "muon":
        return Muon(matrix_groups(model), lr=0.02, msign_dtype=F32, weight_decay=0.01, **kw)
    if name == "muon_aux":
        gs = matrix_groups(model)
        gs[0].update(lr=0.02, msign_dtype=F32, weight_decay=0.01)
        return MuonWithAuxAdam(gs, **kw)
    if name == "cm":
        return CompositionalMuon.from_model(
            model, lr=0.02, muon_lr=0.02, adamw_lr=1e-2, msign_dtype=F32, weight_decay=0.01, **kw
        )
    if name == "cm_buckets":  # every CM pair its own streamed bucket (DDP: one all_gather per bucket)
        return CompositionalMuon.from_model(
            model, lr=0.02, adamw_lr=1e-2, msign_dtype=F32, weight_decay=0.01, bucket_bytes=1, **kw
        )
    if name == "cm_iso":
        return CompositionalMuon.from_model(
            model, lr=0.02, adamw_lr=1e-2, msign_dtype=F32, isotropic=True, hybrid=False, nesterov=True, **kw
        )
    if name == "cm_renorm":
        return CompositionalMuon.from_model(
            model, lr=0.02, adamw_lr=1e-2, msign_dtype=F32, per_mat_renorm=True, msign_backend="newton_schulz", **kw
        )
    if name == "cm_joint":  # not head-local across a width-sharded factor: gather fallback for OV
        return CompositionalMuon.from_model(
            model, lr=0.02, adamw_lr=1e-2, msign_dtype=F32, method="joint", hybrid=False, **kw
        )
    if name == "normuon":
        return NorMuon(matrix_groups(model), lr=0.01, msign_dtype=F32, **kw)
    if name == "adamuon":
        return AdaMuon(matrix_groups(model), lr=0.01, msign_dtype=F32, **kw)
    if name == "mano":
        return Mano(matrix_groups(model), lr=0.01, **kw)
    if name == "newton":
        opt = NewtonMuon(matrix_groups(model), lr=0.02, msign_dtype=F32, refresh_interval=2, **kw)
        opt.register(model, warn=False)
        return opt
    raise KeyError(name)


ALL_OPTS = ("muon", "muon_aux", "cm", "cm_iso", "normuon", "adamuon", "mano", "newton")


def train(model, opt, data, rank=0, world=1, steps=STEPS):
    B = data[0][0].size(0)
    per = B // world
    for x, y in data[:steps]:
        xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        opt.zero_grad(set_to_none=True)
        logits = model(xs)
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), ys.reshape(-1)).backward()
        opt.step()


def full_params(model) -> dict:
    inner = TD.unwrap_model(model)
    return {n: (p.full_tensor() if D.is_dtensor(p) else p).detach().clone() for n, p in inner.named_parameters()}


def rel_errors(got: dict, ref: dict, init: dict) -> tuple[float, float]:
    """(max over params of ||p - p_ref|| / ||p_ref||, the same relative to the total displacement)."""
    e_p, e_d = 0.0, 0.0
    for n, r in ref.items():
        diff = (got[n] - r).norm().item()
        e_p = max(e_p, diff / max(r.norm().item(), 1e-30))
        e_d = max(e_d, diff / max((r - init[n]).norm().item(), 1e-30))
    return e_p, e_d


def reference(cfg, name, data):
    model = make_model(cfg)
    init = full_params(model)
    opt = build_opt(name, model, distributed=False)
    train(model, opt, data)
    return full_params(model), init


def distributed_run(cfg, name, mode, data, rank, world, distributed="auto", counter=None):
    model = TD.wrap_model(make_model(cfg), mode)
    opt = build_opt(name, TD.unwrap_model(model), distributed=distributed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if counter is None:
            train(model, opt, data, rank, world)
        else:
            train(model, opt, data, rank, world, steps=STEPS - 1)
            with counter:
                train(model, opt, data[STEPS - 1 :], rank, world, steps=1)
    return full_params(model), [str(w.message) for w in caught if "fallback" in str(w.message)]


# ------------------------------------------------------------------------------------------------
# Scenarios (run inside every rank; rank 0 records the verdicts)
# ------------------------------------------------------------------------------------------------

GQA = dict(V=32, D_=16, H=4, Hkv=2, d=4, L=2)  # aligned at 2 ranks, k/v heads split at 4
MHA = dict(V=32, D_=16, H=4, Hkv=4, d=4, L=2)  # aligned at 2 and 4 ranks
SPLIT = dict(V=32, D_=16, H=2, Hkv=2, d=8, L=2)  # at 4 ranks every head straddles two shards


def sc_equivalence(rank, world, opts, modes, cfg):
    data = batches(cfg["V"], STEPS, B=4 if 4 % world == 0 else 2 * world)
    out = {}
    for name in opts:
        ref, init = reference(cfg, name, data) if rank == 0 else (None, None)
        for mode in modes:
            counter = D.CommCounter()
            got, warns = distributed_run(cfg, name, mode, data, rank, world, counter=counter)
            if rank == 0:
                e_p, e_d = rel_errors(got, ref, init)
                out[f"{mode}/{name}"] = dict(
                    rel=e_p, rel_displacement=e_d, bytes=counter.by_tag(), calls=counter.count(), warnings=warns
                )
    return out


def sc_optout(rank, world, cfg):
    data = batches(cfg["V"], STEPS)
    ref, init = reference(cfg, "cm", data) if rank == 0 else (None, None)
    counter = D.CommCounter()
    got, _ = distributed_run(cfg, "cm", "ddp", data, rank, world, distributed=False, counter=counter)
    return dict(calls=counter.count(), rel=rel_errors(got, ref, init)[0] if rank == 0 else None)


def sc_qk_comm(rank, world, cfg):
    """CM on the QK pairs only, FSDP2, aligned: the QK update issues no collective."""
    from torch.distributed.tensor.debug import CommDebugMode

    from compositional_muon.attention import AttentionSpec, HeadSlice

    model = TD.wrap_model(make_model(cfg), "fsdp2")
    specs = [
        AttentionSpec(
            f"blocks.{i}.attn",
            cfg["d"],
            cfg["H"],
            cfg["Hkv"],
            HeadSlice(b.attn.q_proj.weight),
            HeadSlice(b.attn.k_proj.weight),
        )
        for i, b in enumerate(model.blocks)
    ]
    opt = CompositionalMuon([dict(kind="cm", attention=specs, lr=0.02, msign_dtype=F32)])
    x, y = batches(cfg["V"], 1)[0]
    per = x.size(0) // world
    logits = model(x[rank * per : (rank + 1) * per])
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[rank * per : (rank + 1) * per].reshape(-1)).backward()
    calls = []
    originals = {}
    for fn in (
        "all_reduce",
        "all_gather_into_tensor",
        "all_gather_single",
        "all_to_all_single",
        "all_gather",
        "broadcast",
        "reduce_scatter_tensor",
        "gather",
        "scatter",
    ):
        if not hasattr(dist, fn):
            continue
        originals[fn] = getattr(dist, fn)

        def spy(*a, _fn=fn, **k):
            calls.append(_fn)
            return originals[_fn](*a, **k)

        setattr(dist, fn, spy)
    counter, mode = D.CommCounter(), CommDebugMode()
    try:
        with counter, mode:
            plan = opt._cm_plan(opt.param_groups[0])
    finally:
        for fn, f in originals.items():
            setattr(dist, fn, f)
    return dict(
        paths=sorted({it.path for it in plan}),
        qk_bytes=counter.total("cm."),
        tags=counter.by_tag(),
        calls=calls,
        all_collectives=mode.get_total_counts(),
        by_op={str(k): v for k, v in mode.get_comm_counts().items()},
    )


def sc_checkpoint(rank, world, cfg, path, mode):
    from compositional_muon.training.checkpoint import CheckpointError

    data = batches(cfg["V"], 4)
    out = {}
    for name in ("cm", "normuon"):
        ck = os.path.join(path, f"{mode}-{name}")
        model = TD.wrap_model(make_model(cfg), mode)
        opt = build_opt(name, TD.unwrap_model(model))
        train(model, opt, data[:2], rank, world, steps=2)
        TD.save_checkpoint(ck, model, opt, extra=dict(step=2))
        train(model, opt, data[2:], rank, world, steps=2)
        want = full_params(model)
        model2 = TD.wrap_model(make_model(cfg, seed=123), mode)  # different init: all must come from the ckpt
        opt2 = build_opt(name, TD.unwrap_model(model2))
        extra = TD.load_checkpoint(ck, model2, opt2)
        train(model2, opt2, data[2:], rank, world, steps=2)
        got = full_params(model2)
        err = max((got[n] - want[n]).abs().max().item() for n in want)
        # an incompatible layout: other head count (same parameter count), then other shapes
        errors = []
        for bad in (dict(cfg, H=cfg["H"] // 2, d=cfg["d"] * 2, Hkv=cfg["Hkv"] // 2), dict(cfg, D_=cfg["D_"] * 2)):
            model3 = TD.wrap_model(make_model(bad), mode)
            opt3 = build_opt(name, TD.unwrap_model(model3))
            try:
                TD.load_checkpoint(ck, model3, opt3)
                errors.append(None)
            except CheckpointError as e:
                errors.append(str(e))
        out[name] = dict(max_abs=err, extra=extra, errors=errors)
    return out


def sc_fallback(rank, world):
    data = batches(SPLIT["V"], STEPS)
    out = {}
    for cfg_name, cfg, name in (("split", SPLIT, "cm"), ("gqa", GQA, "cm"), ("mha", MHA, "cm_joint")):
        ref, init = reference(cfg, name, data) if rank == 0 else (None, None)
        counter = D.CommCounter()
        got, warns = distributed_run(cfg, name, "fsdp2", data, rank, world, counter=counter)
        if rank == 0:
            out[cfg_name] = dict(rel=rel_errors(got, ref, init)[0], warnings=warns, bytes=counter.by_tag())
    return out


def sc_layouts(rank, world):
    """Fused layouts under FSDP2: GPT-2's transposed Conv1D (q/k/v width-sharded, W_o heads on the
    shards) needs no fallback; a fused nn.Linear qkv puts q and k heads on different ranks (QK
    gather fallback) while its OV pair stays on the sharded path."""
    data = batches(32, STEPS)
    out = {}
    for attn in ("conv1d", "fused"):
        cfg = dict(MHA, attn=attn)
        for name in ("cm", "cm_iso"):
            ref, init = reference(cfg, name, data) if rank == 0 else (None, None)
            counter = D.CommCounter()
            got, warns = distributed_run(cfg, name, "fsdp2", data, rank, world, counter=counter)
            if rank == 0:
                out[f"{attn}/{name}"] = dict(rel=rel_errors(got, ref, init)[0], warnings=warns, bytes=counter.by_tag())
    return out


def _run_world(world, jobs):
    return run_world(world, jobs, __name__, prefix="cm-dist")


@pytest.fixture(scope="module")
def world2():
    path = tempfile.mkdtemp(prefix="cm-ckpt-")
    return _run_world(
        2,
        [
            ("equiv_gqa", "sc_equivalence", (ALL_OPTS, ("ddp", "fsdp2"), GQA)),
            ("equiv_extra", "sc_equivalence", (("cm_renorm", "cm_buckets"), ("ddp", "fsdp2"), GQA)),
            ("optout", "sc_optout", (GQA,)),
            ("qk_comm", "sc_qk_comm", (GQA,)),
            ("layouts", "sc_layouts", ()),
            ("ckpt_fsdp2", "sc_checkpoint", (GQA, path, "fsdp2")),
            ("ckpt_ddp", "sc_checkpoint", (GQA, path, "ddp")),
        ],
    )


@pytest.fixture(scope="module")
def world4():
    return _run_world(
        4,
        [
            ("equiv_mha", "sc_equivalence", (("muon", "cm", "cm_iso", "normuon", "newton"), ("fsdp2", "ddp"), MHA)),
            ("qk_comm", "sc_qk_comm", (MHA,)),
            ("fallback", "sc_fallback", ()),
        ],
    )


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("name", ALL_OPTS)
def test_two_ranks_match_single_process(world2, mode, name):
    r = _result(world2, "equiv_gqa")[f"{mode}/{name}"]
    assert r["rel"] < TOL, r
    assert not r["warnings"], r["warnings"]  # GQA at 2 ranks is aligned: no fallback
    if name != "mano":  # every msign optimizer spreads / gathers its matrices
        assert r["calls"] > 0 and sum(r["bytes"].values()) > 0, r


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_per_mat_renorm_matches_single_process(world2, mode):
    r = _result(world2, "equiv_extra")[f"{mode}/cm_renorm"]
    assert r["rel"] < TOL, r
    if mode == "fsdp2":
        assert r["bytes"].get("cm.qk.renorm", 0) > 0 and "cm.qk.gram" not in r["bytes"], r["bytes"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_streamed_cm_buckets_match_single_process(world2, mode):
    """bucket_bytes=1: under DDP every CM pair is a bucket of its own, spread and all-gathered on
    its own; FSDP2 computes its plan whole. Both equal the single-process bucketed run."""
    r = _result(world2, "equiv_extra")[f"{mode}/cm_buckets"]
    assert r["rel"] < TOL, r
    if mode == "ddp":
        assert r["bytes"].get("cm.spread", 0) > 0, r


@pytest.mark.parametrize("mode", ["fsdp2", "ddp"])
@pytest.mark.parametrize("name", ["muon", "cm", "cm_iso", "normuon", "newton"])
def test_four_ranks_match_single_process(world4, mode, name):
    r = _result(world4, "equiv_mha")[f"{mode}/{name}"]
    assert r["rel"] < TOL, r
    assert not r["warnings"], r["warnings"]


def test_ddp_spreads_msign_and_fsdp2_ov_communicates_grams_only(world2):
    res = _result(world2, "equiv_gqa")
    ddp = res["ddp/cm"]["bytes"]
    assert set(ddp) == {"cm.spread", "muon.msign"}, ddp  # one all_gather each (CM layers, MLP matrices)
    fs = res["fsdp2/cm"]["bytes"]
    # GQA model: L=2, Hkv=2, d=4, D=16, H=4 (float32). OV partner Grams: 2 L Hkv d^2 numbers.
    assert fs["cm.ov.gram"] == 4 * 2 * 2 * 2 * 4 * 4, fs
    assert "cm.qk.gram" not in fs and "cm.qk.msign" not in fs, fs
    # hybrid W_o: each layer's (D x H d) matrix to its owner and back: 2 * D*Hd/world per rank at most
    assert 0 < fs["cm.ov.hybrid"] <= 2 * 2 * 4 * 16 * 16 // 2, fs
    iso = res["fsdp2/cm_iso"]["bytes"]
    # isotropic, hybrid=False: scalar partner stats (2 L Hkv) + W_o's per-head msign Grams (L H d^2)
    assert iso["cm.ov.gram"] == 4 * 2 * 2 * 2 and iso["cm.ov.msign"] == 4 * 2 * 4 * 4 * 4, iso


def test_fused_layouts_under_fsdp2(world2):
    res = _result(world2, "layouts")
    for key, r in res.items():
        assert r["rel"] < TOL, (key, r)
    for name in ("cm", "cm_iso"):
        conv = res[f"conv1d/{name}"]
        assert not conv["warnings"] and "cm.fallback" not in conv["bytes"], conv
        assert conv["bytes"]["cm.qk.gram"] > 0 and conv["bytes"]["cm.qk.msign"] > 0, conv  # width x width QK
        fused = res[f"fused/{name}"]
        assert fused["warnings"] and all(".qk" in w for w in fused["warnings"]), fused
        assert fused["bytes"]["cm.ov.gram"] > 0, fused
    assert res["conv1d/cm"]["bytes"]["cm.ov.hybrid"] > 0  # W_o heads on the shards, one msign per layer


def test_distributed_false_issues_no_collective(world2):
    r = _result(world2, "optout")
    assert r["calls"] == 0 and r["rel"] < TOL, r


@pytest.mark.parametrize("world", [2, 4])
def test_aligned_qk_step_communicates_nothing(world2, world4, world):
    r = _result(world2 if world == 2 else world4, "qk_comm")
    assert r["paths"] == ["local"], r
    assert r["qk_bytes"] == 0, r
    # the only collective of the whole CM plan (CommDebugMode sees c10d and DTensor collectives
    # alike) is the 4-byte agreement on finiteness, not part of the QK update
    assert r["calls"] == ["all_reduce"] and r["tags"] == {"finite": 4}, r
    assert r["all_collectives"] == 1, r


def test_unaligned_heads_fall_back_with_a_warning(world4):
    res = _result(world4, "fallback")
    for key in ("split", "gqa", "mha"):
        r = res[key]
        assert r["rel"] < TOL, (key, r)
        assert r["warnings"], (key, r)
        assert len(set(r["warnings"])) == len(r["warnings"]), r["warnings"]  # once per layer, not per step
        assert r["bytes"].get("cm.fallback", 0) > 0, (key, r)
    assert any("blocks.0.attn.qk" in w and "straddles" in w for w in res["split"]["warnings"]), res["split"]
    assert any("blocks.0.attn.qk" in w for w in res["gqa"]["warnings"]), res["gqa"]
    # joint is head-local for aligned QK; only OV (width-sharded W_o) falls back
    assert all(".ov" in w and "joint" in w for w in res["mha"]["warnings"]), res["mha"]


@pytest.mark.parametrize("mode", ["fsdp2", "ddp"])
def test_checkpoint_resume_and_layout_errors(world2, mode):
    res = _result(world2, f"ckpt_{mode}")
    for name, r in res.items():
        assert r["max_abs"] == 0.0, (name, r)
        assert r["extra"] == {"step": 2}
        heads_err, shape_err = r["errors"]
        if name == "cm":  # same shapes, other heads: only CM's head layout differs
            assert heads_err is not None and "attention layout" in heads_err, (name, heads_err)
        else:
            assert heads_err is None, (name, heads_err)
        assert shape_err is not None and "has shape" in shape_err, (name, shape_err)


def test_timing_budget(world2, world4):
    assert world2["_seconds"] + world4["_seconds"] < 240, (world2["_seconds"], world4["_seconds"])


# ------------------------------------------------------------------------------------------------
# Single-process unit tests of the pieces
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["polar_express", "newton_schulz", "svd"])
def test_gram_msign_equals_msign_of_the_whole_matrix(backend):
    torch.manual_seed(0)
    X = torch.randn(3, 5, 4, 24, dtype=torch.float64)
    X[0, 0, 2] = X[0, 0, 1]  # a rank-deficient block
    want = msign(X, backend, dtype=torch.float64)
    parts = X.split([10, 8, 6], dim=-1)
    S = sum(p @ p.mT for p in parts)
    got = torch.cat([D.gram_msign(p, S, 24, backend) for p in parts], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_chunk_ranges_and_assignment():
    assert D.chunk_ranges(10, 4) == ((0, 3, 6, 9), (3, 6, 9, 10))
    assert D.chunk_ranges(5, 4) == ((0, 2, 4, 5), (2, 4, 5, 5))
    owner = D.assign([5, 1, 4, 2, 3], 2)
    assert owner == D.assign([5, 1, 4, 2, 3], 2)
    loads = [sum(c for c, o in zip([5, 1, 4, 2, 3], owner) if o == r) for r in range(2)]
    assert max(loads) - min(loads) <= 1


def test_single_process_is_untouched():
    """No process group: the optimizers take their single-process path (and reject bad modes)."""
    model = make_model(GQA)
    opt = build_opt("cm", model)
    assert D.replicated_group(opt) is None
    with pytest.raises(ValueError, match="distributed"):
        Muon(model.parameters(), distributed="yes")
    opt = build_opt("muon", model, distributed=True)
    x, y = batches(32, 1)[0]
    F.cross_entropy(model(x).reshape(-1, 32), y.reshape(-1)).backward()
    with pytest.raises(RuntimeError, match="not initialized"):
        opt.step()


def test_checkpoint_single_process(tmp_path):
    """save_checkpoint / load_checkpoint also work without a process group (same DCP format)."""
    from compositional_muon.training.checkpoint import CheckpointError

    data = batches(32, 3)
    model = make_model(GQA)
    opt = build_opt("cm", model)
    train(model, opt, data[:2], steps=2)
    TD.save_checkpoint(str(tmp_path / "ck"), model, opt, extra=dict(step=2))
    train(model, opt, data[2:], steps=1)
    model2 = make_model(GQA, seed=5)
    opt2 = build_opt("cm", model2)
    assert TD.load_checkpoint(str(tmp_path / "ck"), model2, opt2) == {"step": 2}
    train(model2, opt2, data[2:], steps=1)
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
    model3 = make_model(dict(GQA, L=3))
    with pytest.raises(CheckpointError, match="in the model but not in the checkpoint"):
        TD.load_checkpoint(str(tmp_path / "ck"), model3, build_opt("cm", model3))
    with pytest.raises(CheckpointError, match="optimizer 'CompositionalMuon' in the checkpoint"):
        TD.load_checkpoint(str(tmp_path / "ck"), model2, build_opt("muon", model2))
