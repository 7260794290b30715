"""Study configs: one model, a set of labelled optimizers, and cells (a horizon, seeds, and
learning rates given, swept, or taken from an earlier sweep's best) run in order.

    {
      "description": "...",
      "model": {"model": "gpt", "n_layer": 2, "n_embd": 128, "n_head": 4},
      "batch_size": 8, "block_size": 64, "warmup": 20, "threads": 1,
      "eval_points": 10,            # evaluations per run (every steps/eval_points steps)
      "eval_windows": 256,          # fixed validation windows (a multiple of batch_size)
      "adamw_lr": 0.003,            # embeddings, head and gains of every matrix optimizer
      "optimizers": {"muon": {"optimizer": "muon"}, "cm": {"optimizer": "cm", "options": {...}}},
      "cells": [
        {"name": "sweep200", "steps": 200, "seeds": [0], "lrs": {"muon": [0.01, 0.02, 0.04, 0.08]},
         "extend_edges": 2},
        {"name": "sweep1000", "steps": 1000, "seeds": [0], "lrs_around": {"cell": "sweep200", "mults": [0.5, 1, 2]}},
        {"name": "h200", "steps": 200, "seeds": [0, 1, 2], "lr_from": "sweep200"}
      ]
    }

A cell's ``optimizers`` (default: all) selects labels. ``lrs`` lists each optimizer's learning
rates; ``extend_edges: k`` adds up to ``k`` points (one grid ratio further) while the best is at an
edge of the grid, so the reported optimum is interior. ``lrs_around`` multiplies another cell's
best; ``lr_from`` uses another cell's best (``lr_label``: the best of that optimizer label for
every optimizer of the cell, e.g. CM's lr for CM without Nesterov). ``compare_with`` (report only)
pairs the cell's runs with an earlier cell's runs of the same steps, by seed. (``"cell"`` or ``"study_name:cell"`` for a cell of
another study's results). The best learning rate is the one with the lowest mean final validation
loss over the cell's seeds.
"""

from __future__ import annotations

import dataclasses
import json
import os

from ..models import MODELS
from ..recipes import OPTIMIZERS
from .config import ConfigError, _read_config_text

__all__ = ["StudyConfig", "OptimizerSpec", "CellSpec", "load_study"]

STUDY_KEYS = {
    "description",
    "model",
    "batch_size",
    "block_size",
    "warmup",
    "threads",
    "eval_points",
    "eval_windows",
    "adamw_lr",
    "optimizers",
    "cells",
    "data",
}
CELL_KEYS = {
    "name",
    "steps",
    "seeds",
    "optimizers",
    "lrs",
    "extend_edges",
    "lrs_around",
    "lr_from",
    "lr_label",
    "compare_with",
}


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    label: str
    name: str
    options: dict


@dataclasses.dataclass(frozen=True)
class CellSpec:
    name: str
    steps: int
    seeds: tuple[int, ...]
    optimizers: tuple[str, ...]
    lrs: dict  # label -> list of lrs (given), or {}
    extend_edges: int
    lrs_around: dict | None  # {"cell": ..., "mults": [...]}
    lr_from: str | None
    lr_label: str | None = None  # take the best lr of this optimizer label instead of each one's own
    compare_with: str | None = None  # report: pair with this earlier cell's runs (same steps and seeds)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    name: str
    source: str
    description: str
    model: str
    model_fields: dict
    batch_size: int
    block_size: int
    warmup: int
    threads: int
    eval_points: int
    eval_windows: int
    adamw_lr: float
    data: str | None
    optimizers: dict  # label -> OptimizerSpec
    cells: tuple[CellSpec, ...]

    def cell(self, name: str) -> CellSpec:
        for c in self.cells:
            if c.name == name:
                return c
        raise ConfigError(f"study {self.name!r} has no cell {name!r}; cells: {', '.join(c.name for c in self.cells)}")


