"""Run a grid of models x optimizers x seeds (optionally x learning rates) and compare them.

    python -m compositional_muon.experiments                       # the shipped seed-003 study
    python -m compositional_muon.experiments --config my.json --seeds 0,1,2 --out runs/mine
    python -m compositional_muon.experiments --optimizers adamw,cm --lr-sweep 0.5,1,2 --steps 200
    python -m compositional_muon.experiments --resume               # continue an interrupted grid

Every run is an ordinary :func:`compositional_muon.train.run` call, one after another in this
process, in ``<out>/<model>/<optimizer>/seed<k>`` (``.../seed<k>/lr<x>`` with an LR sweep, ``x``
the multiplier of the optimizer's base lr). Each run folder holds train's ``metrics.jsonl`` (the
per-step curves), ``summary.json`` and ``last.pt``, plus ``run.json`` written here (the run's
config and the measurements below). The grid writes ``<out>/results.json`` (every run),
``<out>/results.md`` (one table per model) and ``<out>/loss_<model>.png`` (one plot per model).

What is measured (all from the run's own ``metrics.jsonl``, except memory):

* final train loss: the mean of the training cross-entropy (``parts["ce"]`` when the model logs
  it, else the objective) over the last 20 steps; ``final_train_objective`` is the same for the
  full training objective (LoopFormer and MoR add auxiliary terms to it);
* final val loss: the last evaluation (``--eval-iters`` batches of the validation split);
* time/step: the median of train's ``step_time`` over the steps after the first 5 (batch
  fetch, forward, backward, optimizer step; evaluation excluded); tokens/s =
  ``batch_size * block_size / median step time``;
* peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the resident set size of this
  process, read with psutil every 5 ms by a background thread during the run:
  ``peak_rss_mb`` (highest RSS seen) and ``peak_rss_delta_mb`` (that minus the RSS just before
  the run, measured after ``gc.collect()`` and glibc's ``malloc_trim(0)``), i.e. what the run's
  model, optimizer state, activations and data add on top of the interpreter and torch. When
  psutil is missing it falls back to the growth of ``ru_maxrss``, which only counts a run that
  raises the process's high-water mark.

Configs are JSON (see ``compositional_muon/training/configs/seed003.json`` and ``docs/results.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time

import torch

from . import head_maps, memory, train
from .models import MODELS, build_model
from .recipes import DEFAULT_ADAMW_LR, DEFAULT_LR, OPTIMIZERS, build_optimizer

__all__ = [
    "ConfigError",
    "load_config",
    "plan_runs",
    "run_grid",
    "aggregate",
    "write_reports",
    "build_parser",
    "main",
    "shipped_configs",
]

CONFIG_KEYS = {
    "description",
    "steps",
    "batch_size",
    "block_size",
    "eval_interval",
    "eval_iters",
    "warmup",
    "seeds",
    "threads",
    "lr_sweep",
    "train_args",
    "models",
    "optimizers",
}
MODEL_RESERVED = {
    "block_size": 'block_size is set for the whole grid (top-level "block_size")',
    "vocab_size": "vocab_size comes from the data",
}
OPTIMIZER_KEYS = {"optimizer", "lr", "adamw_lr", "weight_decay", "options"}
DEFAULTS = dict(
    steps=600,
    batch_size=16,
    block_size=128,
    eval_interval=100,
    eval_iters=8,
    warmup=20,
    seeds=[0],
    threads=0,
    lr_sweep=None,
    train_args=[],
)
TAIL = 20  # steps averaged for the final train loss (as train's own summary does)
SKIP_TIMING = 5  # first steps left out of the median step time (as train's own summary does)


class ConfigError(ValueError):
    """A bad config file, or a bad model/optimizer/seed selection."""


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


def _configs_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def shipped_configs() -> list:
    """Names of the configs shipped in ``compositional_muon/training/configs`` (without ``.json``)."""
    d = _configs_dir()
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".json")) if os.path.isdir(d) else []


def _read_config_text(name_or_path: str) -> tuple:
    """(text, source) of a shipped config name or a file path."""
    if os.path.isfile(name_or_path):
        with open(name_or_path, encoding="utf-8") as f:
            return f.read(), os.path.abspath(name_or_path)
    stem = name_or_path[:-5] if name_or_path.endswith(".json") else name_or_path
    if os.sep not in stem and "/" not in stem and stem in shipped_configs():
        try:  # importlib.resources also works from a zip; the plain path is the fallback
            from importlib.resources import files

            return (files("compositional_muon.training.configs") / f"{stem}.json").read_text(encoding="utf-8"), stem
        except (ImportError, FileNotFoundError, TypeError):
            with open(os.path.join(_configs_dir(), f"{stem}.json"), encoding="utf-8") as f:
                return f.read(), stem
    if os.path.isdir(name_or_path):
        raise ConfigError(f"config {name_or_path!r} is a folder, not a JSON file")
    raise ConfigError(
        f"config {name_or_path!r} is neither an existing file nor a shipped config "
        f"(shipped: {', '.join(shipped_configs()) or 'none'})"
    )


def load_config(name_or_path: str) -> dict:
    """Read and check a config (a shipped name such as ``"seed003"`` or a JSON file path); returns
    it normalized: ``models`` and ``optimizers`` as dicts label -> entry, every default filled in."""
    text, source = _read_config_text(name_or_path)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config {source!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    return normalize_config(raw, source)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def normalize_config(raw, source: str = "<dict>") -> dict:
    where = f"config {source!r}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(CONFIG_KEYS))}")
    cfg = dict(DEFAULTS)
    cfg.update(raw)
    cfg["source"] = source
    cfg["description"] = str(raw.get("description", ""))
    for key in ("steps", "batch_size", "block_size", "eval_interval", "eval_iters"):
        if not _is_int(cfg[key]) or cfg[key] < 1:
            raise ConfigError(f"{where}: {key!r} must be an integer >= 1, got {cfg[key]!r}")
    for key in ("warmup", "threads"):
        if not _is_int(cfg[key]) or cfg[key] < 0:
            raise ConfigError(f"{where}: {key!r} must be an integer >= 0, got {cfg[key]!r}")
    cfg["seeds"] = _check_seeds(cfg["seeds"], where)
    if cfg["lr_sweep"] is not None:
        cfg["lr_sweep"] = _check_sweep(cfg["lr_sweep"], where)
    if not isinstance(cfg["train_args"], list) or not all(isinstance(a, str) for a in cfg["train_args"]):
        raise ConfigError(f"{where}: 'train_args' must be a list of strings (extra cm-train arguments)")
    if "models" not in raw or "optimizers" not in raw:
        raise ConfigError(f"{where}: 'models' and 'optimizers' are required")
    cfg["models"] = {
        label: _check_model(label, entry, where) for label, entry in _entries(raw["models"], "models", where)
    }
    cfg["optimizers"] = {
        label: _check_optimizer(label, entry, where, cfg["models"])
        for label, entry in _entries(raw["optimizers"], "optimizers", where)
    }
    return cfg


def _entries(value, key, where):
    """``[name, ...]`` or ``{label: {...}, ...}`` as (label, entry) pairs."""
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key!r} as a list must hold names (strings)")
        pairs = [(v, {}) for v in value]
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise ConfigError(f"{where}: {key!r} must be a list of names or an object label -> settings")
    if not pairs:
        raise ConfigError(f"{where}: {key!r} is empty")
    for label, entry in pairs:
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: {key}[{label!r}] must be an object, got {entry!r}")
        if not label or "/" in label or label.startswith(".") or any(c.isspace() for c in label):
            raise ConfigError(f"{where}: {key} label {label!r} must be a plain folder name")
    if len({label for label, _ in pairs}) != len(pairs):
        raise ConfigError(f"{where}: {key!r} repeats a label")
    return pairs


def _check_model(label, entry, where) -> dict:
    entry = dict(entry)
    name = entry.pop("model", label)
    if not isinstance(name, str) or name.lower() not in MODELS:
        raise ConfigError(
            f"{where}: unknown model {name!r} (models[{label!r}]); valid models: {', '.join(sorted(MODELS))}"
        )
    name = name.lower()
    fields = set(MODELS[name][1].__dataclass_fields__)
    for key, value in entry.items():
        if key in MODEL_RESERVED:
            raise ConfigError(f"{where}: models[{label!r}] sets {key!r}: {MODEL_RESERVED[key]}")
        if key not in fields:
            raise ConfigError(
                f"{where}: models[{label!r}]: {key!r} is not a {MODELS[name][1].__name__} field; "
                f"valid fields: {', '.join(sorted(fields - set(MODEL_RESERVED)))}"
            )
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise ConfigError(
                f"{where}: models[{label!r}].{key} must be a number, string, boolean or null "
                f"(it is passed as --model-arg), got {value!r}"
            )
    return dict(model=name, fields=entry)


def _check_optimizer(label, entry, where, models) -> dict:
    unknown = sorted(set(entry) - OPTIMIZER_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: optimizers[{label!r}]: unknown key(s) {unknown}; valid keys: {', '.join(sorted(OPTIMIZER_KEYS))}"
        )
    name = entry.get("optimizer", label)
    if name not in OPTIMIZERS:
        raise ConfigError(
            f"{where}: unknown optimizer {name!r} (optimizers[{label!r}]); valid optimizers: {', '.join(OPTIMIZERS)}"
        )
    lr = entry.get("lr", DEFAULT_LR[name])
    if isinstance(lr, dict):  # per model label
        bad = sorted(set(lr) - set(models))
        if bad or not all(_is_num(v) and v > 0 for v in lr.values()):
            raise ConfigError(
                f"{where}: optimizers[{label!r}].lr as an object maps model labels "
                f"({', '.join(models)}) to positive numbers, got {lr!r}"
            )
    elif not (_is_num(lr) and lr > 0):
        raise ConfigError(f"{where}: optimizers[{label!r}].lr must be a positive number, got {lr!r}")
    adamw_lr = entry.get("adamw_lr")
    if adamw_lr is not None and not (_is_num(adamw_lr) and adamw_lr > 0):
        raise ConfigError(f"{where}: optimizers[{label!r}].adamw_lr must be a positive number, got {adamw_lr!r}")
    wd = entry.get("weight_decay", 0.0)
    if not (_is_num(wd) and wd >= 0):
        raise ConfigError(f"{where}: optimizers[{label!r}].weight_decay must be a number >= 0, got {wd!r}")
    options = entry.get("options", {})
    if not isinstance(options, dict) or not all(
        v is None or isinstance(v, (bool, int, float, str)) for v in options.values()
    ):
        raise ConfigError(
            f"{where}: optimizers[{label!r}].options must be an object of numbers, strings, "
            f"booleans or nulls (passed as --opt KEY=VALUE), got {options!r}"
        )
    return dict(optimizer=name, lr=lr, adamw_lr=adamw_lr, weight_decay=wd, options=dict(options))


def _check_seeds(seeds, where):
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) and s >= 0 for s in seeds):
        raise ConfigError(f"{where}: 'seeds' must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: 'seeds' repeats a seed: {seeds!r}")
    return list(seeds)


def _check_sweep(sweep, where):
    if not isinstance(sweep, list) or not sweep or not all(_is_num(m) and m > 0 for m in sweep):
        raise ConfigError(f"{where}: 'lr_sweep' must be a non-empty list of positive multipliers, got {sweep!r}")
    if len(set(sweep)) != len(sweep):
        raise ConfigError(f"{where}: 'lr_sweep' repeats a multiplier: {sweep!r}")
    return [float(m) for m in sweep]


def _csv(text: str, what: str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{what}: empty list")
    return items


def apply_overrides(
    cfg: dict, *, models=None, optimizers=None, seeds=None, steps=None, lr_sweep=None, threads=None
) -> dict:
    """The config with the command line's selections applied. ``models``/``optimizers``: labels of
    the config, or any valid model/optimizer name (then with its defaults)."""
    cfg = dict(cfg)
    if models is not None:
        chosen = {}
        for label in models:
            if label in cfg["models"]:
                chosen[label] = cfg["models"][label]
            elif label.lower() in MODELS:
                chosen[label] = dict(model=label.lower(), fields={})
            else:
                raise ConfigError(
                    f"unknown model {label!r}; the config has {', '.join(cfg['models'])}, "
                    f"valid model names: {', '.join(sorted(MODELS))}"
                )
        cfg["models"] = chosen
    if optimizers is not None:
        chosen = {}
        for label in optimizers:
            if label in cfg["optimizers"]:
                chosen[label] = cfg["optimizers"][label]
            elif label in OPTIMIZERS:
                chosen[label] = dict(optimizer=label, lr=DEFAULT_LR[label], adamw_lr=None, weight_decay=0.0, options={})
            else:
                raise ConfigError(
                    f"unknown optimizer {label!r}; the config has {', '.join(cfg['optimizers'])}, "
                    f"valid optimizer names: {', '.join(OPTIMIZERS)}"
                )
        cfg["optimizers"] = chosen
    if seeds is not None:
        try:
            cfg["seeds"] = _check_seeds([int(s) for s in seeds], "--seeds")
        except ValueError as e:
            raise ConfigError(f"--seeds must be integers >= 0, got {','.join(seeds)}") from e
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {steps}")
        cfg["steps"] = steps
        cfg["eval_interval"] = min(cfg["eval_interval"], steps)
    if lr_sweep is not None:
        try:
            cfg["lr_sweep"] = _check_sweep([float(m) for m in lr_sweep], "--lr-sweep")
        except ValueError as e:
            raise ConfigError(f"--lr-sweep must be positive numbers, got {','.join(lr_sweep)}") from e
    if threads is not None:
        if threads < 0:
            raise ConfigError(f"--threads must be >= 0, got {threads}")
        cfg["threads"] = threads
    return cfg


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------


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
                    argv = [
                        "--model",
                        model["model"],
                        "--optimizer",
                        opt["optimizer"],
                        "--lr",
                        repr(lr),
                        "--steps",
                        str(cfg["steps"]),
                        "--batch-size",
                        str(cfg["batch_size"]),
                        "--block-size",
                        str(cfg["block_size"]),
                        "--seed",
                        str(seed),
                        "--eval-interval",
                        str(cfg["eval_interval"]),
                        "--eval-iters",
                        str(cfg["eval_iters"]),
                        "--warmup",
                        str(cfg["warmup"]),
                        "--threads",
                        str(cfg["threads"]),
                        "--weight-decay",
                        repr(float(opt["weight_decay"])),
                        "--ckpt-interval",
                        "0",
                        "--sample-tokens",
                        "0",
                        "--no-plot",
                        "--quiet",
                        "--out",
                        folder,
                    ]
                    if opt["adamw_lr"] is not None:
                        argv += ["--adamw-lr", repr(float(opt["adamw_lr"]))]
                    for k, v in model["fields"].items():
                        argv += ["--model-arg", f"{k}={_fmt_value(v)}"]
                    for k, v in opt["options"].items():
                        argv += ["--opt", f"{k}={_fmt_value(v)}"]
                    argv += list(cfg["train_args"])
                    runs.append(
                        dict(
                            model=m_label,
                            model_name=model["model"],
                            optimizer=o_label,
                            optimizer_name=opt["optimizer"],
                            seed=seed,
                            lr_mult=mult,
                            lr=lr,
                            adamw_lr=opt["adamw_lr"]
                            if opt["adamw_lr"] is not None
                            else (lr if opt["optimizer"] == "adamw" else DEFAULT_ADAMW_LR),
                            options=opt["options"],
                            dir=folder,
                            argv=argv,
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
                )
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


class _Capture:
    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass

    def text(self):
        return "".join(self.parts)


class MemorySampler:
    """Peak resident memory of this process during a ``with`` block (see the module docstring)."""

    def __init__(self, device: str = "cpu", interval: float = 0.005):
        self.device, self.interval = device, interval
        self.peak_mb = self.base_mb = None
        self.method = None
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def _rss_mb():
        return memory.rss_mb()

    @staticmethod
    def _maxrss_mb():
        return memory.peak_rss_mb()

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base_mb, self.method = torch.cuda.memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
        elif self._rss_mb() is not None:
            self.base_mb = self.peak_mb = self._rss_mb()
            self.method = "rss (psutil, sampled every 5 ms)"
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        else:
            self.base_mb, self.method = self._maxrss_mb(), "ru_maxrss growth"
        return self

    def _loop(self):
        while not self._stop.wait(self.interval):
            v = self._rss_mb()
            if v is not None and v > self.peak_mb:
                self.peak_mb = v

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            v = self._rss_mb()
            if v is not None:
                self.peak_mb = max(self.peak_mb, v)
        else:
            self.peak_mb = self._maxrss_mb()
        return False

    @property
    def delta_mb(self):
        if self.peak_mb is None or self.base_mb is None:
            return None
        return max(0.0, self.peak_mb - self.base_mb)


def _malloc_trim():
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def read_metrics(path: str) -> list:
    return train.read_metrics(path) if os.path.exists(path) else []


def measure(metrics: list, batch_size: int, block_size: int) -> dict:
    """The numbers of one run, recomputed from its metrics lines (see the module docstring)."""
    if not metrics:
        return {}
    tail = metrics[-TAIL:]
    ce = [r.get("parts", {}).get("ce", r["train_loss"]) for r in tail]
    vals = [r for r in metrics if "val_loss" in r]
    times = sorted(r["step_time"] for r in (metrics[SKIP_TIMING:] or metrics))
    med = times[len(times) // 2]
    return dict(
        steps_done=metrics[-1]["step"],
        final_train_loss=sum(ce) / len(ce),
        final_train_objective=sum(r["train_loss"] for r in tail) / len(tail),
        final_val_loss=vals[-1]["val_loss"] if vals else float("nan"),
        initial_train_loss=metrics[0]["train_loss"],
        median_step_time=med,
        tokens_per_s=batch_size * block_size / med,
        total_time=metrics[-1]["elapsed"],
    )


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


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
    cpu = cpu_name()
    info = dict(
        cpu=cpu,
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        threads=threads or torch.get_num_threads(),
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ------------------------------------------------------------------------------------------------
# Aggregation and reports
# ------------------------------------------------------------------------------------------------


def _mean_std(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan"), 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan")), len(xs)


def aggregate(records: list, cfg: dict) -> dict:
    """model -> optimizer -> {lr multiplier (str) -> seed statistics, "best": multiplier}."""
    out = {}
    for r in records:
        cell = out.setdefault(r["model"], {}).setdefault(r["optimizer"], {"by_lr": {}})
        cell["by_lr"].setdefault(f"{r['lr_mult']:g}", []).append(r)
    for model, opts in out.items():
        for label, cell in opts.items():
            stats = {}
            for mult, rs in cell["by_lr"].items():
                val, val_sd, n = _mean_std([r.get("final_val_loss") for r in rs])
                tr, tr_sd, _ = _mean_std([r.get("final_train_loss") for r in rs])
                times = [r["median_step_time"] for r in rs if r.get("median_step_time")]
                mems = [r["peak_memory_delta_mb"] for r in rs if r.get("peak_memory_delta_mb") is not None]
                stats[mult] = dict(
                    lr=rs[0]["lr"],
                    seeds=[r["seed"] for r in rs],
                    n_finite=n,
                    final_val_loss=val,
                    final_val_std=val_sd,
                    final_train_loss=tr,
                    final_train_std=tr_sd,
                    median_step_time=statistics.median(times) if times else float("nan"),
                    tokens_per_s=(cfg["batch_size"] * cfg["block_size"] / statistics.median(times))
                    if times
                    else float("nan"),
                    peak_memory_delta_mb=max(mems) if mems else None,
                    statuses=sorted({r["status"] for r in rs}),
                )
            finite = {m: s for m, s in stats.items() if math.isfinite(s["final_val_loss"])}
            best = min(finite, key=lambda m: finite[m]["final_val_loss"]) if finite else next(iter(stats))
            cell.clear()
            cell.update(by_lr=stats, best=best)
    return out


def _f(x, fmt="{:.4f}"):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def markdown_tables(agg: dict, cfg: dict, n_params: dict, plots: dict, names: dict) -> str:
    lines = []
    for model, opts in agg.items():
        desc = (
            ", ".join(f"{k}={v}" for k, v in cfg["models"][model]["fields"].items()) if model in cfg["models"] else ""
        )
        params = f"; {n_params[model] / 1e6:.2f}M params" if model in n_params else ""
        lines += [f"## {model} ({names.get(model, model)}{', ' + desc if desc else ''}{params})", ""]
        base_label = "adamw" if "adamw" in opts else next((o for o in opts if names.get(o) == "adamw"), None)
        base = opts[base_label]["by_lr"][opts[base_label]["best"]] if base_label else None
        seeds = max(len(c["by_lr"][c["best"]]["seeds"]) for c in opts.values())
        lines += [
            f"| optimizer | lr | final train loss | final val loss (mean ± std, {seeds} seed{'s' * (seeds > 1)}) "
            f"| vs AdamW (val) | time/step | vs AdamW (time) | tokens/s | peak RSS Δ |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, cell in opts.items():
            s = cell["by_lr"][cell["best"]]
            val = _f(s["final_val_loss"]) + (
                "" if not math.isfinite(s["final_val_std"]) else f" ± {s['final_val_std']:.4f}"
            )
            if s["n_finite"] < len(s["seeds"]):
                val += f" ({len(s['seeds']) - s['n_finite']} of {len(s['seeds'])} diverged/failed)"
            d_val = (
                _f(s["final_val_loss"] - base["final_val_loss"], "{:+.4f}")
                if base and label != base_label
                else ("baseline" if base else "n/a")
            )
            ratio = (
                _f(s["median_step_time"] / base["median_step_time"], "{:.2f}x")
                if base and label != base_label
                else ("1.00x" if base else "n/a")
            )
            mem = _f(s["peak_memory_delta_mb"], "{:.0f} MiB")
            lines.append(
                f"| {label} | {s['lr']:.3g} | {_f(s['final_train_loss'])} | {val} | {d_val} | "
                f"{_f(s['median_step_time'] * 1000, '{:.1f} ms')} | {ratio} | {_f(s['tokens_per_s'], '{:.0f}')} "
                f"| {mem} |"
            )
        lines.append("")
        mults = sorted({float(m) for c in opts.values() for m in c["by_lr"]})
        if len(mults) > 1:
            lines += [
                "LR sweep (final val loss, mean over seeds; the best, bold, is the row above):",
                "",
                "| optimizer | base lr | " + " | ".join(f"x{m:g}" for m in mults) + " |",
                "|---|---|" + "---|" * len(mults),
            ]
            for label, cell in opts.items():
                row = []
                for m in mults:
                    s = cell["by_lr"].get(f"{m:g}")
                    v = (
                        "-"
                        if s is None
                        else ("diverged" if not math.isfinite(s["final_val_loss"]) else f"{s['final_val_loss']:.4f}")
                    )
                    row.append(f"**{v}**" if s is not None and f"{m:g}" == cell["best"] else v)
                base_lr = cell["by_lr"][cell["best"]]["lr"] / float(cell["best"])
                lines.append(f"| {label} | {base_lr:.3g} | " + " | ".join(row) + " |")
            lines.append("")
        if plots.get(model):
            lines += [f"![{model} loss curves]({os.path.basename(plots[model])})", ""]
    return "\n".join(lines)


def plot_model(model: str, records: list, agg_model: dict, png: str) -> str | None:
    """All optimizers (at their best lr) of one model: training CE (EMA-smoothed, mean over seeds)
    and val loss against step, and val loss against wall-clock seconds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plots (pip install matplotlib)", file=sys.stderr)
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, cell) in enumerate(agg_model.items()):
        best = cell["best"]
        runs = [r for r in records if r["model"] == model and r["optimizer"] == label and f"{r['lr_mult']:g}" == best]
        curves = [read_metrics(r["metrics"]) for r in runs]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        color = colors[i % len(colors)]
        steps = [curves[0][j]["step"] for j in range(n)]
        ce = [statistics.fmean(c[j].get("parts", {}).get("ce", c[j]["train_loss"]) for c in curves) for j in range(n)]
        smooth, acc = [], None
        for v in ce:
            acc = v if acc is None or not math.isfinite(acc) else 0.9 * acc + 0.1 * v
            smooth.append(acc)
        ax1.plot(steps, smooth, color=color, lw=1.2, label=f"{label} (lr {cell['by_lr'][best]['lr']:.3g})")
        val_steps = [j for j in range(n) if all("val_loss" in c[j] for c in curves)]
        if val_steps:
            vs = [steps[j] for j in val_steps]
            vv = [statistics.fmean(c[j]["val_loss"] for c in curves) for j in val_steps]
            vt = [statistics.fmean(c[j]["elapsed"] for c in curves) for j in val_steps]
            ax1.plot(vs, vv, "o", color=color, ms=3)
            ax2.plot(vt, vv, "o-", color=color, ms=3, lw=1, label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy (nats/token)")
    ax1.set_title(f"{model}: train CE (EMA 0.9, line), val (dots); mean over seeds")
    ax2.set_xlabel("wall-clock seconds (incl. evaluation)")
    ax2.set_ylabel("val loss")
    ax2.set_title(f"{model}: val loss vs time")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        lo, hi = ax.get_ylim()
        ax.set_ylim(max(lo, 0.0), min(hi, 6.0))
    ax1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_reports(out: str, cfg: dict, records: list, n_params: dict, meta: dict, *, plots: bool = True) -> dict:
    """``results.json``, ``results.md`` and the plots from the records so far."""
    agg = aggregate(records, cfg)
    names = {m: cfg["models"][m]["model"] for m in cfg["models"]}
    names.update({o: cfg["optimizers"][o]["optimizer"] for o in cfg["optimizers"]})
    pngs = {}
    if plots:
        for model in agg:
            pngs[model] = plot_model(model, records, agg[model], os.path.join(out, f"loss_{model}.png"))
    result = dict(
        meta,
        config={k: v for k, v in cfg.items()},
        n_params=n_params,
        plots=pngs,
        curves="each run's per-step curves: <run dir>/metrics.jsonl (one JSON line per step: step, "
        "train_loss (objective), parts.ce, lr, step_time, tokens_per_s, elapsed; val_loss on "
        "evaluation steps); 'metrics' in each run record",
        measurements=__doc__.split("What is measured")[1].split("Configs are JSON")[0].strip(" (:\n"),
        runs=records,
        summary=agg_summary(agg),
    )
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(_json_safe(result), f, indent=2)
    os.replace(tmp, os.path.join(out, "results.json"))
    m = meta["machine"]
    head = [
        f"# Experiment results: {cfg['source']}",
        "",
        f"{cfg['description']}" if cfg["description"] else "",
        f"Command: `{meta['command']}`",
        "",
        f"{cfg['steps']} steps x batch {cfg['batch_size']} x block {cfg['block_size']} tokens, warmup "
        f"{cfg['warmup']}, eval every {cfg['eval_interval']} steps on {cfg['eval_iters']} batches; seeds "
        f"{', '.join(map(str, cfg['seeds']))}"
        + (f"; LR sweep x{', x'.join(f'{x:g}' for x in cfg['lr_sweep'])}" if cfg["lr_sweep"] else "")
        + ".",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, {m['threads']} threads, device "
        f"{m['device']}; load average at start {meta.get('load_start')}, at end {meta.get('load_end')}.",
        "",
        "final train loss: training cross-entropy, mean of the last 20 steps; final val loss: the last "
        "evaluation; time/step: median over the steps after the first 5 (evaluation excluded); peak RSS Δ: "
        "the run's peak resident memory above the process's before it (see results.json 'measurements').",
        "",
    ]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(head) + "\n" + markdown_tables(agg, cfg, n_params, pngs, names))
        f.write(head_maps.report_section(out, records))
    return result


