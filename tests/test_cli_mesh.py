"""The training CLI's mesh flags: ``--dist fsdp2 --tp N`` (tensor parallel inside data-parallel
groups) and ``--hsdp N``; a run stopped under TP resumes under plain FSDP2 (DCP reshards)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from compositional_muon.train import parse_args, run
from compositional_muon.training.dist import MeshSpec, tp_plan
from compositional_muon.training.models.gpt import GPT, GPTConfig

TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "4"]
TINY += ["--eval-interval", "4", "--eval-iters", "2", "--sample-tokens", "8", "--no-plot", "--quiet", "--warmup", "2"]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "train_loss" in r]


def test_mesh_spec_checks_and_data_slices():
    assert MeshSpec(4, tp=2).dp_world == 2 and [MeshSpec(4, tp=2).dp_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert MeshSpec(4, hsdp=2).dp_world == 4
    with pytest.raises(ValueError, match="--tp 3 must be >= 1 and divide"):
        MeshSpec(4, tp=3).check()
    with pytest.raises(ValueError, match="--hsdp 4 .* smaller"):
        MeshSpec(4, hsdp=4).check()
    MeshSpec(8, tp=2, hsdp=2).check()  # 3-D: 2 replicas x 2 shards x 2 tp
    with pytest.raises(ValueError, match="--hsdp 2 .* data-parallel ranks 2"):
        MeshSpec(4, tp=2, hsdp=2).check()


def test_tp_plan_of_the_gpt_block():
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=8))
    plan = {k: type(v).__name__ for k, v in tp_plan(model.blocks[0]).items()}
    assert plan == {
        "attn.q_proj": "ColwiseParallel",
        "attn.k_proj": "ColwiseParallel",
        "attn.v_proj": "ColwiseParallel",
        "attn.o_proj": "RowwiseParallel",
        "mlp.up_proj": "ColwiseParallel",
        "mlp.down_proj": "RowwiseParallel",
    }


def test_tp_flag_without_dist_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--tp and --hsdp need --dist fsdp2"):
        run(parse_args(TINY + ["--out", str(tmp_path / "x"), "--tp", "2", "--device", "cpu"]))


@pytest.mark.slow
def test_torchrun_tp_then_resume_under_fsdp2_matches_single_process(tmp_path, monkeypatch):
    """``--dist fsdp2 --tp 2`` on 2 processes (heads split across the TP ranks) for 2 steps, then
    resumed as plain ``--dist fsdp2``: the losses follow the single-process run."""
    monkeypatch.setenv("COMPOSITIONAL_MUON_MSIGN_DTYPE", "float32")
    common = TINY + ["--steps", "4", "--ckpt-interval", "0", "--device", "cpu", "--threads", "1"]
    single = str(tmp_path / "single")
    run(parse_args(common + ["--out", single]))
    out = str(tmp_path / "tp")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    torchrun += ["-m", "compositional_muon.train", "--dist", "fsdp2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for extra in (["--tp", "2", "--stop-after", "2"], ["--resume", "auto"]):
        r = subprocess.run(
            torchrun + common + ["--out", out] + extra, env=env, capture_output=True, text=True, timeout=240
        )
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(single), _losses(out)
    assert [r["step"] for r in b] == list(range(1, 5))
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)


def _dcp_state(path):
    """Every tensor of a DCP checkpoint folder (model and optimizer), read in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = os.path.join(os.path.dirname(path), os.path.basename(path) + ".pt")
    dcp_to_torch_save(path, flat)
    import torch

    out = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", torch.load(flat, weights_only=False))
    return out


@pytest.mark.slow
def test_torchrun_ddp_resumes_at_another_world_size(tmp_path, monkeypatch):
    """``--dist ddp`` on 2 processes stopped after 2 steps, resumed on 1 process and on 4
    (DDP keeps the full replicated state; the global batch is split over the ranks): the losses
    and the final model and optimizer state equal the uninterrupted 2-process run."""
    monkeypatch.setenv("COMPOSITIONAL_MUON_MSIGN_DTYPE", "float32")
    common = TINY + ["--steps", "4", "--ckpt-interval", "0", "--device", "cpu", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(n, out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
        cmd += ["-m", "compositional_muon.train", "--dist", "ddp", *common, "--out", out, *extra]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]

    ref = str(tmp_path / "ref")
    torchrun(2, ref)
    stopped = str(tmp_path / "stopped")
    torchrun(2, stopped, "--stop-after", "2")
    want_losses = [r["train_loss"] for r in _losses(ref)]
    want = _dcp_state(os.path.join(ref, "last_dcp"))
    assert any(".momentum_buffer" in k for k in want), sorted(want)[:10]
    for n in (1, 4):
        out = str(tmp_path / f"resumed{n}")
        shutil.copytree(stopped, out)
        torchrun(n, out, "--resume", "auto")
        got_losses = _losses(out)
        assert [r["step"] for r in got_losses] == list(range(1, 5)), n
        assert [r["train_loss"] for r in got_losses] == pytest.approx(want_losses, rel=1e-5), n
        got = _dcp_state(os.path.join(out, "last_dcp"))
        assert sorted(got) == sorted(want), n
        for k, v in want.items():
            if v.is_floating_point():
                err = (got[k].double() - v.double()).norm() / max(v.double().norm().item(), 1e-30)
                assert err < 1e-5, (n, k, float(err))
            else:
                assert got[k].equal(v), (n, k)


def test_leave_process_after_a_process_group_exits_with_the_code_and_flushed_output():
    """A process that ran a process group ends by ``os._exit`` (no interpreter finalization, where
    gloo's worker threads can abort it) with the CLI's exit code and its output flushed; without
    one, ``leave_process`` hands the code back."""
    from compositional_muon.training import dist as D

    assert D.leave_process(3) == 3
    code = (
        "import sys; from compositional_muon.training import dist as D; D._RAN_GROUP = True; "
        "print('out', end=''); print('err', end='', file=sys.stderr); "
        "import atexit; atexit.register(lambda: print('finalized'));"
        "D.leave_process(3); print('not reached')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out", "err")