def _pos_int(raw: dict, key: str, where: str, default=None, minimum: int = 1) -> int:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{where}: {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def _pos_num(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
        raise ConfigError(f"{what} must be a positive number, got {v!r}")
    return float(v)


def load_study(name_or_path: str) -> StudyConfig:
    """Read and check a study config (a shipped name such as ``"study_small"`` or a JSON path)."""
    text, source = _read_config_text(name_or_path)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"study {source!r} is not valid JSON: {e.msg} at line {e.lineno}") from e
    return parse_study(raw, source)


def parse_study(raw, source: str = "<dict>") -> StudyConfig:
    where = f"study {source!r}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a JSON object")
    unknown = sorted(set(raw) - STUDY_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(STUDY_KEYS))}")
    model = dict(raw.get("model") or {})
    name = str(model.pop("model", "gpt")).lower()
    if name not in MODELS:
        raise ConfigError(f"{where}: unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    batch = _pos_int(raw, "batch_size", where, 8)
    windows = _pos_int(raw, "eval_windows", where, 256)
    if windows % batch:
        raise ConfigError(f"{where}: eval_windows {windows} must be a multiple of batch_size {batch}")
    opts = _optimizers(raw.get("optimizers"), where)
    cells = _cells(raw.get("cells"), where, opts)
    return StudyConfig(
        name=os.path.splitext(os.path.basename(source))[0],
        source=source,
        description=str(raw.get("description", "")),
        model=name,
        model_fields=model,
        batch_size=batch,
        block_size=_pos_int(raw, "block_size", where, 64),
        warmup=_pos_int(raw, "warmup", where, 20, minimum=0),
        threads=_pos_int(raw, "threads", where, 1, minimum=0),
        eval_points=_pos_int(raw, "eval_points", where, 10),
        eval_windows=windows,
        adamw_lr=_pos_num(raw.get("adamw_lr", 0.003), f"{where}: adamw_lr"),
        data=raw.get("data"),
        optimizers=opts,
        cells=cells,
    )


def _optimizers(value, where: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: 'optimizers' must be a non-empty object label -> {{optimizer, options}}")
    out = {}
    for label, entry in value.items():
        if not isinstance(entry, dict) or set(entry) - {"optimizer", "options"}:
            raise ConfigError(f"{where}: optimizers[{label!r}] takes only 'optimizer' and 'options'")
        name = entry.get("optimizer", label)
        if name not in OPTIMIZERS:
            raise ConfigError(
                f"{where}: optimizers[{label!r}]: unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}"
            )
        options = entry.get("options", {})
        if not isinstance(options, dict):
            raise ConfigError(f"{where}: optimizers[{label!r}].options must be an object")
        out[label] = OptimizerSpec(label, name, dict(options))
    return out


def _lr_label(raw: dict, where: str, opts: dict) -> str | None:
    label = raw.get("lr_label")
    if label is not None and label not in opts:
        raise ConfigError(f"{where}: lr_label {label!r} is not an optimizer label of the study")
    if label is not None and "lrs" in raw:
        raise ConfigError(f"{where}: lr_label goes with 'lr_from' or 'lrs_around', not 'lrs'")
    return label


def _compare_with(raw: dict, where: str, cells: list) -> str | None:
    name = raw.get("compare_with")
    if name is None:
        return None
    earlier = {c.name: c for c in cells}
    if name not in earlier or earlier[name].steps != raw.get("steps"):
        raise ConfigError(f"{where}: compare_with {name!r} must name an earlier cell with the same steps")
    return name


def _cells(value, where: str, opts: dict) -> tuple:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: 'cells' must be a non-empty list")
    cells: list[CellSpec] = []
    for i, raw in enumerate(value):
        w = f"{where}: cells[{i}]"
        if not isinstance(raw, dict) or set(raw) - CELL_KEYS:
            raise ConfigError(f"{w}: must be an object with keys among {', '.join(sorted(CELL_KEYS))}")
        name = raw.get("name")
        if not isinstance(name, str) or not name or any(c in name for c in "/: ") or name in {c.name for c in cells}:
            raise ConfigError(f"{w}: 'name' must be a new plain name, got {name!r}")
        labels = tuple(raw.get("optimizers", list(opts)))
        bad = [lab for lab in labels if lab not in opts]
        if bad:
            raise ConfigError(f"{w}: unknown optimizer label(s) {bad}; the study has {', '.join(opts)}")
        seeds = raw.get("seeds", [0])
        if (
            not isinstance(seeds, list)
            or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
        ):
            raise ConfigError(f"{w}: 'seeds' must be a non-empty list of integers >= 0")
        sources = [k for k in ("lrs", "lrs_around", "lr_from") if k in raw]
        if len(sources) != 1:
            raise ConfigError(f"{w}: give exactly one of 'lrs', 'lrs_around', 'lr_from' (got {sources or 'none'})")
        lrs = {lab: [_pos_num(v, f"{w}: lrs[{lab!r}]") for v in raw.get("lrs", {}).get(lab, [])] for lab in labels}
        if "lrs" in raw and not all(lrs.values()):
            raise ConfigError(
                f"{w}: 'lrs' needs a non-empty list for every optimizer of the cell ({', '.join(labels)})"
            )
        around = raw.get("lrs_around")
        if around is not None:
            if not isinstance(around, dict) or set(around) != {"cell", "mults"} or not around["mults"]:
                raise ConfigError(f"{w}: 'lrs_around' must be {{'cell': name, 'mults': [positive numbers]}}")
            around = dict(cell=around["cell"], mults=[_pos_num(m, f"{w}: lrs_around.mults") for m in around["mults"]])
        cells.append(
            CellSpec(
                name=name,
                steps=_pos_int(raw, "steps", w),
                seeds=tuple(seeds),
                optimizers=labels,
                lrs=lrs if "lrs" in raw else {},
                extend_edges=_pos_int(raw, "extend_edges", w, 0, minimum=0),
                lrs_around=around,
                lr_from=raw.get("lr_from"),
                lr_label=_lr_label(raw, w, opts),
                compare_with=_compare_with(raw, w, cells),
            )
        )
    return tuple(cells)
