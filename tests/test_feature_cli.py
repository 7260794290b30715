"""CLI: --optimizer muon-per-head, --model moe-gpt, --qk-clip-tau, --adjust-lr-fn."""

import json
import os

import pytest
import torch

from compositional_muon.train import main, parse_args, run
from compositional_muon.training.args import optimizer_config
from compositional_muon.training.cli_checks import check_options, valid_option_keys
from compositional_muon.training.errors import UsageError

TINY = [
    "--n-layer",
    "1",
    "--n-embd",
    "32",
    "--n-head",
    "4",
    "--n-kv-head",
    "2",
    "--block-size",
    "32",
    "--batch-size",
    "4",
    "--eval-interval",
    "3",
    "--eval-iters",
    "1",
    "--sample-tokens",
    "4",
    "--no-plot",
    "--quiet",
    "--warmup",
    "1",
    "--steps",
    "3",
]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_moe_per_head_qk_clip_and_rms_matching_from_the_cli(tmp_path, one_thread):
    out = str(tmp_path / "run")
    args = TINY + [
        "--model",
        "moe-gpt",
        "--model-arg",
        "n_experts=3",
        "--optimizer",
        "muon-per-head",
        "--adjust-lr-fn",
        "match_rms_adamw",
        "--lr",
        "3e-3",
        "--qk-clip-tau",
        "0.05",
        "--out",
        out,
    ]
    run(parse_args(args))
    recs = _metrics(out)
    assert all(r["qk_max_logit"] > 0 for r in recs)
    assert "aux" in recs[-1]["parts"] and "val_loss" in recs[-1]


def test_cli_refusals(tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(TINY + ["--qk-clip-tau", "-1", "--out", out]) == 2
    assert "--qk-clip-tau" in capsys.readouterr().err
    assert main(TINY + ["--optimizer", "normuon", "--adjust-lr-fn", "match_rms_adamw", "--out", out]) == 2
    assert "--adjust-lr-fn" in capsys.readouterr().err


def test_qk_clip_resume_reproduces_the_uninterrupted_run(tmp_path):
    """The clip runs inside the atomic step: a run split by --stop-after and resumed equals one run."""
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    common = TINY + ["--steps", "6", "--ckpt-interval", "0", "--optimizer", "muon-per-head", "--qk-clip-tau", "0.05"]
    run(parse_args(common + ["--out", full]))
    run(parse_args(common + ["--out", split, "--stop-after", "3"]))
    run(parse_args(common + ["--out", split, "--resume", "auto"]))
    wa = torch.load(os.path.join(full, "last.pt"), weights_only=False)["model"]
    wb = torch.load(os.path.join(split, "last.pt"), weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma = [r for r in _metrics(full) if "event" not in r]
    mb = [r for r in _metrics(split) if "event" not in r]
    assert [r["step"] for r in mb] == list(range(1, 7))
    assert [r["qk_max_logit"] for r in ma] == [r["qk_max_logit"] for r in mb]
    assert [r["train_loss"] for r in ma] == [r["train_loss"] for r in mb]


def test_qk_clip_tau_change_on_resume_needs_accept_changes(tmp_path, capsys):
    out = str(tmp_path / "r")
    common = TINY + ["--steps", "4", "--optimizer", "muon-per-head", "--out", out]
    run(parse_args(common + ["--qk-clip-tau", "0.05", "--stop-after", "2"]))
    assert main(common + ["--qk-clip-tau", "0.1", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "qk_clip_tau 0.05 -> 0.1" in err and "--accept-changes" in err


def test_per_head_option_keys_and_muon_lr():
    valid = valid_option_keys("muon-per-head")
    assert {"momentum", "nesterov", "ns_steps", "adjust_lr_fn", "backend", "msign_dtype", "muon_lr"} <= valid
    assert "lam" not in valid and "lr" not in valid
    with pytest.raises(UsageError, match="--opt lam: not an option of --optimizer muon-per-head"):
        check_options("muon-per-head", {"lam": 1.0})
    ocfg = optimizer_config(parse_args(TINY + ["--optimizer", "muon-per-head", "--muon-lr", "0.01"]))
    assert ocfg["options"] == {"muon_lr": 0.01}
    with pytest.raises(UsageError, match="--muon-lr only applies"):
        optimizer_config(parse_args(TINY + ["--optimizer", "muon", "--muon-lr", "0.01"]))


@pytest.mark.parametrize("tau", ["-1", "nan", "inf"])
def test_bad_qk_clip_tau_is_one_line(tau, tmp_path, capsys):
    assert main(TINY + ["--qk-clip-tau", tau, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--qk-clip-tau must be a finite number >= 0" in err and "\n" not in err
    assert not os.path.exists(tmp_path / "x")