def agg_summary(agg: dict) -> dict:
    return {
        model: {
            label: dict(
                best_lr_mult=float(cell["best"]),
                **cell["by_lr"][cell["best"]],
                sweep={m: s["final_val_loss"] for m, s in cell["by_lr"].items()},
            )
            for label, cell in opts.items()
        }
        for model, opts in agg.items()
    }


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


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compositional_muon.experiments",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="shipped configs: " + ", ".join(shipped_configs()),
    )
    p.add_argument("--config", default="seed003", help="a shipped config name or a JSON file (default: seed003)")
    p.add_argument(
        "--models", help=f"comma-separated model labels of the config, or model names ({', '.join(sorted(MODELS))})"
    )
    p.add_argument(
        "--optimizers",
        help=f"comma-separated optimizer labels of the config, or optimizer names ({', '.join(OPTIMIZERS)})",
    )
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--steps", type=int, help="training steps of every run")
    p.add_argument(
        "--lr-sweep",
        help="comma-separated multipliers of each optimizer's lr, e.g. 0.5,1,2; the "
        "best by final val loss (mean over seeds) is reported",
    )
    p.add_argument("--out", help="output folder (default: runs/experiments/<config name>)")
    p.add_argument("--threads", type=int, help="torch CPU threads for every run (0: torch's default)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip runs whose summary.json exists; continue a run interrupted with Ctrl-C from its checkpoint",
    )
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show each run's training log")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        cfg = apply_overrides(
            cfg,
            models=_csv(args.models, "--models") if args.models else None,
            optimizers=_csv(args.optimizers, "--optimizers") if args.optimizers else None,
            seeds=_csv(args.seeds, "--seeds") if args.seeds else None,
            steps=args.steps,
            lr_sweep=_csv(args.lr_sweep, "--lr-sweep") if args.lr_sweep else None,
            threads=args.threads,
        )
        name = os.path.splitext(os.path.basename(cfg["source"]))[0]
        out = args.out or os.path.join("runs", "experiments", name)
        if args.dry_run:
            runs = plan_runs(cfg, out)
            preflight(cfg, runs)
            for r in runs:
                print(f"{r['dir']}: cm-train {' '.join(r['argv'])}")
            print(f"{len(runs)} runs")
            return 0
        command = "python -m compositional_muon.experiments " + " ".join(argv)
        result = run_grid(
            cfg, out, resume=args.resume, verbose=args.verbose, command=command.strip(), plots=not args.no_plot
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished runs are in results.json; continue with --resume", file=sys.stderr)
        return 130
    print(f"{len(result['runs'])} runs in {result['wall_time_s']:.0f} s; results in {out}/results.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
