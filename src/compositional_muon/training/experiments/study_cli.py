"""``python -m compositional_muon.experiments study ...``: run a study config and report it."""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError
from .study import Results, run_study
from .study_config import load_study

__all__ = ["build_parser", "main", "default_results_path"]


def default_results_path(name: str) -> str:
    return os.path.join("docs", "results", "study", f"{name}.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compositional_muon.experiments study",
        description="Run (or continue) an optimizer study and write its tables.",
    )
    p.add_argument("--config", required=True, help="a shipped study config (e.g. study_small) or a JSON file")
    p.add_argument("--cells", help="comma-separated cell names to run (default: all, in order)")
    p.add_argument("--seeds", help="comma-separated seeds: run only these seeds of the cells (a slice of the study)")
    p.add_argument("--results", help="results JSON (default: docs/results/study/<name>.json)")
    p.add_argument("--work", default=os.path.join("runs", "study"), help="run folders (metrics, checkpoints)")
    p.add_argument("--report", action="store_true", help="only write the tables from the results file")
    p.add_argument("--tables", help="markdown output (default: next to the results, <name>.md)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        study = load_study(args.config)
        path = args.results or default_results_path(study.name)
        cells = [c.strip() for c in args.cells.split(",") if c.strip()] if args.cells else None
        if args.report:
            if not os.path.exists(path):
                raise ConfigError(f"no results file {path!r}; run the study first (without --report)")
            results = Results(path, study)
        else:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else None
            results = run_study(study, path, cells=cells, seeds=seeds, work=args.work)
        from .study_report import write_tables

        md = write_tables(study, results, args.tables or os.path.splitext(path)[0] + ".md")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished runs are in the results file; run the same command to continue", file=sys.stderr)
        return 130
    print(f"tables in {md}", file=sys.stderr)
    return 0
