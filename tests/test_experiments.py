"""The experiments runner: a tiny grid end to end, --resume, and clear errors."""

import json
import math
import os
import statistics

import pytest

from compositional_muon import experiments
from compositional_muon.experiments import load_config, main

TINY = {
    "description": "tiny test grid",
    "steps": 6,
    "batch_size": 2,
    "block_size": 16,
    "eval_interval": 3,
    "eval_iters": 1,
    "warmup": 1,
    "seeds": [0, 1],
    "threads": 1,
    "models": {"gpt": {"n_layer": 1, "n_embd": 16, "n_head": 2}},
    "optimizers": {"adamw": {"lr": 0.003}, "cm": {"lr": 0.02}},
}


def _write(tmp_path, cfg, name="cfg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def _metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    cfg = _write(tmp, TINY)
    out = str(tmp / "out")
    assert main(["--config", cfg, "--out", out]) == 0
    with open(os.path.join(out, "results.json")) as f:
        return out, cfg, json.load(f)


def test_grid_writes_results_md_and_plot(grid):
    out, _, res = grid
    runs = res["runs"]
    assert len(runs) == 4
    assert {(r["optimizer"], r["seed"]) for r in runs} == {("adamw", 0), ("adamw", 1), ("cm", 0), ("cm", 1)}
    for r in runs:
        assert r["status"] == "ok"
        assert r["dir"] == os.path.join(out, "gpt", r["optimizer"], f"seed{r['seed']}")
        assert os.path.exists(os.path.join(r["dir"], "summary.json"))
        assert r["peak_memory_mb"] > 0 and r["peak_memory_delta_mb"] >= 0
    assert res["config"]["steps"] == 6 and res["machine"]["torch"]
    assert res["plots"]["gpt"] == os.path.join(out, "loss_gpt.png")
    with open(res["plots"]["gpt"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(os.path.join(out, "results.md")).read()
    assert "## gpt" in md and "| adamw |" in md and "| cm |" in md and "baseline" in md
    assert "loss_gpt.png" in md and "2 seeds" in md


def test_numbers_match_each_runs_metrics(grid):
    out, _, res = grid
    for r in res["runs"]:
        recs = _metrics(r["metrics"])
        assert [x["step"] for x in recs] == list(range(1, 7))
        assert r["final_val_loss"] == [x["val_loss"] for x in recs if "val_loss" in x][-1]
        tail = recs[-20:]
        assert math.isclose(r["final_train_loss"], statistics.fmean(x["parts"]["ce"] for x in tail), rel_tol=1e-9)
        times = sorted(x["step_time"] for x in recs[5:])
        assert r["median_step_time"] == times[len(times) // 2]
        assert math.isclose(r["tokens_per_s"], 2 * 16 / r["median_step_time"])
    summary = res["summary"]["gpt"]
    for opt in ("adamw", "cm"):
        vals = [r["final_val_loss"] for r in res["runs"] if r["optimizer"] == opt]
        assert math.isclose(summary[opt]["final_val_loss"], statistics.fmean(vals))
        assert math.isclose(summary[opt]["final_val_std"], statistics.stdev(vals))
    md = open(os.path.join(out, "results.md")).read()
    cm, adamw = summary["cm"], summary["adamw"]
    assert f"{cm['final_val_loss']:.4f} ± {cm['final_val_std']:.4f}" in md
    assert f"{cm['final_val_loss'] - adamw['final_val_loss']:+.4f}" in md
    assert f"{cm['median_step_time'] / adamw['median_step_time']:.2f}x" in md


def test_resume_skips_finished_runs(grid, tmp_path, capsys):
    out, cfg, res = grid
    stamps = {r["dir"]: os.path.getmtime(os.path.join(r["dir"], "metrics.jsonl")) for r in res["runs"]}
    # a third seed: only its runs train; the others are picked up from their summary.json
    assert main(["--config", cfg, "--out", out, "--resume", "--seeds", "0,1,2", "--no-plot"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        again = json.load(f)["runs"]
    status = {(r["optimizer"], r["seed"]): r["status"] for r in again}
    assert status == {
        ("adamw", 0): "resumed",
        ("adamw", 1): "resumed",
        ("cm", 0): "resumed",
        ("cm", 1): "resumed",
        ("adamw", 2): "ok",
        ("cm", 2): "ok",
    }
    for d, t in stamps.items():
        assert os.path.getmtime(os.path.join(d, "metrics.jsonl")) == t
    old = {(r["optimizer"], r["seed"]): r["final_val_loss"] for r in res["runs"]}
    for r in again:
        if r["seed"] < 2:
            assert r["final_val_loss"] == old[(r["optimizer"], r["seed"])]
            assert r["peak_memory_mb"] is not None  # kept from run.json


def test_lr_sweep_folders_and_best(tmp_path):
    cfg = dict(TINY, seeds=[0], optimizers={"adamw": {}}, steps=4, eval_interval=4)
    out = str(tmp_path / "sweep")
    assert main(["--config", _write(tmp_path, cfg), "--out", out, "--lr-sweep", "0.5,2", "--no-plot"]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    dirs = sorted(os.path.relpath(r["dir"], out) for r in res["runs"])
    assert dirs == [os.path.join("gpt", "adamw", "seed0", "lr0.5"), os.path.join("gpt", "adamw", "seed0", "lr2")]
    lrs = sorted(r["lr"] for r in res["runs"])
    assert lrs == pytest.approx([0.5 * 3e-3, 2 * 3e-3])  # DEFAULT_LR["adamw"] times the multipliers
    best = res["summary"]["gpt"]["adamw"]
    assert best["final_val_loss"] == min(r["final_val_loss"] for r in res["runs"])
    assert "LR sweep" in open(os.path.join(out, "results.md")).read()


def test_shipped_seed003_config_loads():
    cfg = load_config("seed003")
    assert set(cfg["optimizers"]) >= {
        "adamw",
        "muon",
        "cm",
        "cm-isotropic",
        "circuit-muon",
        "normuon",
        "adamuon",
        "mano",
        "newton-muon",
    }
    assert {m["model"] for m in cfg["models"].values()} == {"loopformer", "mor"}
    runs = experiments.plan_runs(cfg, "x")
    experiments.preflight(cfg, runs)  # every model/optimizer pair builds


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "transformerxl"], "unknown model 'transformerxl'"),
        (["--optimizers", "adamw,sgd"], "unknown optimizer 'sgd'"),
        (["--seeds", "a"], "--seeds"),
        (["--config", "no_such_config"], "neither an existing file nor a shipped config"),
    ],
)
def test_bad_names_give_clear_errors(tmp_path, capsys, args, message):
    if "--config" not in args:
        args = ["--config", _write(tmp_path, TINY)] + args
    assert main(args + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not valid JSON: "),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps(dict(TINY, step=5)), "unknown key(s) ['step']"),
        (json.dumps(dict(TINY, models={"gpt": {"n_layers": 2}})), "'n_layers' is not a GPTConfig field"),
        (json.dumps(dict(TINY, models={"rnn": {}})), "unknown model 'rnn'"),
        (json.dumps(dict(TINY, optimizers={"adam": {}})), "unknown optimizer 'adam'"),
        (json.dumps(dict(TINY, optimizers={"cm": {"lr": -1}})), "lr must be a positive number"),
        (json.dumps(dict(TINY, optimizers={"cm": {"options": {"no_such_option": 1}}})), "gpt/cm: "),
        (json.dumps(dict(TINY, steps=0)), "'steps' must be an integer >= 1"),
        (json.dumps(dict(TINY, seeds=[])), "'seeds' must be a non-empty list"),
        (json.dumps({k: v for k, v in TINY.items() if k != "models"}), "'models' and 'optimizers' are required"),
    ],
)
def test_bad_config_files_give_clear_errors(tmp_path, capsys, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    assert main(["--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and ("bad.json" in err or "gpt/cm" in err)


def test_resume_refuses_a_grid_of_other_length(grid, capsys):
    out, cfg, _ = grid
    assert main(["--config", cfg, "--out", out, "--resume", "--steps", "8", "--no-plot"]) == 2
    assert "finished run of 6 steps" in capsys.readouterr().err


def test_dry_run_lists_runs(tmp_path, capsys):
    assert main(["--config", _write(tmp_path, TINY), "--out", str(tmp_path / "d"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs" in out and "--optimizer cm" in out and not os.path.exists(tmp_path / "d")


def test_a_diverged_run_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
    real_run = experiments.train.run

    def run(args):
        if args.optimizer == "cm":
            raise FloatingPointError("the training loss is nan at step 3")
        return real_run(args)

    monkeypatch.setattr(experiments.train, "run", run)
    cfg = dict(TINY, seeds=[0], steps=3, eval_interval=3)
    out = str(tmp_path / "div")
    assert main(["--config", _write(tmp_path, cfg), "--out", out, "--no-plot"]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    status = {r["optimizer"]: (r["status"], r["final_val_loss"]) for r in res["runs"]}
    assert status["cm"] == ("diverged", None) and status["adamw"][0] == "ok"
    assert "1 of 1 diverged/failed" in open(os.path.join(out, "results.md")).read()
