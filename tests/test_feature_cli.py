"""CLI: --optimizer muon-per-head, --model moe-gpt, --qk-clip-tau, --adjust-lr-fn."""

import json
import os

from compositional_muon.train import main, parse_args, run

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
