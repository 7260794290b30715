"""``python -m compositional_muon.experiments``: run a grid of models x optimizers x seeds
(optionally x learning rates), or ``... experiments study ...`` (see :mod:`.study`)."""

from __future__ import annotations

import argparse
import os
import sys

from ..models import MODELS
from ..recipes import OPTIMIZERS
from .config import ConfigError, _csv, apply_overrides, load_config, shipped_configs
from .grid import plan_runs, preflight, run_grid

__all__ = ["build_parser", "main"]

_DESCRIPTION = "Run a grid of models x optimizers x seeds (optionally x learning rates) and compare them."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compositional_muon.experiments",
        description=_DESCRIPTION,
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
    if argv[:1] == ["study"]:
        from .study_cli import main as study_main

        return study_main(argv[1:])
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
