"""The training CLI: exact resume, atomic checkpoints, Ctrl-C, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from compositional_muon.train import main, parse_args, run
from compositional_muon.training.checkpoint import load_checkpoint, save_atomic

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
        return [json.loads(line) for line in f]


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
    a = load_checkpoint(os.path.join(full, "last.pt"))
    b = load_checkpoint(os.path.join(split, "last.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ma, mb = _metrics(full), _metrics(split)
    assert [r["step"] for r in mb] == list(range(1, 11))
    assert [r["train_loss"] for r in ma] == [r["train_loss"] for r in mb]
    assert [r.get("val_loss") for r in ma] == [r.get("val_loss") for r in mb]


def test_training_lowers_the_loss_and_writes_outputs(tmp_path):
    out = str(tmp_path / "run")
    summary = run(parse_args(TINY + ["--steps", "40", "--out", out, "--eval-interval", "20", "--sample-tokens", "20"]))
    recs = _metrics(out)
    assert recs[-1]["val_loss"] < recs[0]["train_loss"] - 1.0  # from ~5.5 (ln 256) to well below
    assert isinstance(summary["sample"], str) and len(summary["sample"]) > 0
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


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(TINY + ["--steps", "2", "--out", out]) == 0
    # bad data path
    assert main(TINY + ["--steps", "2", "--out", out, "--data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    # bad checkpoint path, a folder, a corrupt file
    assert main(TINY + ["--steps", "2", "--out", out, "--resume", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(TINY + ["--steps", "2", "--out", out, "--resume", out]) == 2
    assert "is a folder" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(TINY + ["--steps", "2", "--out", out, "--resume", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err
    # optimizer / model mismatch
    ck = os.path.join(out, "last.pt")
    assert main(TINY + ["--steps", "4", "--out", out, "--resume", ck, "--optimizer", "muon"]) == 2
    assert "optimizer/model mismatch" in capsys.readouterr().err
    assert main(["--n-layer", "2"] + TINY[2:] + ["--steps", "4", "--out", out, "--resume", ck]) == 2
    assert "model n_layer=1 in the checkpoint vs 2 now" in capsys.readouterr().err
    # bad values
    assert main(TINY + ["--steps", "0", "--out", out]) == 2
    assert main(TINY + ["--out", out, "--method", "joint", "--optimizer", "muon"]) == 2
    assert "only apply to --optimizer cm" in capsys.readouterr().err
    assert main(TINY + ["--out", out, "--opt", "oops"]) == 2
    assert main(TINY + ["--out", out, "--model-arg", "n_layerz=3"]) == 2
    assert "unknown" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(TINY + ["--out", out, "--optimizer", "sgd"])  # argparse rejects unknown choices


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    out = str(tmp_path / "int")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "compositional_muon.train",
            *TINY,
            "--steps",
            "100000",
            "--ckpt-interval",
            "0",
            "--out",
            out,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    ck = load_checkpoint(os.path.join(out, "last.pt"))
    assert ck["step"] >= 3 and ck["step"] == len(_metrics(out))


def test_torchrun_fsdp2_split_and_resume_matches_single_process(tmp_path, monkeypatch):
    """`torchrun --nproc_per_node=2 -m compositional_muon.train --dist fsdp2`, stopped and resumed
    from its DCP checkpoint, follows the single-process run's losses."""
    # two code paths compared at rel 1e-4: pin the msign precision (bf16 rounding differs by path)
    monkeypatch.setenv("COMPOSITIONAL_MUON_MSIGN_DTYPE", "float32")
    common = TINY + ["--steps", "6", "--ckpt-interval", "0", "--device", "cpu", "--threads", "1"]
    single = str(tmp_path / "single")
    run(parse_args(common + ["--out", single]))
    out = str(tmp_path / "fsdp")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "compositional_muon.train",
        "--dist",
        "fsdp2",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for extra in (["--stop-after", "3"], ["--resume", "auto"]):
        r = subprocess.run(
            torchrun + common + ["--out", out] + extra, env=env, capture_output=True, text=True, timeout=240
        )
        assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isfile(os.path.join(out, "last_dcp", "train_state.pt"))
    # resuming with another layout (DDP instead of FSDP2) is refused with a clear error
    ddp = torchrun[:-1] + ["ddp"]
    r = subprocess.run(
        ddp + common + ["--out", out, "--resume", "auto"], env=env, capture_output=True, text=True, timeout=240
    )
    assert r.returncode != 0 and "written by --dist fsdp2 with 2 processes" in r.stderr, r.stderr[-2000:]
    # --dist without torchrun (one process) is refused up front
    with pytest.raises(ValueError, match="at least 2 processes"):
        run(parse_args(common + ["--out", str(tmp_path / "one"), "--dist", "ddp"]))
    a, b = _metrics(single), _metrics(out)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
