# The two set-up commands (see README): `make demo` trains the demo, `make test` runs the suite.
# `make demo` continues (or reprints) an existing runs/demo, never overwrites it.
# Both create .venv on first use (scripts/bootstrap.sh picks the CPU torch build without a GPU).
.PHONY: demo test bench experiments lint study

demo:
	scripts/bootstrap.sh train
	.venv/bin/python -m compositional_muon.train --out runs/demo --resume auto

test:
	scripts/bootstrap.sh test
	.venv/bin/python -m pytest -q

bench:
	scripts/bootstrap.sh
	.venv/bin/python bench/step_time.py

experiments:
	scripts/bootstrap.sh train
	.venv/bin/python -m compositional_muon.experiments

# ruff (lint + format check), mypy (config in pyproject.toml) and the layout rules (scripts/check_layout.py)
lint:
	scripts/bootstrap.sh lint
	.venv/bin/ruff check src tests bench scripts
	.venv/bin/ruff format --check src tests bench scripts
	.venv/bin/mypy
	.venv/bin/python scripts/check_layout.py

# The optimizer study (docs/results.md): runs or continues both configs, then writes the tables.
study:
	scripts/bootstrap.sh train
	.venv/bin/python -m compositional_muon.experiments study --config study_small
	.venv/bin/python -m compositional_muon.experiments study --config study_wide
