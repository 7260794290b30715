"""The optimizer study runner (experiments study): a tiny study end to end, resume, edge extension,
lr picks, the report's numbers, clear errors; and the per-head Muon correspondence it relies on."""

import json

import pytest
import torch

from compositional_muon import CompositionalMuon
from compositional_muon.experiments import main, train
from compositional_muon.training.experiments.study import Results, preflight
from compositional_muon.training.experiments.study_config import load_study, parse_study
from compositional_muon.training.experiments.study_report import render, to_target
from compositional_muon.training.models import build_model
from compositional_muon.training.stats import paired_difference

PER_HEAD = {"whitening": "none", "hybrid": False, "lam": 0.0, "nesterov": True}
TINY = {
    "description": "tiny",
    "model": {"model": "gpt", "n_layer": 1, "n_embd": 16, "n_head": 2},
    "batch_size": 2,
    "block_size": 16,
    "warmup": 1,
    "eval_points": 2,
    "eval_windows": 4,
    "optimizers": {
        "muon": {"optimizer": "muon"},
        "per-head": {"optimizer": "cm", "options": PER_HEAD},
        "cm-off": {"optimizer": "cm", "options": {"nesterov": False}},
    },
    "cells": [
        {"name": "sw", "steps": 4, "seeds": [0], "optimizers": ["muon", "per-head"],
         "lrs": {"muon": [0.001, 0.002], "per-head": [0.001, 0.002]}, "extend_edges": 1},
        {"name": "h", "steps": 4, "seeds": [0, 1], "optimizers": ["muon", "per-head"], "lr_from": "sw"},
        {"name": "off", "steps": 4, "seeds": [0, 1], "optimizers": ["cm-off"], "lr_from": "sw", "lr_label": "per-head",
         "compare_with": "h"},
    ],
}  # fmt: skip


def _run(tmp_path, cfg=TINY, *extra):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    res = tmp_path / "res" / "tiny.json"
    rc = main(["study", "--config", str(path), "--results", str(res), "--work", str(tmp_path / "work"), *extra])
    return rc, res


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    rc, res = _run(tmp)
    assert rc == 0
    return tmp, res, load_study(str(tmp / "tiny.json"))


def test_records_are_compact_and_complete(study):
    _, res, cfg = study
    data = json.loads(res.read_text())
    runs = data["runs"]
    assert data["study"] == "tiny" and data["machine"]["threads"] == 1
    for r in runs:
        assert r["status"] == "ok" and r["steps_done"] == 4
        assert [e[0] for e in r["evals"]] == [2, 4]  # eval every steps // eval_points
        assert r["final"]["n"] == 4 and len(r["final"]["losses"]) == 4
        assert r["final"]["loss"] == pytest.approx(sum(r["final"]["losses"]) / 4, abs=1e-4)
        assert r["evals"][-1][1] == pytest.approx(r["final"]["loss"], abs=1e-5)
        assert "--eval-iters" in r["argv"] and r["argv"][r["argv"].index("--eval-iters") + 1] == "2"
    assert res.stat().st_size < 40_000
    # sweep: the best lr sat at the upper edge, so one point (x2) was added, and only one
    sw = {(r["optimizer"], r["lr"]) for r in runs if r["cell"] == "sw"}
    assert {lr for o, lr in sw if o == "muon"} == {0.001, 0.002, 0.004}
    best = {o: min((r for r in runs if r["cell"] == "sw" and r["optimizer"] == o), key=lambda r: r["final"]["loss"])["lr"]
            for o in ("muon", "per-head")}  # fmt: skip
    h = [r for r in runs if r["cell"] == "h"]
    assert {(r["optimizer"], r["lr"]) for r in h} == {(o, best[o]) for o in best}
    assert sum("copied_from" in r for r in h) == 2  # seed 0 at the best lr is the sweep's own run
    assert {r["lr"] for r in runs if r["cell"] == "off"} == {best["per-head"]}  # lr_label
    assert cfg.cell("off").lr_label == "per-head"


def test_rerun_resumes_without_training_again(study, monkeypatch):
    tmp, res, _ = study
    before = res.read_text()
    calls = []
    monkeypatch.setattr(train, "run", lambda args: calls.append(args))
    rc, _ = _run(tmp)
    assert rc == 0 and calls == [] and res.read_text() == before  # no second edge extension either


def test_report_numbers_come_from_the_records(study):
    tmp, res, cfg = study
    md = (tmp / "res" / "tiny.md").read_text()
    results = Results(str(res), cfg)
    by_seed = {o: {r["seed"]: r["final"]["loss"] for r in results.of("h", o)} for o in ("muon", "per-head")}
    d = paired_difference(by_seed["per-head"], by_seed["muon"])
    assert f"| per-head - muon | 2 | {d.text()}" in md
    assert "### sw: learning-rate sweep" in md and "| muon | 1 |" in md
    off = {r["seed"]: r["final"]["loss"] for r in results.of("off", "cm-off")}
    assert f"| cm-off - muon | 2 | {paired_difference(off, by_seed['muon']).text()}" in md  # compare_with "h"
    assert "| off | 4 | (see h) |" in md
    t = to_target(results, "h", "per-head", "muon")
    assert set(t) == {0, 1}
    rc, _ = _run(tmp, TINY, "--report")
    assert rc == 0


