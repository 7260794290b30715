"""Distributed training: DDP (replicated parameters) and FSDP2 / DTensor (parameters sharded on dim 0).

Every optimizer of the library runs unchanged under both; this module supplies the distributed
paths the optimizers call into and the collectives (all counted, see :class:`CommCounter`). The
helpers a training script needs (process groups, DDP / FSDP2 wrapping, DCP checkpoints) are in
:mod:`compositional_muon.training.dist`.

Replicated parameters (DDP; gradients are already averaged by DDP)
    Momentum and element-wise work stay replicated; the msigns are *spread*: each rank
    orthogonalizes a share of the matrices (greedy balance by cost over all matrices of a param
    group; for CM, over the layers of every same-shape bucket), then one ``all_gather`` per group
    and step gives every rank every result, so all ranks apply identical updates. Auto-detected
    when ``torch.distributed`` is initialized with world size > 1; ``distributed=False`` on the
    optimizer opts out (every rank then does all the work itself and issues no collective).

DTensor parameters (FSDP2 ``fully_shard``: ``Shard(0)`` on a 1-D mesh)
    Element-wise work runs on the shards (DTensor dispatch). Whole-matrix msigns (Muon and the
    variants, CM's hybrid ``W_o``) send each matrix's row shards to one owner rank
    (``all_to_all``), the owner orthogonalizes it and sends the rows back (``all_to_all``).
    CM exploits its structure: a factor whose heads are rows of the sharded dim ("heads" mode:
    ``q``, ``k``, ``v`` of separate projections) is updated where its heads live, so an aligned QK
    pair (every query head on the rank of its key head) needs no communication at all; a factor
    whose heads are columns ("width" mode: ``o_proj``) only needs its ``d x d`` partner Grams and
    per-head msign Grams all-reduced (``msign(X) = (X X^T)^{-1/2} X`` evaluated from the Gram,
    see :func:`gram_msign`). Pairs whose heads straddle shard boundaries, or variants that are not
    head-local (``method="joint"``, a gauge ``connection``, ``momentum_reproject`` across a
    width-sharded factor), fall back to gathering the full tensors, computing, and writing back
    the local rows, with a one-time warning naming the layer.

See ``docs/distributed.md`` for the per-step communication volumes.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import msign as _msign_mod
from .attention import head_view
from .cm import CMConfig, apply_update, cm_momentum, pair_update
from .inverse_root import gram_eigh, inverse_sqrt_newton
from .msign import msign

try:  # DTensor / FSDP2 (torch >= 2.4)
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = Replicate = Shard = None

__all__ = [
    "CommCounter",
    "replicated_group",
    "row_sharding",
    "gram_msign",
    "DISTRIBUTED_MODES",
]

DISTRIBUTED_MODES = ("auto", True, False)


# ------------------------------------------------------------------------------------------------
# Communication accounting: every collective this module issues goes through these wrappers.
# ------------------------------------------------------------------------------------------------

_COUNTERS: list = []


class CommCounter:
    """Context manager that records the collectives the optimizers issue through this module.

    ``calls`` is a list of ``(op, tag, nbytes)``; ``nbytes`` is this rank's payload: the tensor
    size for ``all_reduce``, this rank's contribution for ``all_gather``, the bytes sent to other
    ranks for ``all_to_all``. Tags name the step part (``"muon.msign"``, ``"cm.qk.gram"``,
    ``"cm.ov.gram"``, ``"cm.ov.hybrid"``, ``"cm.fallback"``, ...). DTensor's own element-wise
    dispatch (scalar norm reductions in NorMuon/AdaMuon/Mano) is not counted; use
    ``torch.distributed.tensor.debug.CommDebugMode`` for those.
    """

    def __init__(self):
        self.calls: list = []

    def __enter__(self) -> CommCounter:
        _COUNTERS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _COUNTERS.remove(self)

    def total(self, prefix: str = "") -> int:
        """Bytes over the calls whose tag starts with ``prefix``."""
        return sum(b for _, t, b in self.calls if t.startswith(prefix))

    def count(self, prefix: str = "") -> int:
        """Number of collective calls whose tag starts with ``prefix``."""
        return sum(1 for _, t, _ in self.calls if t.startswith(prefix))

    def by_tag(self) -> dict:
        out: dict = {}
        for _, t, b in self.calls:
            out[t] = out.get(t, 0) + b
        return out


def _record(op: str, tag: str, nbytes: int) -> None:
    for c in _COUNTERS:
        c.calls.append((op, tag, int(nbytes)))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _all_reduce(t: torch.Tensor, group, tag: str, op=None) -> torch.Tensor:
    _record("all_reduce", tag, _nbytes(t))
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return t


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group, tag: str) -> torch.Tensor:
    _record("all_gather", tag, _nbytes(inp))
    # torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, inp, group=group)
    return out


def _all_to_all(out, inp, out_splits, in_splits, group, tag: str, rank: int) -> torch.Tensor:
    _record("all_to_all", tag, (sum(in_splits) - in_splits[rank]) * inp.element_size())
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
    return out


def _world(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if is_dtensor(t) else t


def replicated_group(opt):
    """The process group over which the work on replicated (DDP) parameters is spread, or None.

    ``opt.distributed``: ``"auto"`` (default) spreads when ``torch.distributed`` is initialized
    with world size > 1; ``True`` requires it; ``False`` never spreads (no collective is issued for
    replicated parameters)."""
    mode = getattr(opt, "distributed", "auto")
    if mode is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if mode is True:
            raise RuntimeError(f"{type(opt).__name__}(distributed=True) but torch.distributed is not initialized")
        return None
    if dist.get_world_size() == 1:
        return None
    return dist.group.WORLD


def wants_distributed(opt, tensors) -> bool:
    """Whether a step over ``tensors`` needs the distributed path (DTensors, or spreading)."""
    return any(is_dtensor(t) for t in tensors) or replicated_group(opt) is not None


@dataclass(frozen=True)
class Rows:
    """Dim-0 sharding of a DTensor over a 1-D mesh: rank ``r`` holds rows ``starts[r]:ends[r]``."""

    group: object
    rank: int
    world: int
    starts: tuple
    ends: tuple

    @property
    def lo(self) -> int:
        return self.starts[self.rank]

    @property
    def hi(self) -> int:
        return self.ends[self.rank]

    def owner(self, row: int) -> int:
        for r in range(self.world):
            if self.starts[r] <= row < self.ends[r]:
                return r
        raise IndexError(row)


def chunk_ranges(n: int, world: int) -> tuple[tuple, tuple]:
    """Row ranges of ``torch.chunk``-style sharding (DTensor ``Shard``, FSDP2): ``ceil(n/world)``
    rows per rank, the last ranks possibly short or empty."""
    c = -(-n // world) if n else 0
    return tuple(min(r * c, n) for r in range(world)), tuple(min((r + 1) * c, n) for r in range(world))


def row_sharding(t) -> Rows | None:
    """:class:`Rows` for a DTensor sharded on dim 0 over a 1-D mesh (FSDP2's layout), else None."""
    if not is_dtensor(t):
        return None
    mesh = t.device_mesh
    if mesh.ndim != 1 or len(t.placements) != 1:
        return None
    pl = t.placements[0]
    if type(pl) is not Shard or pl.dim != 0:
        return None
    world, rank = mesh.size(), mesh.get_local_rank()
    starts, ends = chunk_ranges(t.shape[0], world)
    if t.to_local().shape[0] != ends[rank] - starts[rank]:
        return None
    return Rows(mesh.get_group(), rank, world, starts, ends)


def _from_local(x: torch.Tensor, like) -> DTensor:
    return DTensor.from_local(
        x, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def _reshard(full: torch.Tensor, like) -> DTensor:
    """A full (replicated) tensor, laid out like the DTensor ``like`` (no communication)."""
    rep = DTensor.from_local(full, like.device_mesh, [Replicate()] * like.device_mesh.ndim, run_check=False)
    return rep.redistribute(like.device_mesh, like.placements)


def _local_part(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's part of ``full`` in the layout of ``like`` (a DTensor or a plain tensor)."""
    if not is_dtensor(like):
        return full
    rows = row_sharding(like)
    if rows is not None:
        return full[rows.lo : rows.hi]
    return _reshard(full, like).to_local()


def gather_full(t: torch.Tensor, tag: str) -> torch.Tensor:
    """The full tensor of a DTensor (``all_gather`` for dim-0 shards); a plain tensor is returned as is."""
    if not is_dtensor(t):
        return t
    rows = row_sharding(t)
    if rows is None:
        _record("full_tensor", tag, _nbytes(t.to_local()))
        return t.full_tensor()
    loc = t.to_local()
    c = -(-t.shape[0] // rows.world)
    buf = loc.new_zeros((c,) + tuple(loc.shape[1:]))
    buf[: loc.shape[0]] = loc
    out = loc.new_empty((c * rows.world,) + tuple(loc.shape[1:]))
    _all_gather(out, buf, rows.group, tag)
    return out[: t.shape[0]]


# ------------------------------------------------------------------------------------------------
# Work distribution primitives
# ------------------------------------------------------------------------------------------------


def assign(costs, world: int) -> list:
    """Deterministic greedy (longest first) assignment of work units to ranks: ``owner[i]``."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in order:
        r = min(range(world), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += costs[i]
    return owner


def _common_dtype(dtypes) -> torch.dtype:
    out = None
    for dt in dtypes:
        out = dt if out is None else torch.promote_types(out, dt)
    return out


def spread(numels, costs, compute, dtype, device, group, tag: str) -> list:
    """Replicated work, computed once across ranks: rank ``r`` runs ``compute(indices)`` for its
    share (a list of result tensors, one per index, ``numels[i]`` elements each), then one
    ``all_gather`` gives every rank every result, returned as flat ``dtype`` tensors."""
    world, rank = _world(group)
    owner = assign(costs, world)
    mine = [i for i in range(len(numels)) if owner[i] == rank]
    sizes = [0] * world
    for i, n in enumerate(numels):
        sizes[owner[i]] += n
    width = max(sizes) if sizes else 0
    buf = torch.zeros(width, dtype=dtype, device=device)
    if mine:
        outs = compute(mine)
        off = 0
        for i, o in zip(mine, outs):
            buf[off : off + numels[i]] = o.reshape(-1).to(dtype)
            off += numels[i]
    full = torch.empty(world * width, dtype=dtype, device=device)
    _all_gather(full, buf, group, tag)
    offs = [r * width for r in range(world)]
    res = []
    for i, n in enumerate(numels):
        r = owner[i]
        res.append(full[offs[r] : offs[r] + n])
        offs[r] += n
    return res


def owner_compute(locals_, shapes, ranges, costs, fn, group, tag: str) -> list:
    """Whole-matrix work on row-sharded tensors, each computed by one owner rank.

    Job ``j`` is a tensor of global shape ``shapes[j]`` of which this rank holds rows
    ``ranges[j][0][r]:ranges[j][1][r]`` (``locals_[j]``). One ``all_to_all`` sends every job's
    shards to its owner, which calls ``fn(list of full tensors) -> list of full results`` (same
    shapes) on all of its jobs at once; a second ``all_to_all`` returns each rank its rows of every
    result. Returns the local result shards (dtype of the inputs)."""
    world, rank = _world(group)
    n = len(locals_)
    owner = assign(costs, world)
    wire = _common_dtype(t.dtype for t in locals_)
    device = locals_[0].device
    trail = [math.prod(shapes[j][1:]) for j in range(n)]

    def rows(j, r):
        return ranges[j][1][r] - ranges[j][0][r]

    mine = [j for j in range(n) if owner[j] == rank]
    # 1. shards -> owners
    parts = [[] for _ in range(world)]
    for j in range(n):
        parts[owner[j]].append(locals_[j].reshape(-1).to(wire))
    in_splits = [sum(p.numel() for p in parts[r]) for r in range(world)]
    out_splits = [sum(rows(j, r) * trail[j] for j in mine) for r in range(world)]
    send = torch.cat([p for ps in parts for p in ps]) if n else torch.empty(0, dtype=wire, device=device)
    recv = torch.empty(sum(out_splits), dtype=wire, device=device)
    _all_to_all(recv, send, out_splits, in_splits, group, tag, rank)
    pieces = list(recv.split(out_splits))
    offs = [0] * world
    fulls = []
    for j in mine:
        chunks = []
        for r in range(world):
            k = rows(j, r) * trail[j]
            chunks.append(pieces[r][offs[r] : offs[r] + k])
            offs[r] += k
        fulls.append(torch.cat(chunks).view(shapes[j]).to(locals_[j].dtype))
    outs = fn(fulls) if mine else []
    # 2. result rows -> their ranks
    parts2 = [[] for _ in range(world)]
    for j, o in zip(mine, outs):
        for r in range(world):
            parts2[r].append(o[ranges[j][0][r] : ranges[j][1][r]].reshape(-1).to(wire))
    in2 = [sum(p.numel() for p in parts2[r]) for r in range(world)]
    out2 = [sum(rows(j, rank) * trail[j] for j in range(n) if owner[j] == r) for r in range(world)]
    send2 = torch.cat([p for ps in parts2 for p in ps]) if any(parts2) else torch.empty(0, dtype=wire, device=device)
    recv2 = torch.empty(sum(out2), dtype=wire, device=device)
    _all_to_all(recv2, send2, out2, in2, group, tag, rank)
    pieces2 = list(recv2.split(out2))
    offs = [0] * world
    res = []
    for j in range(n):
        r = owner[j]
        k = rows(j, rank) * trail[j]
        res.append(pieces2[r][offs[r] : offs[r] + k].view((rows(j, rank),) + tuple(shapes[j][1:])).to(locals_[j].dtype))
        offs[r] += k
    return res


# ------------------------------------------------------------------------------------------------
# Muon family: msign of every direction
# ------------------------------------------------------------------------------------------------


def _msign_cost(shape) -> float:
    m, n = shape[-2], shape[-1]
    return float(m) * n * min(m, n)


def orthogonalize(opt, group: dict, dirs: list) -> list:
    """Distributed ``Muon._orthogonalize``: replicated directions are spread across ranks (one
    ``all_gather``); DTensor directions are gathered to owner ranks and scattered back (two
    ``all_to_all``). Returns the msigns in the layout of the directions."""
    out = [None] * len(dirs)
    plain = [i for i, u in enumerate(dirs) if not is_dtensor(u)]
    if plain:
        sub = [dirs[i] for i in plain]
        pg = replicated_group(opt)
        if pg is None:
            zs = opt._orthogonalize_local(group, sub)
        else:
            dtype = _common_dtype(u.dtype for u in sub)
            flat = spread(
                [u.numel() for u in sub],
                [_msign_cost(u.shape) for u in sub],
                lambda idx: opt._orthogonalize_local(group, [sub[i] for i in idx]),
                dtype,
                sub[0].device,
                pg,
                "muon.msign",
            )
            zs = [f.view(u.shape).to(u.dtype) for f, u in zip(flat, sub)]
        for i, z in zip(plain, zs):
            out[i] = z
    sharded = [i for i, u in enumerate(dirs) if is_dtensor(u)]
    fast: dict = {}
    slow = []
    for i in sharded:
        rows = row_sharding(dirs[i])
        (fast.setdefault(rows.group, []).append((i, rows)) if rows is not None else slow.append(i))
    for pg, jobs in fast.items():
        us = [dirs[i] for i, _ in jobs]
        zs = owner_compute(
            [u.to_local() for u in us],
            [tuple(u.shape) for u in us],
            [(r.starts, r.ends) for _, r in jobs],
            [_msign_cost(u.shape) for u in us],
            lambda fulls: opt._orthogonalize_local(group, fulls),
            pg,
            "muon.msign",
        )
        for (i, _), u, z in zip(jobs, us, zs):
            out[i] = _from_local(z.contiguous(), u)
    if slow:  # any other DTensor layout: gather, compute everywhere, re-shard
        fulls = [gather_full(dirs[i], "muon.msign") for i in slow]
        for i, z in zip(slow, opt._orthogonalize_local(group, fulls)):
            out[i] = _reshard(z, dirs[i])
    return out


def zeros_rows(like: torch.Tensor, cols: int, dtype) -> torch.Tensor:
    """``zeros(like.size(0), cols)`` laid out like ``like`` (row-sharded when ``like`` is)."""
    if not is_dtensor(like):
        return torch.zeros(like.size(0), cols, dtype=dtype, device=like.device)
    rows = row_sharding(like)
    if rows is not None:
        z = torch.zeros(rows.hi - rows.lo, cols, dtype=dtype, device=like.device)
        return DTensor.from_local(
            z, like.device_mesh, like.placements, run_check=False, shape=(like.size(0), cols), stride=(cols, 1)
        )
    full = torch.zeros(like.size(0), cols, dtype=dtype, device=like.device)
    return DTensor.from_local(full, like.device_mesh, [Replicate()] * like.device_mesh.ndim, run_check=False)


def map_local(t: torch.Tensor, fn) -> torch.Tensor:
    """``fn`` applied to the local shard of a row-sharded DTensor (row-wise ``fn`` only), rewrapped."""
    if not is_dtensor(t):
        return fn(t)
    if row_sharding(t) is None and any(not isinstance(p, Replicate) for p in t.placements):
        return _reshard(fn(gather_full(t, "map_local")), t)
    return _from_local(fn(t.to_local()), t)


def grads_finite(flags, dtensor_groups, device=None) -> bool:
    """``all(flags)`` agreed across the ranks of the DTensor meshes (one tiny all-reduce each), so
    every rank takes the same raise/skip decision when only some shards hold NaN/inf."""
    ok = not flags or bool(torch.stack(flags).all())
    for pg in dtensor_groups:
        t = torch.tensor([1.0 if ok else 0.0], device=device)
        _all_reduce(t, pg, "finite", dist.ReduceOp.MIN)
        ok = bool(t.item() > 0)
    return ok


def dtensor_groups(tensors) -> list:
    """The distinct process groups of the DTensors among ``tensors`` (mesh order)."""
    seen, out = set(), []
    for t in tensors:
        if is_dtensor(t):
            for pg in t.device_mesh.get_all_groups():
                if id(pg) not in seen:
                    seen.add(id(pg))
                    out.append(pg)
    return out


def average_grams(opt, entries) -> None:
    """NewtonMuon: average the captured input Grams ``Z Z^T / N`` over the data-parallel ranks
    (one ``all_reduce`` on refresh steps), so ``K`` is the full-batch second moment on every rank.

    ``entries``: ``[(weight, K shape)]`` of the weights refreshing this step, in the same order on
    every rank."""
    if not entries:
        return
    pg = replicated_group(opt)
    for w, _ in entries:
        if is_dtensor(w):
            pg = w.device_mesh.get_group() if w.device_mesh.ndim == 1 else dist.group.WORLD
            break
    if pg is None:
        return
    device = entries[0][0].device
    dtype = _common_dtype([torch.float32] + [w.dtype for w, _ in entries])  # the Grams' dtype, same on every rank
    bufs = []
    for w, shape in entries:
        acc = opt._grams.get(w)
        g = (
            (acc[0] / acc[1]).reshape(-1).to(dtype)
            if acc is not None
            else torch.zeros(math.prod(shape), dtype=dtype, device=device)
        )
        bufs.append(torch.cat([g, g.new_tensor([1.0 if acc is not None else 0.0])]))
    flat = _all_reduce(torch.cat(bufs), pg, "newton.gram")
    off = 0
    for (w, shape), b in zip(entries, bufs):
        k = b.numel()
        seg = flat[off : off + k]
        off += k
        cnt = seg[-1].item()
        acc = opt._grams.get(w)
        if cnt > 0:
            dtype = acc[0].dtype if acc is not None else torch.float32
            opt._grams[w] = [(seg[:-1] / cnt).view(shape).to(dtype), 1]
        else:
            opt._grams.pop(w, None)


# ------------------------------------------------------------------------------------------------
# msign of a column-sharded wide matrix from its all-reduced Gram
# ------------------------------------------------------------------------------------------------


def gram_msign(X: torch.Tensor, S: torch.Tensor, n: int, backend: str = "polar_express", steps=None) -> torch.Tensor:
    """``msign`` of a wide matrix ``[X_1 | ... | X_W]`` (``m x n``, ``m <= n``) whose column blocks
    live on different ranks, from its Gram ``S = sum_r X_r X_r^T`` (``m x m``, all-reduced):
    returns this rank's columns ``Q X`` of the result.

    The iterative backends act on ``y = X / (||X||_F s)`` as ``y <- (a I + b A + c A^2) y`` with
    ``A = y y^T``; every step is a polynomial in the Gram, so ``msign(X) = Q(S) X`` where ``Q`` is
    obtained by running the iteration on ``S`` alone (``A <- P A P``, ``Q <- P Q``), in float64.
    ``"svd"`` uses ``Q = U diag(1/sigma) U^T`` from ``eigh(S)`` with the SVD backend's rank cut.
    Only ``m x m`` numbers cross the network per matrix."""
    m = X.size(-2)
    if m > n:
        raise ValueError(f"gram_msign needs a wide matrix (m <= n), got m={m}, n={n}")
    Sd = S.to(torch.float64)
    Sd = 0.5 * (Sd + Sd.mT)
    eye = torch.eye(m, dtype=torch.float64, device=S.device)
    if backend == "svd":
        lam, U = torch.linalg.eigh(Sd)
        sig = lam.clamp_min(0).sqrt()
        eps = torch.finfo(X.dtype if X.dtype in (torch.float32, torch.float64) else torch.float32).eps
        tol = sig.amax(-1, keepdim=True) * max(m, n) * eps
        keep = (sig > tol) & (sig > 0)
        inv = torch.where(keep, 1.0 / torch.where(keep, sig, torch.ones_like(sig)), torch.zeros_like(sig))
        Q = (U * inv.unsqueeze(-2)) @ U.mT
    else:
        defaults = getattr(_msign_mod, "_DEFAULT_STEPS", {"polar_express": 8, "newton_schulz": 5})
        k = defaults[backend] if steps is None else int(steps)
        if backend == "newton_schulz":
            coeffs, scale = [_msign_mod.NS_COEFFS] * k, 1.0
        else:
            pe = _msign_mod.POLAR_EXPRESS_COEFFS
            coeffs = list(pe[:k]) + [pe[-1]] * (k - len(pe[:k]))
            scale = getattr(_msign_mod, "_PE_SAFETY", 1.01)
        tiny = getattr(_msign_mod, "_EPS", 1e-7)
        norm = Sd.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt()[..., None, None]
        s0 = 1.0 / (norm * scale + tiny)
        A = Sd * s0 * s0
        Q = eye * s0
        for a, b, c in coeffs:
            P = a * eye + b * A + c * (A @ A)
            Q = P @ Q
            A = P @ A @ P
            A = 0.5 * (A + A.mT)
    return (Q.to(X.dtype) @ X) if X.dtype == torch.float64 else (Q.to(torch.float32) @ X.to(torch.float32)).to(X.dtype)


# ------------------------------------------------------------------------------------------------
# Compositional Muon
# ------------------------------------------------------------------------------------------------


def _left(R: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Per-group left factor (``(L, n, d, d)`` or ``(L, n, 1, 1)``) applied to ``(L, n, G, d, D)``."""
    R = R.unsqueeze(2).to(X.dtype)
    return R * X if R.size(-1) == 1 else R @ X


@dataclass
class Factor:
    """Where one CM factor's heads live relative to the shards.

    ``mode``: ``"heads"`` (heads are row blocks of the sharded dim, each within one rank; this rank
    holds heads ``lo:hi``, rank ``r`` heads ``spans[r]``), ``"width"`` (heads are columns, every
    rank holds rows ``rows.lo:rows.hi`` of every head's width), ``"full"`` (not sharded),
    ``"split"`` (a head straddles a shard boundary) or ``"other"`` (not a dim-0 1-D sharding)."""

    mode: str
    rows: Rows | None = None
    lo: int = 0
    hi: int = 0
    spans: tuple = ()


def factor_layout(p, ref, n: int, d: int) -> Factor:
    """The :class:`Factor` of ``n`` heads of size ``d`` at ``ref = (axis, offset, stride)`` of ``p``."""
    axis, offset, stride = ref
    if not is_dtensor(p):
        return Factor("full", None, 0, n, ((0, n),))
    rows = row_sharding(p)
    if rows is None:
        if all(isinstance(pl, Replicate) for pl in p.placements):
            return Factor("full", None, 0, n, ((0, n),))
        return Factor("other")
    if axis == 1:
        return Factor("width", rows, 0, n, tuple((0, n) for _ in range(rows.world)))
    owners = []
    for h in range(n):
        a = offset + h * stride
        r = rows.owner(a)
        if a + d > rows.ends[r]:
            return Factor("split", rows)
        owners.append(r)
    spans, first = [], 0
    for r in range(rows.world):
        cnt = sum(1 for o in owners if o == r)
        spans.append((first, first + cnt))
        first += cnt
    lo, hi = spans[rows.rank]
    return Factor("heads", rows, lo, hi, tuple(spans))


def _local_heads(t: torch.Tensor, ref, f: Factor, d: int) -> torch.Tensor:
    """Kernel-layout view ``(heads, d, width)`` of this rank's part of a factor in the local shard ``t``."""
    axis, offset, stride = ref
    if f.mode == "width":
        return head_view(t, 1, offset, stride, f.hi, d)
    if f.mode == "full":
        return head_view(t, axis, offset, stride, f.hi, d)
    if f.hi == f.lo:
        return t.new_empty((0, d, t.size(1)))
    return head_view(t, 0, offset + f.lo * stride - f.rows.lo, stride, f.hi - f.lo, d)


def _pair_path(fa: Factor, fb: Factor, G: int, d: int, D: int, cfg: CMConfig, kind: str, reproject: bool):
    """``("local" | "sharded" | "gather", reason)`` for one CM pair."""
    modes = (fa.mode, fb.mode)
    if "other" in modes:
        return "gather", "its weights are not sharded on dim 0 over a 1-D mesh"
    if "split" in modes:
        return "gather", "a head straddles a shard boundary (shards do not align with heads)"
    if "full" in modes:
        if modes == ("full", "full"):
            return "local", ""
        return "gather", "one factor is sharded and the other is not"
    if fa.rows.group is not fb.rows.group:
        return "gather", "its factors live on different meshes"
    if modes == ("heads", "heads"):
        if any(sa != (sb[0] * G, sb[1] * G) for sa, sb in zip(fa.spans, fb.spans)):
            return "gather", "a query/output head is not on the rank of its key/value head"
        if not cfg.per_mat_renorm and not (kind == "ov" and cfg.hybrid):
            return "local", ""
    if fa.mode == "heads" and any(a % G or b % G for a, b in fa.spans):
        return "gather", "a group of heads sharing a key/value head straddles a shard boundary"
    if cfg.method != "half_split":
        return "gather", f"method={cfg.method!r} stacks a width-sharded factor with its partner"
    if cfg.connection != "none" or reproject:
        return "gather", f"connection={cfg.connection!r} couples the shards of a width-sharded factor"
    if d > D:
        return "gather", f"head_dim {d} exceeds the width {D}"
    return "sharded", ""


def _roots(S: torch.Tensor, cfg: CMConfig, d: int, device) -> torch.Tensor:
    """Inverse partner roots from grouped Grams (``(L, n, d, d)``) or square sums (``(L, n, 1, 1)``),
    as ``cm._partner_roots`` computes them (no eigendecompositions are needed without a connection)."""
    if cfg.isotropic:
        return (S / d + cfg.lam).rsqrt()
    method = cfg.root_method
    if method == "auto":
        method = "eigh" if device.type == "cpu" else "newton"
    if method == "newton":
        return inverse_sqrt_newton(S, cfg.lam, cfg.root_iters)
    s, U = gram_eigh(S)
    return (U * (s + cfg.lam).rsqrt().unsqueeze(-2)) @ U.mT


def sharded_pair_update(
    A, B, Ua, Ub, eta: float, cfg: CMConfig, fa: Factor, fb: Factor, H: int, hkv: int, D: int, group, tag: str
):
    """:func:`cm.pair_update` (``method="half_split"``, no connection) for factors sharded by head
    ("heads") or by width ("width"), on this rank's parts: ``A``/``Ua`` ``(L, H_loc, d, D_loc)``,
    ``B``/``Ub`` ``(L, Hkv_loc, d, D_loc)``. Collectives: one all-reduce of the partner Grams when
    a factor is width-sharded (``2 L Hkv d^2`` numbers; ``2 L Hkv`` if isotropic), one all-reduce
    of the per-head msign Grams of the width-sharded factors (``d^2`` per head and layer), the
    owner gather/scatter of the hybrid ``W_o`` msign, and ``4 L`` norms with ``per_mat_renorm``."""
    L, d = A.size(0), A.size(2)
    G = H // hkv
    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    device = A.device
    width = "width" in (fa.mode, fb.mode)
    ga = (fa.lo // G, fa.hi // G)  # groups of this rank's A heads
    gb = (fb.lo, fb.hi)  # groups of this rank's B heads
    k = 1 if cfg.isotropic else d

    def stat(X):  # (L, n, d, w) -> (L, n, k, k)
        return X.square().sum(dim=(-2, -1))[..., None, None] if cfg.isotropic else X @ X.mT

    Sa = torch.zeros(L, hkv, k, k, dtype=work, device=device)
    Sb = torch.zeros(L, hkv, k, k, dtype=work, device=device)
    if A.size(1):
        Sa[:, ga[0] : ga[1]] = stat(A.to(work)).unflatten(1, (-1, G)).sum(2)
    if B.size(1):
        Sb[:, gb[0] : gb[1]] = stat(B.to(work))
    if width:
        flat = _all_reduce(torch.cat([Sa.reshape(-1), Sb.reshape(-1)]), group, tag + ".gram")
        Sa, Sb = flat[: Sa.numel()].view_as(Sa), flat[Sa.numel() :].view_as(Sb)
    R_b = _roots(Sb[:, ga[0] : ga[1]], cfg, d, device)  # whitens A (partner B)
    R_a = _roots(Sa[:, gb[0] : gb[1]], cfg, d, device)  # whitens B (partner A)
    pre = cfg.whitening in ("both", "pre")
    post = cfg.whitening in ("both", "post")
    rw = R_b.dtype
    Ua_g = Ua.unflatten(1, (-1, G)).to(rw)
    Ub_g = Ub.unsqueeze(2).to(rw)
    Xa = _left(R_b, Ua_g) if pre else Ua_g
    Xb = _left(R_a, Ub_g) if pre else Ub_g
    ms = dict(backend=cfg.msign_backend, steps=cfg.msign_steps, dtype=cfg.msign_dtype)

    def local_msign(X):
        return msign(X, **ms) if X.numel() else X.clone()

    # msign: per head where the head is whole; the hybrid W_o by its owner; width-sharded heads
    # from their all-reduced d x d Grams (one collective for both factors).
    Za = Zb = None
    grams = []
    if cfg.hybrid:
        Za = _hybrid_msign(Xa, fa, H, d, D, ms, group, tag + ".hybrid")
    elif fa.mode == "width":
        grams.append("a")
    else:
        Za = local_msign(Xa)
    if fb.mode == "width":
        grams.append("b")
    else:
        Zb = local_msign(Xb)
    if grams:
        X = {"a": Xa, "b": Xb}
        S = [X[g] @ X[g].mT for g in grams]
        flat = _all_reduce(torch.cat([s.reshape(-1) for s in S]), group, tag + ".msign")
        off = 0
        for g, s in zip(grams, S):
            s_all = flat[off : off + s.numel()].view_as(s)
            off += s.numel()
            z = gram_msign(X[g], s_all, D, cfg.msign_backend, cfg.msign_steps)
            if g == "a":
                Za = z
            else:
                Zb = z
    dA = _left(R_b, Za) if post else Za
    dB = _left(R_a, Zb) if post else Zb
    if cfg.per_mat_renorm:
        dims = tuple(range(1, dA.ndim))
        sums = torch.stack(
            [Za.square().sum(dims), dA.square().sum(dims), Zb.square().sum(dims), dB.square().sum(dims)], -1
        )
        sums = _all_reduce(sums, group, tag + ".renorm")
        rt = sums.sqrt()

        def ratio(num, den):
            r = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.ones_like(den))
            return r.view(L, 1, 1, 1, 1)

        dA = dA * ratio(rt[:, 0], rt[:, 1])
        dB = dB * ratio(rt[:, 2], rt[:, 3])
    scale = eta / 2
    dA = (-scale * dA).flatten(1, 2)
    dB = (-scale * dB).squeeze(2)
    return dA.to(Ua.dtype), dB.to(Ub.dtype)


def _hybrid_msign(Xa, fa: Factor, H: int, d: int, D: int, ms: dict, group, tag: str):
    """One msign per layer of the whole ``(H d) x D`` factor, computed by an owner rank per layer."""
    L, ng, G = Xa.size(0), Xa.size(1), Xa.size(2)
    world = fa.rows.world
    if fa.mode == "width":  # heads are columns: shard rows are the width D -> jobs are M^T (D x H d)
        dl = Xa.size(-1)
        jobs = [Xa[l].reshape(H * d, dl).mT.contiguous() for l in range(L)]
        shapes = [(D, H * d)] * L
        ranges = [(fa.rows.starts, fa.rows.ends)] * L
        fn = lambda fulls: list(msign(torch.stack(fulls).mT, **ms).mT.unbind(0))  # noqa: E731
    else:  # heads are rows of the shards
        jobs = [Xa[l].reshape(-1, D).contiguous() for l in range(L)]
        shapes = [(H * d, D)] * L
        ranges = [(tuple(s[0] * d for s in fa.spans), tuple(s[1] * d for s in fa.spans))] * L
        fn = lambda fulls: list(msign(torch.stack(fulls), **ms).unbind(0))  # noqa: E731
    outs = owner_compute(jobs, shapes, ranges, [_msign_cost((H * d, D))] * L, fn, group, tag)
    if fa.mode == "width":
        return torch.stack([o.mT for o in outs]).reshape(L, ng, G, d, -1)
    return torch.stack(outs).reshape(L, ng, G, d, D)


def _warn_once(opt, key: str, msg: str) -> None:
    seen = opt.__dict__.setdefault("_dist_warned", set())
    if key not in seen:
        seen.add(key)
        warnings.warn(msg, UserWarning, stacklevel=4)


def sharded_cm_plan(opt, group: dict, cfg: CMConfig) -> list:
    """``CompositionalMuon._cm_plan`` for a CM group holding DTensor parameters (FSDP2).

    Returns plan items in the single-process format (local views ``w``/``m``, local ``dA``/``dB``
    stacks) for the "local" and "sharded" paths, and items with an ``apply`` closure for the
    gather fallback. Every item carries ``finite``, agreed across ranks."""
    params = group["params"]
    eta = float(group["lr"])
    buckets: dict = {}
    pg = None
    for pair in group["cm_pairs"]:
        pa, pb = params[pair["a"][0]], params[pair["b"][0]]
        if pa.grad is None or pb.grad is None:
            continue
        d, H, hkv = pair["head_dim"], pair["num_heads"], pair["num_kv_heads"]
        ra, rb = tuple(pair["a"][1:]), tuple(pair["b"][1:])
        fa, fb = factor_layout(pa, ra, H, d), factor_layout(pb, rb, hkv, d)
        D = pa.shape[1 - ra[0]]
        pair_cfg = cfg if pair["kind"] == "ov" else dataclasses.replace(cfg, hybrid=False)
        path, reason = _pair_path(fa, fb, H // hkv, d, D, pair_cfg, pair["kind"], group["momentum_reproject"])
        for f in (fa, fb):
            if f.rows is not None and pg is None:
                pg = f.rows.group
        if path == "gather":
            _warn_once(
                opt,
                pair["name"],
                f"CompositionalMuon under FSDP2/DTensor: {pair['name']!r}: {reason}; "
                "its update uses the gather fallback (full weights, gradients and momenta are "
                "all-gathered and the update computed on every rank). See docs/distributed.md.",
            )
        key = (
            path,
            pair["kind"],
            tuple(pa.shape),
            tuple(pb.shape),
            ra,
            rb,
            H,
            hkv,
            d,
            pa.dtype,
            pb.dtype,
            id(pa) == id(pb),
            pair["name"] if path == "gather" else None,
        )
        buckets.setdefault(key, []).append((pair, pa, pb, fa, fb, pair_cfg, D))
    plan = []
    for key, items in buckets.items():
        path = key[0]
        if path == "gather":
            plan.extend(_gather_item(opt, group, *it) for it in items)
            continue
        pair0, _, _, fa, fb, pair_cfg, D = items[0]
        d, H, hkv = pair0["head_dim"], pair0["num_heads"], pair0["num_kv_heads"]
        entries = []
        for pair, pa, pb, _, _, _, _ in items:
            ra, rb = tuple(pair["a"][1:]), tuple(pair["b"][1:])

            def views(ta, tb, ra=ra, rb=rb):
                return _local_heads(local(ta), ra, fa, d), _local_heads(local(tb), rb, fb, d)

            entries.append(
                dict(
                    name=pair["name"],
                    w=views(pa, pb),
                    g=views(pa.grad, pb.grad),
                    m=views(opt.state[pa]["momentum_buffer"], opt.state[pb]["momentum_buffer"]),
                )
            )
        A, B, ga, gb, ma, mb = [torch.stack([e[f][i] for e in entries]) for f in ("w", "g", "m") for i in (0, 1)]
        new_ma, new_mb, ua, ub = cm_momentum(
            A,
            B,
            ga,
            gb,
            ma,
            mb,
            beta=group["momentum"],
            nesterov=group["nesterov"],
            momentum_reproject=group["momentum_reproject"],
            cfg=cfg,
        )
        if path == "local":
            if A.size(1) and B.size(1):
                dA, dB = pair_update(A, B, ua, ub, eta, pair_cfg)
            else:
                dA, dB = torch.zeros_like(ua), torch.zeros_like(ub)
        else:
            dA, dB = sharded_pair_update(
                A, B, ua, ub, eta, pair_cfg, fa, fb, H, hkv, D, fa.rows.group, f"cm.{pair0['kind']}"
            )
        plan.append(
            dict(
                items=entries,
                names=[e["name"] for e in entries],
                A=A,
                B=B,
                dA=dA,
                dB=dB,
                new_ma=new_ma,
                new_mb=new_mb,
                kind=pair0["kind"],
                stats=False,
                path=path,
            )
        )
    _agree_finite(plan, pg, params[0].device)
    return plan


def _agree_finite(plan: list, pg, device) -> None:
    flags = [bool(torch.isfinite(it["dA"]).all() and torch.isfinite(it["dB"]).all()) for it in plan]
    ok = all(flags)
    if pg is not None:
        t = torch.tensor([1.0 if ok else 0.0], device=device)
        _all_reduce(t, pg, "finite", dist.ReduceOp.MIN)
        ok = bool(t.item() > 0)
    for it, f in zip(plan, flags):
        it["finite"] = f
    if not ok and all(flags) and plan:
        plan[0]["finite"] = False
        plan[0]["names"] = list(plan[0]["names"]) + ["(non-finite on another rank)"]


def _gather_item(opt, group, pair, pa, pb, fa, fb, pair_cfg, D) -> dict:
    """Fallback: gather the pair's full weights, gradients and momenta, compute the update as a
    single process would (on every rank), and write back only this rank's rows of the pair's heads."""
    d, H, hkv = pair["head_dim"], pair["num_heads"], pair["num_kv_heads"]
    ra, rb = tuple(pair["a"][1:]), tuple(pair["b"][1:])
    uniq = [pa] if pa is pb else [pa, pb]
    full = {}
    for p in uniq:
        m = opt.state[p]["momentum_buffer"]
        full[id(p)] = (
            gather_full(p, "cm.fallback").detach(),
            gather_full(p.grad, "cm.fallback"),
            gather_full(m, "cm.fallback"),
        )

    def views(i, p, ref, n):
        return head_view(full[id(p)][i], *ref, n, d).unsqueeze(0)

    A, B = views(0, pa, ra, H), views(0, pb, rb, hkv)
    ga, gb = views(1, pa, ra, H), views(1, pb, rb, hkv)
    ma, mb = views(2, pa, ra, H), views(2, pb, rb, hkv)
    new_ma, new_mb, ua, ub = cm_momentum(
        A,
        B,
        ga,
        gb,
        ma,
        mb,
        beta=group["momentum"],
        nesterov=group["nesterov"],
        momentum_reproject=group["momentum_reproject"],
        cfg=pair_cfg,
    )
    dA, dB = pair_update(A, B, ua, ub, float(group["lr"]), pair_cfg)

    def apply(decay: float) -> None:
        for p in uniq:
            w, _, m = full[id(p)]
            new_w, new_m = w.clone(), m.clone()
            mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
            for q, ref, n, dX, nm in ((pa, ra, H, dA, new_ma), (pb, rb, hkv, dB, new_mb)):
                if q is p:
                    apply_update(head_view(new_w, *ref, n, d), dX[0], decay)
                    head_view(new_m, *ref, n, d).copy_(nm[0])
                    head_view(mask, *ref, n, d).fill_(True)
            for dst, src in ((p, new_w), (opt.state[p]["momentum_buffer"], new_m)):
                loc = local(dst)
                loc.copy_(torch.where(_local_part(mask, dst), _local_part(src, dst).to(loc.dtype), loc))

    return dict(
        items=[],
        names=[pair["name"]],
        A=A,
        B=B,
        dA=dA,
        dB=dB,
        new_ma=new_ma,
        new_mb=new_mb,
        kind=pair["kind"],
        stats=False,
        path="gather",
        apply=apply,
    )


def spread_pair_updates(plan: list, eta: float, group) -> None:
    """DDP: fill ``dA``/``dB`` of every plan entry, each rank computing :func:`cm.pair_update` for a
    share of the layers (greedy over all buckets), then one ``all_gather``."""
    units, numels, costs = [], [], []
    for e, it in enumerate(plan):
        L, H, d, D = it["A"].shape
        hkv = it["B"].size(1)
        for l in range(L):
            units.append((e, l))
            numels.append(it["ua"][l].numel() + it["ub"][l].numel())
            costs.append(float(H + hkv) * d * d * D)

    def compute(idx):
        by_entry: dict = {}
        for i in idx:
            e, l = units[i]
            by_entry.setdefault(e, []).append(l)
        res = {}
        for e, ls in by_entry.items():
            it = plan[e]
            sel = torch.tensor(ls, device=it["A"].device)
            dA, dB = pair_update(
                it["A"].index_select(0, sel),
                it["B"].index_select(0, sel),
                it["ua"].index_select(0, sel),
                it["ub"].index_select(0, sel),
                eta,
                it["cfg"],
            )
            for j, l in enumerate(ls):
                res[(e, l)] = torch.cat([dA[j].reshape(-1), dB[j].reshape(-1)])
        return [res[units[i]] for i in idx]

    dtype = _common_dtype(t.dtype for it in plan for t in (it["ua"], it["ub"]))
    flat = spread(numels, costs, compute, dtype, plan[0]["A"].device, group, "cm.spread")
    for e, it in enumerate(plan):
        L = it["A"].size(0)
        na = it["ua"][0].numel()
        mine = [flat[i] for i, (ue, _) in enumerate(units) if ue == e]
        it["dA"] = torch.stack([f[:na].view(it["ua"].shape[1:]) for f in mine]).to(it["ua"].dtype)
        it["dB"] = torch.stack([f[na:].view(it["ub"].shape[1:]) for f in mine]).to(it["ub"].dtype)
        assert len(mine) == L
        for k in ("ua", "ub", "cfg"):
            it.pop(k)
