"""The layout rules (scripts/check_layout.py) hold, and the checker catches violations."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_layout", ROOT / "scripts" / "check_layout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_source_tree_follows_the_layout_rules():
    checker = _checker()
    assert checker.check() == []
    assert checker.stale_exceptions() == []


def test_checker_reports_a_recorded_exception_that_excuses_nothing():
    checker = _checker()
    checker.EXCEPTIONS["msign.py"] = "pretend msign.py were too long"
    assert checker.stale_exceptions() == ["msign.py: recorded exception no longer needed"]
    assert checker.main() == 1


def test_checker_reports_training_imports_and_long_code(tmp_path):
    pkg = tmp_path / "compositional_muon"
    (pkg / "training").mkdir(parents=True)
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "good.py").write_text("from .cm import x\n")
    (pkg / "bad_rel.py").write_text("from .training import models\n")
    (pkg / "bad_abs.py").write_text("import compositional_muon.training.data\n")
    (pkg / "sub").mkdir()
    (pkg / "sub" / "deep.py").write_text("from ..training.models import build_model\n")
    (pkg / "long.py").write_text("def f():\n" + "    x = 1\n" * 70 + "\n" * 400)
    problems = _checker().check(pkg)
    text = "\n".join(problems)
    assert "bad_rel.py: the library imports the training tools" in text
    assert "bad_abs.py: the library imports the training tools" in text
    assert "sub/deep.py: the library imports the training tools" in text
    assert "long.py:f: 71 lines" in text and "long.py: 471 lines" in text
    assert "good.py" not in text


def test_importing_the_library_does_not_load_the_training_tools():
    code = textwrap.dedent(
        """
        import importlib, pathlib, sys
        import compositional_muon as cm
        root = pathlib.Path(cm.__file__).parent
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root).with_suffix("")
            if rel.parts[0] in ("training", "integrations") or rel.as_posix() in ("train", "experiments"):
                continue  # the training tools, their `python -m` aliases, the optional framework adapters
            parts = [p for p in rel.parts if p != "__init__"]
            importlib.import_module(".".join(["compositional_muon", *parts]))
        loaded = sorted(n for n in sys.modules if n.startswith("compositional_muon.training"))
        print(loaded)
        sys.exit(1 if loaded else 0)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
