"""The fixed validation set, and the same data/initial weights for every optimizer at a seed."""

import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from compositional_muon.training import train
from compositional_muon.training.data import TokenDataset
from compositional_muon.training.evaluation import EvalResult, evaluate_fixed, fixed_window_starts
from compositional_muon.training.models import build_model


def test_window_starts_evenly_spaced_disjoint_and_capped():
    s = fixed_window_starts(1000, 9, 5)  # windows of 10 tokens, last start 990
    assert s == [0, 247, 495, 742, 990]
    assert all(b - a >= 10 for a, b in zip(s, s[1:]))
    assert fixed_window_starts(35, 9, 8) == [0, 12, 25]  # capped at 35 // 10 = 3 disjoint windows
    assert fixed_window_starts(10, 9, 4) == [0]
    with pytest.raises(ValueError, match="fewer than one window"):
        fixed_window_starts(9, 9, 1)
    with pytest.raises(ValueError, match="n_windows"):
        fixed_window_starts(100, 9, 0)


def test_eval_result_mean_and_se_by_hand():
    r = EvalResult.from_losses([1.0, 2.0, 4.0, 5.0])
    assert r.mean == 3.0 and r.n == 4
    assert r.se == pytest.approx(math.sqrt(10 / 3) / 2, abs=1e-15)  # sample var (4+1+1+4)/3, se = sd/sqrt(4)
    rec = r.record(with_losses=True)
    assert rec["val_loss"] == 3.0 and rec["val_n"] == 4 and rec["val_losses"] == [1.0, 2.0, 4.0, 5.0]
    assert "val_losses" not in r.record(with_losses=False)
    assert math.isnan(EvalResult.from_losses([2.0]).se)


def _model_and_tokens():
    torch.manual_seed(0)
    model = build_model("gpt", vocab_size=256, n_layer=1, n_embd=16, n_head=2, block_size=8).double()
    tokens = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
    return model, tokens


def test_evaluate_fixed_equals_float64_reference_and_is_fixed():
    model, tokens = _model_and_tokens()
    model.train()
    res = evaluate_fixed(model, tokens, block_size=8, n_windows=12, batch_size=5)
    assert model.training  # mode restored
    model.eval()
    ref = []
    for s in fixed_window_starts(300, 8, 12):
        x, y = tokens[s : s + 8][None], tokens[s + 1 : s + 9][None]
        with torch.no_grad():
            ref.append(F.cross_entropy(model(x)[0][0].double(), y[0]).item())
    assert res.n == 12
    assert list(res.losses) == pytest.approx(ref, abs=1e-6)  # the float32 cast of the logits
    assert res.mean == pytest.approx(statistics.fmean(ref), abs=1e-6)
    assert res.se == pytest.approx(statistics.stdev(ref) / math.sqrt(12), abs=1e-6)
    again = evaluate_fixed(model, tokens, block_size=8, n_windows=12, batch_size=12)  # any batching
    assert list(again.losses) == pytest.approx(list(res.losses), abs=1e-9)


def test_evaluation_does_not_draw_from_the_data_generators():
    ds = TokenDataset(torch.arange(2000) % 256, seed=3)
    model, _ = _model_and_tokens()
    before = ds.state_dict()
    evaluate_fixed(model.float(), ds.split("val"), block_size=8, n_windows=4, batch_size=2)
    after = ds.state_dict()
    assert torch.equal(before["train_generator"], after["train_generator"])
    assert torch.equal(before["val_generator"], after["val_generator"])


_REAL_GET, _REAL_BUILD = TokenDataset.get_batch, train.build_optimizer


def _train(tmp_path, name, optimizer, monkeypatch, eval_interval=2, extra=()):
    batches, inits = [], []
    real_get, real_build = _REAL_GET, _REAL_BUILD

    def get_batch(self, split, *a, **k):
        x, y = real_get(self, split, *a, **k)
        if split == "train":
            batches.append(x.clone())
        return x, y

    def build(name_, model, **k):
        inits.append({n: p.detach().clone() for n, p in model.state_dict().items()})
        return real_build(name_, model, **k)

    monkeypatch.setattr(TokenDataset, "get_batch", get_batch)
    monkeypatch.setattr(train, "build_optimizer", build)
    out = tmp_path / name
    argv = ["--optimizer", optimizer, "--steps", "4", "--batch-size", "2", "--block-size", "16", "--n-layer", "1"]
    argv += ["--n-embd", "16", "--n-head", "2", "--eval-interval", str(eval_interval), "--eval-iters", "3"]
    argv += ["--seed", "5", "--threads", "1", "--quiet", "--no-plot", "--sample-tokens", "0", "--out", str(out), *extra]
    train.run(train.parse_args(argv))
    with open(out / "metrics.jsonl") as f:
        return batches, inits[0], [json.loads(line) for line in f if line.strip()]


def test_same_batches_and_initial_weights_for_every_optimizer(tmp_path, monkeypatch):
    b_muon, w_muon, m_muon = _train(tmp_path, "muon", "muon", monkeypatch)
    b_cm, w_cm, m_cm = _train(tmp_path, "cm", "cm", monkeypatch)
    b_adamw, w_adamw, _ = _train(tmp_path, "adamw", "adamw", monkeypatch, eval_interval=1)  # more evaluations
    assert len(b_muon) == 4
    for other in (b_cm, b_adamw):
        assert all(torch.equal(a, b) for a, b in zip(b_muon, other)) and len(other) == 4
    for other in (w_cm, w_adamw):
        assert w_muon.keys() == other.keys() and all(torch.equal(w_muon[k], other[k]) for k in w_muon)
    _, _, m_other_seed = _train(tmp_path, "seed6", "muon", monkeypatch, extra=("--seed", "6"))
    assert m_other_seed[0]["train_loss"] != m_muon[0]["train_loss"]  # the seed does change the data/weights
    evals = [r for r in m_muon if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["val_n"] == 6 for r in evals)
    assert "val_losses" not in evals[0] and len(evals[-1]["val_losses"]) == 6  # the final one keeps them
    assert evals[-1]["val_loss"] == pytest.approx(statistics.fmean(evals[-1]["val_losses"]), abs=1e-5)
    assert m_cm[0]["train_loss"] == m_muon[0]["train_loss"]  # same weights, same first batch
