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

The package: :mod:`.config` (grid configs), :mod:`.grid` (planning and running), :mod:`.measure`
(per-run numbers, memory), :mod:`.report` (tables and plots), :mod:`.cli`; the optimizer study in
:mod:`.study_config`, :mod:`.study`, :mod:`.study_report` and :mod:`.study_cli`.
"""

from .. import train
from .cli import build_parser, main
from .config import ConfigError, apply_overrides, load_config, normalize_config, shipped_configs
from .grid import execute, plan_runs, preflight, run_grid
from .measure import MemorySampler, cpu_name, machine_info, measure, read_metrics
from .report import aggregate, write_reports

__all__ = [
    "ConfigError",
    "load_config",
    "normalize_config",
    "apply_overrides",
    "plan_runs",
    "preflight",
    "execute",
    "run_grid",
    "aggregate",
    "write_reports",
    "build_parser",
    "main",
    "shipped_configs",
    "MemorySampler",
    "measure",
    "read_metrics",
    "machine_info",
    "cpu_name",
    "train",
]
