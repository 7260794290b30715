"""The training CLI: exact resume (also after SIGINT/SIGTERM at any point), atomic checkpoints,
no run lost by accident, settings changed on resume only when accepted, disk full."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import compositional_muon
from compositional_muon.train import main, parse_args, run
from compositional_muon.training import checkpoint as ckpt_mod
from compositional_muon.training import loop as loop_mod
from compositional_muon.training import run_state
from compositional_muon.training import train as train_mod
from compositional_muon.training.checkpoint import load_checkpoint, save_atomic
from compositional_muon.training.data import TokenDataset
from compositional_muon.training.schedule import lr_factor

TINY = [
    "--n-layer",
    "1",
    "--n-embd",
    "32",
    "--n-head",
    "2",
    "--block-size",
    "32",
    "--batch-size",
    "4",
    "--eval-interval",
    "4",
    "--eval-iters",
    "2",
    "--sample-tokens",
    "8",
    "--no-plot",
    "--quiet",
    "--warmup",
    "2",
]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "event" not in r]


def _weights(out):
    return load_checkpoint(os.path.join(out, "last.pt"))["model"]


def _assert_same_run(a, b):
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ma, mb = _metrics(a), _metrics(b)
    assert [r["step"] for r in mb] == [r["step"] for r in ma]
    assert [r["train_loss"] for r in ma] == [r["train_loss"] for r in mb]
    assert [r.get("val_loss") for r in ma] == [r.get("val_loss") for r in mb]
    assert [r["lr"] for r in ma] == [r["lr"] for r in mb]


@pytest.mark.parametrize(
    "extra",
    [
        ["--optimizer", "cm"],
        ["--optimizer", "newton-muon", "--opt", "refresh_interval=3"],
        ["--model", "loopformer", "--model-arg", "n_loops=3", "--optimizer", "cm-isotropic"],
        ["--model", "mor", "--optimizer", "normuon"],
    ],
)
def test_resume_reproduces_uninterrupted_run_bit_for_bit(tmp_path, extra):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    common = TINY + ["--steps", "10", "--ckpt-interval", "0"] + extra
    run(parse_args(common + ["--out", full]))
    run(parse_args(common + ["--out", split, "--stop-after", "5"]))
    assert load_checkpoint(os.path.join(split, "last.pt"))["step"] == 5
    run(parse_args(common + ["--out", split, "--resume", "auto"]))
    assert [r["step"] for r in _metrics(split)] == list(range(1, 11))
    _assert_same_run(full, split)


def test_training_lowers_the_loss_and_writes_outputs(tmp_path):
    out = str(tmp_path / "run")
    summary = run(parse_args(TINY + ["--steps", "40", "--out", out, "--eval-interval", "20", "--sample-tokens", "20"]))
    recs = _metrics(out)
    assert recs[-1]["val_loss"] < recs[0]["train_loss"] - 1.0  # from ~5.5 (ln 256) to well below
    assert isinstance(summary["sample"], str) and len(summary["sample"]) > 0
    assert summary["final_train_loss_steps"] == 20
    assert summary["final_train_loss"] == pytest.approx(sum(r["train_loss"] for r in recs[-20:]) / 20, rel=1e-12)
    assert os.path.exists(os.path.join(out, "summary.json"))


def test_loss_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "p")
    args = [a for a in TINY if a != "--no-plot"]
    summary = run(parse_args(args + ["--steps", "4", "--out", out]))
    assert summary["plot"] and open(summary["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_checkpoints_are_atomic(tmp_path):
    path = str(tmp_path / "c.pt")
    save_atomic({"model": {"w": torch.ones(2)}, "optimizer": {}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"model": Unpicklable(), "optimizer": {}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))  # old file intact
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary left behind


# ---- signals: a stop between two steps, at any moment -------------------------------------------

SIG_COMMON = TINY + ["--steps", "8", "--ckpt-interval", "2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sig") / "full")
    run(parse_args(SIG_COMMON + ["--out", out]))
    return out


def _kill_self(sig):
    os.kill(os.getpid(), sig)


class _Point:
    """Sends ``sig`` to this process once, at the ``at``-th call of the hooked place."""

    def __init__(self, sig, at):
        self.sig, self.at, self.calls = sig, at, 0

    def hit(self):
        self.calls += 1
        if self.calls == self.at:
            _kill_self(self.sig)


def _hook(monkeypatch, where, point):
    """Install ``point`` at ``where`` in the training step / loop."""
    if where in ("before_batch", "after_batch"):
        orig = TokenDataset.get_batch

        def get_batch(self, split, *a, **k):
            if split == "train" and where == "before_batch":
                point.hit()
            out = orig(self, split, *a, **k)
            if split == "train" and where == "after_batch":
                point.hit()
            return out

        monkeypatch.setattr(TokenDataset, "get_batch", get_batch)
    elif where in ("forward", "backward"):
        build = train_mod.build_model

        def build_model(*a, **k):
            model = build(*a, **k)
            if where == "forward":
                model.register_forward_pre_hook(lambda m, inp: point.hit())
            else:
                next(model.parameters()).register_hook(lambda g: point.hit())
            return model

        monkeypatch.setattr(train_mod, "build_model", build_model)
    elif where in ("inside_step", "after_step"):
        _hook_optimizer(monkeypatch, where, point)
    elif where == "evaluation":
        orig_eval = loop_mod.evaluate
        monkeypatch.setattr(loop_mod, "evaluate", lambda *a, **k: (point.hit(), orig_eval(*a, **k))[1])
    elif where == "checkpoint":
        orig_save = run_state.save_atomic
        monkeypatch.setattr(run_state, "save_atomic", lambda *a, **k: (point.hit(), orig_save(*a, **k))[1])


def _hook_optimizer(monkeypatch, where, point):
    """inside_step: at the second msign call of an optimizer step (the update half-applied);
    after_step: between the optimizer's and the scheduler's step."""
    build = train_mod.build_optimizer
    state = {"msign_calls": 0}

    def build_optimizer(*a, **k):
        opt = build(*a, **k)
        if where == "after_step":
            opt.register_step_post_hook(lambda o, args, kw: point.hit())
        else:
            opt.register_step_pre_hook(lambda o, args, kw: state.update(msign_calls=0))
        return opt

    monkeypatch.setattr(train_mod, "build_optimizer", build_optimizer)
    if where == "inside_step":
        from compositional_muon.msign import msign as real

        def msign(*a, **k):
            state["msign_calls"] += 1
            if state["msign_calls"] == 2:
                point.hit()
            return real(*a, **k)

        for mod in list(sys.modules.values()):
            if (
                getattr(mod, "__name__", "").startswith(compositional_muon.__name__)
                and getattr(mod, "msign", None) is real
            ):
                monkeypatch.setattr(mod, "msign", msign)


@pytest.mark.parametrize(
    "where, at, sig",
    [
        ("before_batch", 3, signal.SIGINT),
        ("after_batch", 3, signal.SIGTERM),
        ("forward", 3, signal.SIGINT),
        ("backward", 5, signal.SIGTERM),
        ("inside_step", 3, signal.SIGINT),
        ("after_step", 3, signal.SIGTERM),
        ("evaluation", 1, signal.SIGINT),
        ("checkpoint", 1, signal.SIGTERM),
    ],
)
def test_signal_at_any_point_then_resume_matches_uninterrupted_run(
    tmp_path, monkeypatch, uninterrupted, where, at, sig
):
    out = str(tmp_path / "run")
    point = _Point(sig, at)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # whatever started pytest set
    with monkeypatch.context() as m:
        _hook(m, where, point)
        summary = run(parse_args(SIG_COMMON + ["--out", out]))
    assert point.calls >= at, "the signal was never sent"
    assert summary["interrupted"] and summary["signal"] == signal.Signals(sig).name
    stopped = load_checkpoint(os.path.join(out, "last.pt"))["step"]
    assert 1 <= stopped < 8 and stopped == len(_metrics(out))
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # handlers restored
    run(parse_args(SIG_COMMON + ["--out", out, "--resume", "auto"]))
    _assert_same_run(uninterrupted, out)


def test_ctrl_c_in_a_subprocess_saves_the_last_step_and_exits_130(tmp_path):
    out = str(tmp_path / "int")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "compositional_muon.train", *TINY, "--steps", "100000", "--ckpt-interval", "0"]
    proc = subprocess.Popen(cmd + ["--out", out], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 600  # generous: the machine may be loaded
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err.decode()
    assert "Traceback" not in err.decode()
    ck = load_checkpoint(os.path.join(out, "last.pt"))
    assert ck["step"] >= 3 and ck["step"] == len(_metrics(out))


# ---- no run lost, settings changes -------------------------------------------------------------


def test_new_run_refuses_an_existing_one_and_overwrite_replaces_it(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(TINY + ["--steps", "3", "--out", out]) == 0
    before = open(os.path.join(out, "last.pt"), "rb").read()
    capsys.readouterr()
    assert main(TINY + ["--steps", "2", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume auto" in err and "--overwrite" in err and "\n" not in err
    assert open(os.path.join(out, "last.pt"), "rb").read() == before
    assert main(TINY + ["--steps", "2", "--out", out, "--overwrite"]) == 0
    assert [r["step"] for r in _metrics(out)] == [1, 2]
    assert load_checkpoint(os.path.join(out, "last.pt"))["step"] == 2
    # --resume auto on a finished run: nothing to train, the result again, exit 0
    assert main(TINY + ["--steps", "2", "--out", out, "--resume", "auto"]) == 0
    assert [r["step"] for r in _metrics(out)] == [1, 2]


def test_resume_with_changed_settings_is_refused_unless_accepted(tmp_path, capsys):
    out = str(tmp_path / "r")
    common = TINY + ["--optimizer", "muon", "--ckpt-interval", "0"]
    assert main(common + ["--steps", "6", "--stop-after", "3", "--out", out]) == 0
    before = open(os.path.join(out, "last.pt"), "rb").read()
    capsys.readouterr()
    changed = common + ["--steps", "8", "--lr", "0.01", "--out", out, "--resume", "auto"]
    assert main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert "lr 0.02 -> 0.01" in err and "steps 6 -> 8" in err and "--accept-changes" in err and "\n" not in err
    assert main(changed + ["--accept-changes", "lr"]) == 2  # steps not accepted
    err = capsys.readouterr().err
    assert "steps 6 -> 8" in err and "lr 0.02" not in err
    assert open(os.path.join(out, "last.pt"), "rb").read() == before
    assert main(changed + ["--accept-changes", "lr,steps"]) == 0
    recs = _metrics(out)
    assert [r["step"] for r in recs] == list(range(1, 9))
    for r in recs[3:]:  # the new peak lr and the new schedule length from step 4 on
        assert r["lr"] == pytest.approx(0.01 * lr_factor(r["step"] - 1, 8, 2, "cosine", 0.1), rel=1e-12)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        events = [r for r in map(json.loads, f) if "event" in r]
    assert events == [dict(step=3, event="config_change", changes=dict(lr=[0.02, 0.01], steps=[6, 8]))]
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["config_changes"] == [dict(step=3, changes=dict(lr=[0.02, 0.01], steps=[6, 8]))]
    assert load_checkpoint(os.path.join(out, "last.pt"))["config_changes"][0]["changes"]["lr"] == [0.02, 0.01]


def test_disk_full_while_checkpointing_keeps_the_old_checkpoint(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "r")
    common = TINY + ["--steps", "6", "--ckpt-interval", "2", "--out", out]
    assert main(common + ["--stop-after", "2"]) == 0
    before = open(os.path.join(out, "last.pt"), "rb").read()
    capsys.readouterr()

    def full_disk(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    assert main(common + ["--resume", "auto"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err
    assert "full" in errors[0] and out in errors[0] and "intact" in errors[0], errors
    assert open(os.path.join(out, "last.pt"), "rb").read() == before
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_torchrun_fsdp2_split_and_resume_matches_single_process(tmp_path, monkeypatch):
    """`torchrun --nproc_per_node=2 -m compositional_muon.train --dist fsdp2`, stopped and resumed
    from its DCP checkpoint, follows the single-process run's losses. The 1e-4 tolerance is a
    float32 one (sharded and single-process reductions round differently), so float32 msign is
    pinned: in bf16 the two paths differ by ~1.4e-4."""
    monkeypatch.setenv("COMPOSITIONAL_MUON_MSIGN_DTYPE", "float32")  # inherited by torchrun's workers
    common = TINY + ["--steps", "6", "--ckpt-interval", "0", "--device", "cpu", "--threads", "1"]
    single = str(tmp_path / "single")
    run(parse_args(common + ["--out", single]))
    out = str(tmp_path / "fsdp")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    torchrun += ["-m", "compositional_muon.train", "--dist", "fsdp2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for extra in (["--stop-after", "3"], ["--resume", "auto"]):
        r = subprocess.run(
            torchrun + common + ["--out", out] + extra, env=env, capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isfile(os.path.join(out, "last_dcp", "train_state.pt"))
    assert not os.path.exists(os.path.join(out, "last_dcp.tmp"))
    # resuming with another layout (DDP instead of FSDP2) is refused with a clear error
    ddp = torchrun[:-1] + ["ddp"]
    r = subprocess.run(
        ddp + common + ["--out", out, "--resume", "auto"], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode != 0 and "written by --dist fsdp2" in r.stderr, r.stderr[-2000:]
    assert "exitcode: 2" in r.stderr  # the workers' one-line error; torchrun's own traceback follows
    assert not re.search(r'File ".*compositional_muon', r.stderr), r.stderr[-2000:]
    a, b = _metrics(single), _metrics(out)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
