"""The training tools' logs: tqdm progress, memory readings, per-head CM stats and maps,
TensorBoard event files, and the CLI switches that drive them."""

import io
import json
import os

import pytest
import torch

from compositional_muon import CompositionalMuon
from compositional_muon.training import head_maps, memory, run_logs
from compositional_muon.training.models import GPT, GPTConfig
from compositional_muon.training.progress import Progress
from compositional_muon.training.train import parse_args, run

TINY = "--n-layer 2 --n-embd 32 --n-head 2 --block-size 16 --batch-size 4 --eval-interval 6 --eval-iters 1"
TINY = TINY.split() + ["--sample-tokens", "0", "--threads", "1"]


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_plain_lines_in_logs_bar_on_tty_nothing_when_quiet():
    log = io.StringIO()
    p = Progress(5, quiet=False, stream=log, interval_s=1e9)
    for s in range(1, 6):
        p.update(s, 2.0, 1000.0)
    assert [ln.split()[1] for ln in log.getvalue().splitlines()] == ["1/5", "5/5"]  # first and last only
    tty = _Tty()
    p = Progress(5, quiet=False, stream=tty)
    assert p.bar is not None
    for s in range(1, 6):
        p.update(s, 2.0, 1000.0, "val 1.9")
    p.close()
    out = tty.getvalue()
    assert "\r" in out and "5/5" in out and "val 1.9" in out and "step 1/5" not in out
    quiet = io.StringIO()
    p = Progress(5, quiet=True, stream=quiet)
    p.update(1, 2.0, 1000.0)
    p.close()
    assert quiet.getvalue() == ""


def test_memory_readings_and_peak_sampler_sees_an_allocation():
    psutil = pytest.importorskip("psutil")
    now = memory.rss_mb()
    assert now == pytest.approx(psutil.Process().memory_info().rss / 2**20, rel=0.2)
    assert memory.peak_rss_mb() >= now * 0.8
    with memory.PeakSampler(interval_s=0.001) as m:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        import time

        time.sleep(0.05)
        del x
    assert "psutil" in m.method and m.peak_mb - m.base_mb > 40


def _cm_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_embd=16, n_head=2))
    return model, CompositionalMuon.from_model(model, lr=0.02, msign_dtype=torch.float32)


def test_head_stats_every_n_steps_bounded_by_lr_and_plotted(tmp_path):
    pytest.importorskip("matplotlib")
    model, opt = _cm_model()
    path = str(tmp_path / "head_stats.jsonl")
    hs = head_maps.HeadStats(opt, path, every=2)
    x = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(0))
    for step in range(1, 6):
        hs.arm(step)
        assert opt.track_stats == (step % 2 == 0)
        model(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
        hs.record(step)
    recs = head_maps.load_records(path)
    assert sorted({r.step for r in recs}) == [2, 4]
    assert sorted({r.pair for r in recs}) == [f"blocks.{i}.attn.{k}" for i in (0, 1) for k in ("ov", "qk")]
    assert all(len(r.composed) == 2 and max(r.composed) <= 0.02 * (1 + 1e-4) for r in recs)  # CM's bound
    steps, layers, t = head_maps.tensors(recs, "qk")
    assert steps == [2, 4] and layers == ["blocks.0.attn", "blocks.1.attn"] and t["composed"].shape == (2, 2, 2)
    png = head_maps.plot_head_maps(path, str(tmp_path / "head_maps.png"))
    assert png and os.path.getsize(png) > 1000
    head_maps.truncate(path, 3)
    assert {r.step for r in head_maps.load_records(path)} == {2}
    section = head_maps.report_section(
        str(tmp_path.parent), [dict(dir=str(tmp_path), model="gpt", optimizer="cm", seed=0)]
    )
    assert f"]({tmp_path.name}/head_maps.png)" in section
    # an optimizer without track_stats (Muon) records nothing
    assert not head_maps.HeadStats(torch.optim.SGD(model.parameters(), lr=0.1), path, every=1).active


def test_tensorboard_logger_writes_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from compositional_muon.training.tb_logger import TBLogger

    tb = TBLogger(str(tmp_path))
    for s in (1, 2):
        rec = dict(step=s, train_loss=3.0 - s, step_time=0.5, tokens_per_s=100.0 * s, rss_mb=10.0)
        if s == 2:
            rec["val_loss"] = 0.75
        tb.log_step(rec, [("0_cm", 0.01 * s)])
    tb.log_heads([head_maps.HeadRecord(2, "blocks.0.attn.qk", [0.1, 0.3], [0.01, 0.02])])
    tb.close()
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    val = {tag: [(e.step, round(e.value, 6)) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
    assert val["loss/train"] == [(1, 2.0), (2, 1.0)] and val["loss/val"] == [(2, 0.75)]
    assert val["lr/0_cm"] == [(1, 0.01), (2, 0.02)] and val["time/tokens_per_s"] == [(1, 100.0), (2, 200.0)]
    assert val["heads/blocks.0.attn.qk/step_max"] == [(2, 0.3)] and val["memory/rss_mb"][0] == (1, 10.0)


@pytest.mark.slow
def test_cli_writes_tensorboard_head_maps_and_resumes_head_stats_exactly(tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    common = TINY + ["--steps", "12", "--head-stats-every", "3", "--log", "tensorboard"]
    full = run(parse_args(common + ["--out", str(tmp_path / "full")]))
    assert os.path.isfile(full["head_maps"]) and os.listdir(full["tensorboard"])
    with open(tmp_path / "full" / "metrics.jsonl") as f:
        assert all(json.loads(line)["rss_mb"] > 0 for line in f)
    split = str(tmp_path / "split")
    run(parse_args(common + ["--out", split, "--stop-after", "7"]))
    run(parse_args(common + ["--out", split, "--resume", "auto"]))
    a = head_maps.load_records(str(tmp_path / "full" / "head_stats.jsonl"))
    b = head_maps.load_records(os.path.join(split, "head_stats.jsonl"))
    assert [r.step for r in a] == [r.step for r in b] and sorted({r.step for r in a}) == [3, 6, 9, 12]
    assert a == b  # the resumed run's per-head numbers are the uninterrupted run's
    muon = run(parse_args(TINY + ["--steps", "2", "--optimizer", "adamw", "--out", str(tmp_path / "adamw")]))
    assert "head_maps" not in muon


def test_cli_argument_errors(monkeypatch):
    with pytest.raises(ValueError, match="--head-stats-every"):
        run_logs.check_arguments(parse_args(["--head-stats-every", "-1"]))
    from compositional_muon.training import tb_logger

    monkeypatch.setattr(tb_logger, "tensorboard_available", lambda: False)
    with pytest.raises(ValueError, match="needs the tensorboard package"):
        run_logs.check_arguments(parse_args(["--log", "tensorboard"]))
