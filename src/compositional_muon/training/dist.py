"""Training-side distributed helpers: process groups, DDP / FSDP2 wrapping, and
``torch.distributed.checkpoint`` save/load with a layout record (see docs/distributed.md).

The optimizers' own distributed paths live in the library (:mod:`compositional_muon.distributed`);
this module is only for training scripts.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "setup_distributed",
    "cleanup_distributed",
    "leave_process",
    "wrap_model",
    "MeshSpec",
    "tp_plan",
    "unwrap_model",
    "save_checkpoint",
    "load_checkpoint",
    "all_reduce_mean",
    "any_rank",
    "barrier",
]


@dataclass(frozen=True)
class DistInfo:
    """What :func:`setup_distributed` found: ``rank``, ``world_size``, ``local_rank``, ``device``,
    ``backend`` (None when running as a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(backend: str | None = None, *, timeout_s: float = 1800.0) -> DistInfo:
    """Initialize ``torch.distributed`` from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and pick the device.

    ``backend``: ``"nccl"`` on CUDA, ``"gloo"`` on CPU (the default picks by availability). Without
    torchrun's variables (or with ``WORLD_SIZE=1``) nothing is initialized and a single-process
    :class:`DistInfo` is returned. Call once at start-up; pair with :func:`cleanup_distributed`."""
    import datetime

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world <= 1:
        return DistInfo(0, 1, 0, device, None)
    backend = backend or ("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if cuda else None,
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


_RAN_GROUP = False  # set when this process destroyed a process group (see leave_process)


def cleanup_distributed() -> None:
    """Destroy the default process group if this process initialized one."""
    global _RAN_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _RAN_GROUP = True


def leave_process(code: int) -> int:
    """End a CLI process with ``code`` (returned as is when no process group ran). After a process
    group, end by ``os._exit`` once stdio and logging are flushed (the run's files are closed by
    then): gloo's worker threads outlive ``destroy_process_group`` while DTensor meshes refer to the
    group, and one that frees a finished collective's Python-made tensors during interpreter
    finalization aborts a run that finished correctly (``std::terminate``)."""
    if not _RAN_GROUP:
        return code
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _blocks(model: torch.nn.Module) -> list:
    """The transformer blocks FSDP2 wraps one by one: the items of the model's ``nn.ModuleList``s."""
    out = []
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList):
            out.extend(c for c in m if any(p.requires_grad for p in c.parameters()))
    return out


# Linear layers tensor parallelism splits, by the last part of their name: column-parallel
# (output rows: q/k/v heads, MLP-up) and row-parallel (input columns: o heads, MLP-down).
COLWISE = ("q_proj", "k_proj", "v_proj", "up_proj", "gate_proj", "fc", "c_fc", "w1", "w3", "wq", "wk", "wv")
ROWWISE = ("o_proj", "down_proj", "c_proj", "down", "w2", "wo")


@dataclass(frozen=True)
class MeshSpec:
    """The device mesh of a wrapped model: ``tp`` tensor-parallel ranks inside each data-parallel
    group, ``hsdp`` ranks per FSDP shard group (replicated across ``world / hsdp`` groups; 0: off).
    ``dp_rank``/``dp_world``: which slice of a global batch this rank reads, of how many."""

    world: int
    tp: int = 1
    hsdp: int = 0

    @property
    def dp_world(self) -> int:
        return self.world // self.tp

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp  # init_device_mesh is row-major: rank = dp * tp + tp_rank

    def check(self) -> None:
        if self.tp < 1 or self.world % self.tp:
            raise ValueError(f"--tp {self.tp} must be >= 1 and divide the number of processes {self.world}")
        dp = self.dp_world
        if self.hsdp and (self.hsdp < 1 or dp % self.hsdp or self.hsdp == dp):
            raise ValueError(
                f"--hsdp {self.hsdp} (ranks per shard group) must divide the number of data-parallel ranks {dp} "
                "and be smaller than it (it equals plain FSDP otherwise)"
            )


def tp_plan(block: torch.nn.Module) -> dict:
    """``parallelize_module`` plan for one block: ColwiseParallel for the ``nn.Linear``s named in
    :data:`COLWISE`, RowwiseParallel for those in :data:`ROWWISE` (matched on the last name part)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict = {}
    for name, m in block.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, torch.nn.Linear) and leaf in COLWISE:
            plan[name] = ColwiseParallel()
        elif isinstance(m, torch.nn.Linear) and leaf in ROWWISE:
            plan[name] = RowwiseParallel()
    return plan


def wrap_model(
    model: torch.nn.Module, mode: str, *, device=None, blocks=None, tp: int = 1, hsdp: int = 0, **kwargs
) -> torch.nn.Module:
    """Wrap ``model`` for data parallelism; build the optimizer on the returned model *afterwards*.

    ``mode``: ``"none"`` (returned as is), ``"ddp"`` (``DistributedDataParallel``; ``kwargs`` go to
    it) or ``"fsdp2"`` (``fully_shard`` on every block, default: the items of the model's
    ``nn.ModuleList``s, then on the root; parameters become DTensors sharded on dim 0 over a 1-D
    mesh of all ranks; ``kwargs`` go to ``fully_shard``, e.g. ``mp_policy``). FSDP2 shards
    ``q_proj``/``k_proj``/``v_proj`` rows in ``ceil(rows / world)`` chunks: CM's QK update is free
    of communication when those chunks hold whole heads (``H`` and ``Hkv`` divisible by the world
    size, see ``docs/distributed.md``).

    ``tp > 1`` (``"fsdp2"`` only): a ``(world / tp) x tp`` mesh ``("dp", "tp")``; every block is
    first split by :func:`tp_plan` over ``"tp"`` (heads across the TP ranks), then ``fully_shard``
    over ``"dp"`` (skipped when ``tp`` is the world: pure TP). ``hsdp = n > 0`` (``"fsdp2"``
    only): ``fully_shard`` over a ``(world / n) x n`` replicate x shard mesh; with ``tp > 1`` a 3-D
    ``(world / (n tp)) x n x tp`` mesh ``("replicate", "shard", "tp")``, TP over ``"tp"`` and HSDP
    over the other two. The data-parallel slice each rank reads: :class:`MeshSpec`."""
    if mode in (None, "none", "single"):
        return model
    if not dist.is_initialized():
        raise RuntimeError(f"wrap_model(mode={mode!r}) needs torch.distributed initialized (setup_distributed())")
    spec = MeshSpec(dist.get_world_size(), tp, hsdp)
    spec.check()
    if mode == "ddp":
        if tp > 1 or hsdp:
            raise ValueError("--tp and --hsdp need --dist fsdp2")
        from torch.nn.parallel import DistributedDataParallel

        dev = device if device is not None else next(model.parameters()).device
        ids = [dev.index] if getattr(dev, "type", "cpu") == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, **kwargs)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        kind = torch.device(device if device is not None else next(model.parameters()).device).type
        todo = _blocks(model) if blocks is None else blocks
        fsdp_mesh = _fsdp2_mesh(kind, spec, todo)
        if fsdp_mesh is None:  # pure TP
            return model
        for b in todo:
            fully_shard(b, mesh=fsdp_mesh, **kwargs)
        fully_shard(model, mesh=fsdp_mesh, **kwargs)
        return model
    raise ValueError(f"unknown distributed mode {mode!r}; expected 'none', 'ddp' or 'fsdp2'")


def _fsdp2_mesh(kind: str, spec: MeshSpec, todo: list) -> Any:
    """The mesh ``fully_shard`` runs on (None under pure TP), after splitting every block of
    ``todo`` by :func:`tp_plan` when ``spec.tp > 1``: 1-D, replicate x shard (HSDP), dp x tp or
    replicate x shard x tp (the last dim tp)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    tp, hsdp = spec.tp, spec.hsdp
    if tp == 1:
        if hsdp:
            return init_device_mesh(kind, (spec.world // hsdp, hsdp), mesh_dim_names=("replicate", "shard"))
        return init_device_mesh(kind, (spec.world,))
    if hsdp:  # 3-D: (replicate, shard, tp)
        mesh = init_device_mesh(kind, (spec.dp_world // hsdp, hsdp, tp), mesh_dim_names=("replicate", "shard", "tp"))
        fsdp_mesh = mesh["replicate", "shard"]
    else:
        mesh = init_device_mesh(kind, (spec.dp_world, tp), mesh_dim_names=("dp", "tp"))
        fsdp_mesh = mesh["dp"]
    for b in todo:
        plan = tp_plan(b)
        if not plan:
            raise ValueError(f"--tp {tp}: block {type(b).__name__} has no nn.Linear named in COLWISE/ROWWISE")
        parallelize_module(b, mesh["tp"], plan)
    return None if spec.dp_world == 1 else fsdp_mesh


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are returned as they are)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def all_reduce_mean(x: float | torch.Tensor) -> float:
    """Mean of a scalar over all ranks (for logging); the value itself without ``torch.distributed``."""
    t = torch.as_tensor(x, dtype=torch.float64).detach().reshape(1).cpu()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return float(t.item())


def any_rank(flag: bool) -> bool:
    """``flag`` or-ed over all ranks (the flag itself without ``torch.distributed``)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    """``dist.barrier()`` when a process group is initialized."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _layout(model, optimizer) -> dict:
    """What must match between a checkpoint and the run loading it."""
    inner = unwrap_model(model)
    groups = []
    for g in optimizer.param_groups:
        groups.append(
            dict(
                kind=g.get("kind", "muon" if g.get("use_muon", True) else "adamw"),
                n_params=len(g["params"]),
                cm_pairs=g.get("cm_pairs"),
            )
        )
    return dict(
        optimizer=type(optimizer).__name__,
        params={n: list(p.shape) for n, p in inner.named_parameters()},
        groups=groups,
    )


def _layout_diff(saved: dict, now: dict) -> list:
    out = []
    if saved.get("optimizer") != now["optimizer"]:
        out.append(f"optimizer {saved.get('optimizer')!r} in the checkpoint, {now['optimizer']!r} here")
    sp, np_ = saved.get("params", {}), now["params"]
    missing = sorted(set(sp) - set(np_))
    extra = sorted(set(np_) - set(sp))
    if missing:
        out.append(
            f"parameters in the checkpoint but not in the model: {missing[:6]}" + (" ..." if len(missing) > 6 else "")
        )
    if extra:
        out.append(
            f"parameters in the model but not in the checkpoint: {extra[:6]}" + (" ..." if len(extra) > 6 else "")
        )
    for n in sorted(set(sp) & set(np_)):
        if list(sp[n]) != list(np_[n]):
            out.append(f"parameter {n!r} has shape {tuple(sp[n])} in the checkpoint, {tuple(np_[n])} here")
    sg, ng = saved.get("groups", []), now["groups"]
    if len(sg) != len(ng):
        out.append(f"the checkpoint has {len(sg)} optimizer param groups, this optimizer {len(ng)}")
    else:
        for i, (a, b) in enumerate(zip(sg, ng)):
            if a.get("kind") != b["kind"] or a.get("n_params") != b["n_params"]:
                out.append(
                    f"param group {i}: {a.get('kind')} with {a.get('n_params')} params in the checkpoint, "
                    f"{b['kind']} with {b['n_params']} here"
                )
            elif json.dumps(a.get("cm_pairs")) != json.dumps(b["cm_pairs"]):
                out.append(f"param group {i}: the attention layout (CM head slices) differs")
    return out


_META = "cm_layout.json"


@contextlib.contextmanager
def _single_process_quiet():
    """Silence DCP's "assuming the intent is to save/load in a single process" warning (intended)."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(path: str, model, optimizer, *, extra: dict | None = None) -> None:
    """Save model and optimizer state with ``torch.distributed.checkpoint`` (DCP) into the folder
    ``path``: every rank writes its own shards (FSDP2) or the replicated tensors once (DDP / single
    process). ``extra`` (JSON-serializable: step, config, ...) and the model/optimizer layout go to
    ``path/cm_layout.json``, written by rank 0. Call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        os.makedirs(path, exist_ok=True)
    with _single_process_quiet():
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path, no_dist=not dist.is_initialized())
    if rank0:
        meta = dict(
            format="compositional_muon.dcp/1",
            world_size=dist.get_world_size() if dist.is_initialized() else 1,
            layout=_layout(model, optimizer),
            extra=extra or {},
        )
        tmp = os.path.join(path, _META + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, default=str)
        os.replace(tmp, os.path.join(path, _META))
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Load a :func:`save_checkpoint` folder into ``model`` and ``optimizer`` (built as for saving,
    wrapped the same way) and return its ``extra`` dict. Call on every rank.

    Raises :class:`~compositional_muon.training.checkpoint.CheckpointError` naming the differences when the
    checkpoint's parameter names/shapes, optimizer class, param groups or CM head layout do not
    match this run (checked before anything is loaded)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from .checkpoint import CheckpointError

    meta_path = os.path.join(path, _META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path!r} is not a distributed checkpoint of this library (no {_META})")
    with open(meta_path) as f:
        meta = json.load(f)
    diff = _layout_diff(meta.get("layout", {}), json.loads(json.dumps(_layout(model, optimizer), default=str)))
    if diff:
        raise CheckpointError(f"checkpoint {path!r} does not fit this model/optimizer:\n  - " + "\n  - ".join(diff))
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return meta.get("extra", {})
