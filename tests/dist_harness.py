"""The gloo harness of the distributed tests (test_distributed, test_per_head_distributed,
test_tensor_parallel): spawn ``world`` CPU ranks, run scenario functions of a test module on every
rank, return rank 0's results.

A scenario is a function ``fn(rank, world, *args)`` of the test module returning something JSON
can hold; a job is ``(key, "fn", args)``. Every rank runs the jobs in order (a barrier after each);
an exception is recorded (``ok=False`` with the traceback) so that the test asserting on that key
fails with it, and the other jobs still run. A forkserver (a fresh, fork-safe process) imports
torch, the library and the test module once; the ranks are forked from it.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import tempfile
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Job = tuple[str, str, tuple]

PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "compositional_muon"]


def worker(rank: int, world: int, init_file: str, module: str, jobs: list[Job], outdir: str) -> None:
    """One rank: a gloo process group over a file store, the jobs of ``module``, ``rank<r>.json``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    mod = importlib.import_module(module)
    results: dict[str, Any] = {}
    try:
        for key, fn, args in jobs:
            t0 = time.time()
            try:
                results[key] = dict(ok=True, result=getattr(mod, fn)(rank, world, *args))
            except Exception:  # recorded; the test asserting on it fails with the traceback
                results[key] = dict(ok=False, error=traceback.format_exc())
            results[key]["seconds"] = time.time() - t0
            dist.barrier()
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f, default=str)
        dist.destroy_process_group()


def run_world(world: int, jobs: list[Job], module: str, prefix: str = "cm-dist") -> dict[str, Any]:
    """Run ``jobs`` (scenarios of the test module ``module``) on ``world`` gloo ranks; rank 0's
    results by key, plus ``_seconds`` (wall time of the whole run)."""
    outdir = tempfile.mkdtemp(prefix=f"{prefix}{world}-")
    t0 = time.time()
    mp.set_forkserver_preload(PRELOAD + [module])
    mp.start_processes(
        worker,
        args=(world, os.path.join(outdir, "store"), module, jobs, outdir),
        nprocs=world,
        start_method="forkserver",
    )
    with open(os.path.join(outdir, "rank0.json")) as f:
        res = json.load(f)
    res["_seconds"] = time.time() - t0
    return res


def result(res: dict[str, Any], key: str) -> Any:
    """The result of job ``key``; fails the calling test with the rank's traceback if it raised."""
    r = res[key]
    assert r["ok"], r["error"]
    return r["result"]
