"""Grid configs of the experiments runner: reading, checking and command-line overrides.

Configs are JSON (see ``compositional_muon/training/configs/seed003.json`` and ``docs/results.md``).
"""

from __future__ import annotations

import json
import math
import os

from ..models import MODELS
from ..recipes import DEFAULT_LR, OPTIMIZERS

__all__ = ["ConfigError", "load_config", "normalize_config", "apply_overrides", "shipped_configs", "DEFAULTS"]

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


class ConfigError(ValueError):
    """A bad config file, or a bad model/optimizer/seed selection."""


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


def _configs_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


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
