"""The grid: plan every run of a config, check it before training, run (or resume) it."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import torch

from .. import train
from ..models import build_model
from ..recipes import DEFAULT_ADAMW_LR, DEFAULT_LR, build_optimizer
from .config import ConfigError
from .measure import MemorySampler, _Capture, _loadavg, machine_info, measure, read_metrics
from .report import _f, write_reports

__all__ = ["plan_runs", "preflight", "execute", "run_grid"]


def _fmt_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    return repr(v) if isinstance(v, float) else str(v)


def _lr_of(opt: dict, model_label: str) -> float:
    lr = opt["lr"]
    return float(lr.get(model_label, DEFAULT_LR[opt["optimizer"]]) if isinstance(lr, dict) else lr)


def _mult_name(m: float) -> str:
    return f"lr{m:g}"


def _run_argv(cfg: dict, model: dict, opt: dict, seed: int, lr: float, folder: str) -> list:
    """The cm-train command line of one grid run."""
    argv = ["--model", model["model"], "--optimizer", opt["optimizer"], "--lr", repr(lr)]
    for key in ("steps", "batch_size", "block_size"):
        argv += ["--" + key.replace("_", "-"), str(cfg[key])]
    argv += ["--seed", str(seed), "--eval-interval", str(cfg["eval_interval"]), "--eval-iters", str(cfg["eval_iters"])]
    argv += ["--warmup", str(cfg["warmup"]), "--threads", str(cfg["threads"])]
    argv += ["--weight-decay", repr(float(opt["weight_decay"])), "--ckpt-interval", "0", "--sample-tokens", "0"]
    argv += ["--no-plot", "--quiet", "--out", folder]
    if opt["adamw_lr"] is not None:
        argv += ["--adamw-lr", repr(float(opt["adamw_lr"]))]
    for k, v in model["fields"].items():
        argv += ["--model-arg", f"{k}={_fmt_value(v)}"]
    for k, v in opt["options"].items():
        argv += ["--opt", f"{k}={_fmt_value(v)}"]
    return argv + list(cfg["train_args"])


def plan_runs(cfg: dict, out: str) -> list:
    """Every run of the grid: dicts with the run's labels, lr, folder and cm-train argument list.
    Order: model, seed, optimizer, lr multiplier (optimizers interleaved, so a change of machine
    load during the grid hits them alike)."""
    runs = []
    sweep = cfg["lr_sweep"]
    for m_label, model in cfg["models"].items():
        for seed in cfg["seeds"]:
            for o_label, opt in cfg["optimizers"].items():
                for mult in sweep or [1.0]:
                    lr = _lr_of(opt, m_label) * mult
                    folder = os.path.join(out, m_label, o_label, f"seed{seed}")
                    if sweep:
                        folder = os.path.join(folder, _mult_name(mult))
                    adamw_lr = opt["adamw_lr"]
                    if adamw_lr is None:
                        adamw_lr = lr if opt["optimizer"] == "adamw" else DEFAULT_ADAMW_LR
                    runs.append(
                        dict(
                            model=m_label,
                            model_name=model["model"],
                            optimizer=o_label,
                            optimizer_name=opt["optimizer"],
                            seed=seed,
                            lr_mult=mult,
                            lr=lr,
                            adamw_lr=adamw_lr,
                            options=opt["options"],
                            dir=folder,
                            argv=_run_argv(cfg, model, opt, seed, lr, folder),
                        )
                    )
    return runs


def preflight(cfg: dict, runs: list) -> dict:
    """Parse every run's arguments and build each model and optimizer once, so a bad option fails
    before hours of training rather than in the middle. Returns model label -> parameter count."""
    n_params, seen = {}, set()
    for r in runs:
        key = (r["model"], r["optimizer"])
        if key in seen:
            continue
        seen.add(key)
        with contextlib.redirect_stderr(_Capture()) as err:
            try:
                args = train.parse_args(r["argv"])
            except SystemExit:
                raise ConfigError(
                    f"bad cm-train arguments for {r['model']}/{r['optimizer']}: "
                    f"{err.text().strip().splitlines()[-1] if err.text().strip() else r['argv']}"
                ) from None
        try:
            mcfg = train.model_config(args)
            ocfg = train.optimizer_config(args)
            model = build_model(args.model, vocab_size=256, **mcfg)
            build_optimizer(
                ocfg["name"],
                model,
                lr=ocfg["lr"],
                adamw_lr=ocfg["adamw_lr"],
                weight_decay=ocfg["weight_decay"],
                options=ocfg["options"],
            )
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{r['model']}/{r['optimizer']}: {e}") from e
        n_params.setdefault(r["model"], sum(p.numel() for p in model.parameters()))
    return n_params


def _device_of(argv) -> str:
    if "--device" in argv:
        return argv[argv.index("--device") + 1]
    return "cuda" if torch.cuda.is_available() else "cpu"


def execute(run: dict, cfg: dict, *, resume: bool, verbose: bool) -> dict:
    """Run one grid cell (or pick up its finished result with ``resume``); returns its record."""
    summary_path = os.path.join(run["dir"], "summary.json")
    run_json = os.path.join(run["dir"], "run.json")
    rec = {k: v for k, v in run.items() if k != "argv"}
    rec.update(metrics=os.path.join(run["dir"], "metrics.jsonl"), argv=run["argv"])
    if resume and os.path.exists(summary_path):
        with open(summary_path) as f:
            done = json.load(f).get("steps")
        if done != cfg["steps"]:
            raise ConfigError(
                f"--resume: {summary_path} is a finished run of {done} steps, this grid asks for "
                f"{cfg['steps']}; use another --out"
            )
        rec["status"] = "resumed"
        if os.path.exists(run_json):
            with open(run_json) as f:
                old = json.load(f)
            for k in ("peak_memory_mb", "peak_memory_delta_mb", "memory_method", "load_before", "load_after"):
                rec[k] = old.get(k)
    else:
        argv = run["argv"] + (["--resume", "auto"] if resume else [])
        device = _device_of(argv)
        rec["load_before"] = _loadavg()
        sink = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(_Capture())
        try:
            with sink, MemorySampler("cuda" if device.startswith("cuda") else "cpu") as mem:
                summary = train.run(train.parse_args(argv))
            rec["status"] = "interrupted" if summary.get("interrupted") else "ok"
        except FloatingPointError as e:  # diverged (e.g. too high an lr in a sweep): record and go on
            rec["status"], rec["error"] = "diverged", str(e)
        except RuntimeError as e:  # e.g. a failed factorization: record it, keep the grid going
            rec["status"], rec["error"] = "failed", f"{type(e).__name__}: {e}"
            print(f"run {run['dir']} failed: {rec['error']}", file=sys.stderr)
        rec["load_after"] = _loadavg()
        rec.update(peak_memory_mb=mem.peak_mb, peak_memory_delta_mb=mem.delta_mb, memory_method=mem.method)
        with open(run_json, "w") as f:
            json.dump({k: v for k, v in rec.items()}, f, indent=2)
    rec.update(measure(read_metrics(rec["metrics"]), cfg["batch_size"], cfg["block_size"]))
    if rec["status"] in ("diverged", "failed"):
        rec["final_train_loss"] = rec["final_val_loss"] = float("nan")
    return rec


def run_grid(
    cfg: dict,
    out: str,
    *,
    resume: bool = False,
    verbose: bool = False,
    command: str = "",
    plots: bool = True,
    log=sys.stdout,
) -> dict:
    """Run (or resume) the whole grid; returns the ``results.json`` content."""
    runs = plan_runs(cfg, out)
    n_params = preflight(cfg, runs)
    os.makedirs(out, exist_ok=True)
    meta = dict(
        command=command,
        machine=machine_info(cfg["threads"]),
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
        load_start=_loadavg(),
    )
    records, t0 = [], time.time()
    try:
        for i, run in enumerate(runs, 1):
            os.makedirs(run["dir"], exist_ok=True)
            rec = execute(run, cfg, resume=resume, verbose=verbose)
            records.append(rec)
            print(
                f"[{i}/{len(runs)}] {run['model']}/{run['optimizer']} seed {run['seed']} lr {run['lr']:.3g}: "
                f"{rec['status']}, train {_f(rec.get('final_train_loss'))} val {_f(rec.get('final_val_loss'))}, "
                f"{_f(rec.get('median_step_time', float('nan')) * 1000, '{:.1f}')} ms/step, "
                f"load {rec.get('load_after')}",
                file=log,
                flush=True,
            )
            if rec["status"] == "interrupted":
                raise KeyboardInterrupt
            meta.update(load_end=_loadavg(), wall_time_s=round(time.time() - t0, 1))
            result = write_reports(out, cfg, records, n_params, meta, plots=plots and i == len(runs))
    except KeyboardInterrupt:
        meta.update(load_end=_loadavg(), wall_time_s=round(time.time() - t0, 1), interrupted=True)
        if records:
            write_reports(out, cfg, records, n_params, meta, plots=plots)
        raise
    return result