def test_errors_are_one_line(tmp_path, capsys):
    bad = dict(TINY, cells=[{"name": "x", "steps": 4, "lrs": {"muon": [0.01]}, "lr_from": "sw"}])
    assert _run(tmp_path, bad)[0] == 2
    assert "exactly one of 'lrs', 'lrs_around', 'lr_from'" in capsys.readouterr().err
    nothing = dict(TINY, cells=[{"name": "x", "steps": 4, "lr_from": "nope"}])
    assert _run(tmp_path, nothing)[0] == 2
    assert "no results of cell 'nope'" in capsys.readouterr().err
    with pytest.raises(Exception, match="unknown optimizer"):
        parse_study(dict(TINY, optimizers={"x": {"optimizer": "sgd"}}))
    with pytest.raises(Exception, match="multiple of batch_size"):
        parse_study(dict(TINY, eval_windows=3))


def test_report_turns_steps_to_target_into_wall_clock_with_bench_ratios(study):
    tmp, res, cfg = study
    results = Results(str(res), cfg)
    (tmp / "res" / "tiny_step_time.json").write_text(json.dumps({"median_s": {"muon": 0.1, "per-head": 0.05}}))
    md = render(cfg, results)
    steps = [v["steps"] for v in to_target(results, "h", "per-head", "muon").values()]
    tail = md.split("### h:")[1].split("To reach muon's final loss")[1]
    row = next(line for line in tail.splitlines() if line.startswith("| per-head | "))
    assert "| 0.500 |" in row  # the bench's ratio, then steps x ratio
    got = [s * 0.5 for s in steps if s is not None]
    if got:
        assert f"{sum(got) / len(got):.2f}" in row.split("| 0.500 |")[1]
    else:
        assert "not reached" in row.split("| 0.500 |")[1]


def test_shipped_study_configs_parse():
    for name in ("study_small", "study_wide", "study_large", "study_seed003_loopformer", "study_seed003_mor"):
        cfg = load_study(name)
        assert cfg.threads == 1 and cfg.cells
        if "per-head" in cfg.optimizers:
            assert cfg.optimizers["per-head"].options == PER_HEAD
        preflight(cfg)  # every run's argv parses


def _msign(a):
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def test_cm_without_whitening_is_per_head_muon_at_half_the_step():
    """CM(whitening="none", hybrid=False, lam=0) moves every head's d x D block of W_q, W_k, W_v
    (rows) and D x d block of W_o (columns) by -(eta/2) msign(block of u), u = g + beta m (Nesterov),
    m <- beta m + g: per-head Muon with step eta/2 (two steps, float64, exact SVD msign)."""
    torch.manual_seed(0)
    model = build_model("gpt", vocab_size=64, n_layer=1, n_embd=16, n_head=2, block_size=8).double()
    eta, beta, d = 0.1, 0.95, 8
    opt = CompositionalMuon.from_model(
        model, lr=eta, muon_lr=eta, adamw_lr=0.0, momentum=beta, msign_backend="svd", **PER_HEAD
    )
    attn = {n: p for n, p in model.named_parameters() if ".attn." in n}
    assert len(attn) == 4
    mom = {n: torch.zeros_like(p) for n, p in attn.items()}
    for step in range(2):
        x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x, x.roll(-1, 1))[1].backward()
        before = {n: p.detach().clone() for n, p in attn.items()}
        grads = {n: p.grad.clone() for n, p in attn.items()}
        opt.step()
        for n, p in attn.items():
            mom[n] = beta * mom[n] + grads[n]
            u = grads[n] + beta * mom[n]
            for h in range(2):
                blk = (
                    (slice(None), slice(h * d, (h + 1) * d))
                    if "o_proj" in n
                    else (slice(h * d, (h + 1) * d), slice(None))
                )
                expected = before[n][blk] - eta / 2 * _msign(u[blk])
                torch.testing.assert_close(p.detach()[blk], expected, rtol=0, atol=1e-12)


def test_runs_at_an_earlier_lr_pick_are_dropped(study, monkeypatch, tmp_path):
    tmp, res, _ = study
    data = json.loads(res.read_text())
    stale = dict(next(r for r in data["runs"] if r["cell"] == "h"), lr=0.5, seed=9)
    data["runs"].append(stale)
    copy = tmp_path / "res" / "tiny.json"
    copy.parent.mkdir()
    copy.write_text(json.dumps(data))
    calls = []
    monkeypatch.setattr(train, "run", lambda args: calls.append(args))
    cfg = tmp / "tiny.json"
    argv = ["study", "--config", str(cfg), "--results", str(copy), "--work", str(tmp_path / "w")]
    assert main(argv) == 0 and calls == []
    runs = json.loads(copy.read_text())["runs"]
    assert not any(r["lr"] == 0.5 for r in runs) and len(runs) == len(data["runs"]) - 1


def test_an_lrs_around_sweep_keeps_its_edge_extension_on_rerun(tmp_path, monkeypatch):
    """A swept cell whose lrs come from another cell's best (``lrs_around``) extends at an edge;
    running the study again must keep those runs (it once dropped them as "an earlier lr pick" and
    then failed on their run folders)."""
    cfg = dict(TINY, cells=[*TINY["cells"][:1], {"name": "around", "steps": 4, "seeds": [0], "optimizers": ["muon"],
               "lrs_around": {"cell": "sw", "mults": [1, 2]}, "extend_edges": 1}])  # fmt: skip
    rc, res = _run(tmp_path, cfg)
    assert rc == 0
    first = [r for r in json.loads(res.read_text())["runs"] if r["cell"] == "around"]
    assert len(first) == 3  # x1, x2 and the one extension at the edge
    calls = []
    monkeypatch.setattr(train, "run", lambda args: calls.append(args))
    rc, _ = _run(tmp_path, cfg)
    again = [r for r in json.loads(res.read_text())["runs"] if r["cell"] == "around"]
    assert rc == 0 and calls == [] and again == first
