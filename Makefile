# Optimization, Regularization and PEFT: the two commands are `make course` and `make test`.
# Everything runs from .venv, created on first use (torch first, as $(TORCH_SPEC), so no other package
# can pull a multi-GB CUDA build). Override the interpreter with PYTHON=..., torch with TORCH_SPEC=...

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(abspath $(VENV))/bin
PY := $(BIN)/python
STAMP := $(VENV)/.course-installed
# nbgrader runs alembic from PATH when it creates a gradebook.
export PATH := $(BIN):$(PATH)
export PYTHONDONTWRITEBYTECODE = 1
ASSIGNMENTS = $(sort $(notdir $(patsubst %/,%,$(wildcard solutions/[0-9]*/))))
PYTEST_ARGS ?=
JOBS ?= 2

.PHONY: help setup course course-full test portability seeds lab release sync outputs bench grade formgrader browser-check clean

help:
	@echo "make course      run every notebook (fast mode) with papermill into runs/<timestamp>/"
	@echo "make test        the whole test suite (unit, notebooks, grading, lint)"
	@echo "make portability the scenario tests under native, pinned and the oldest CPU kernels"
	@echo "make seeds       the scenario tests on 20 seeds instead of 5"
	@echo "make lab         JupyterLab on notebooks/ (the learner notebooks)"
	@echo "make release     notebooks/ from solutions/ (nbgrader) + the grader's expected values (grading/expected/)"
	@echo "make grade SUBMISSIONS=<dir or .zip>  autograde a class -> grading/grades.csv, report.md, feedback/"
	@echo "make sync        restamp the Colab badge and setup cell of every notebook"
	@echo "make course-full the same as course, in full mode"
	@echo "make outputs     re-execute solutions/ to refresh nbval's reference outputs"
	@echo "make bench       speed and memory benchmarks -> bench/results.md"
	@echo "make formgrader  nbgrader's formgrader (hand-grade the recipe notes) on the course in grading/"
	@echo "make browser-check  Run All of a learner notebook in headless Chromium (NB=00; not in CI)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install -q "$(TORCH_SPEC)" 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install -q -e ".[all]" 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, course_lib, papermill, nbgrader, nbval; print('torch', torch.__version__, '| course_lib', course_lib.__version__)"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (course)" >/dev/null
	@touch $(STAMP)

setup: $(STAMP)

course: setup
	COURSE_FAST=1 $(PY) tools/run_course.py

course-full: setup
	$(PY) tools/run_course.py --full

# The regression kernel environment (fast mode, CPU, one thread, no progress bars, CPU kernels pinned to AVX2 so
# that reference outputs hold on any x86-64 CPU with AVX2): one definition, course_lib.runtime.KERNEL_ENV.
NB_ENV = $(shell $(PY) -c 'import shlex; from course_lib.runtime import KERNEL_ENV as e; print(" ".join(f"{k}={shlex.quote(v)}" for k, v in e.items()))')
# What the library dispatchers would pick on an AVX2-only CPU (no AVX-512); with the pins, nothing may change.
AVX2_CPU = MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
# The oldest kernels (no AVX2): other float rounding, for the scenario margins (never for reference outputs).
OLD_KERNELS = ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_CBWR=COMPATIBLE
# The notebooks nbval also replays under AVX2_CPU (the ones whose outputs moved on another CPU before the pins).
PORTABLE_SLICE = solutions/00_recipe_demo solutions/07_memory_precision solutions/08_hparam_search

test: setup
	$(PY) -m ruff check course_lib tests tools bench grading_cli solutions conftest.py
	$(NB_ENV) $(PY) -m pytest -n $(JOBS) --durations=20 -q $(PYTEST_ARGS) tests
	@echo "nbval: re-run the solution notebooks and compare every output with the stored reference"
	$(NB_ENV) $(PY) -m pytest -n $(JOBS) --dist loadfile -q $(PYTEST_ARGS) solutions \
		--nbval --nbval-sanitize-with tests/nbval_sanitize.cfg
	@echo "portable numerics: a slice of nbval as on an AVX2-only CPU, and the scenario margins with the oldest kernels"
	$(NB_ENV) $(AVX2_CPU) $(PY) -m pytest -n $(JOBS) --dist loadfile -q $(PYTEST_ARGS) $(PORTABLE_SLICE) \
		--nbval --nbval-sanitize-with tests/nbval_sanitize.cfg
	$(NB_ENV) $(OLD_KERNELS) $(PY) -m pytest -n $(JOBS) -q $(PYTEST_ARGS) tests/test_scenario_*.py

# The scenario tests under native, pinned (avx2) and the oldest (default) CPU kernels: their margins must hold
# under each (CI runs the pinned and the oldest; run this on a new machine or after changing a scenario).
portability: setup
	$(NB_ENV) env -u ATEN_CPU_CAPABILITY -u ONEDNN_MAX_CPU_ISA -u MKL_CBWR -u NPY_DISABLE_CPU_FEATURES \
		$(PY) -m pytest -n $(JOBS) -q $(PYTEST_ARGS) tests/test_scenario_*.py
	$(NB_ENV) $(PY) -m pytest -n $(JOBS) -q $(PYTEST_ARGS) tests/test_scenario_*.py
	$(NB_ENV) $(OLD_KERNELS) $(PY) -m pytest -n $(JOBS) -q $(PYTEST_ARGS) tests/test_scenario_*.py

# The scenario tests on seeds 0-19 instead of 0-4 (pinned kernels; prefix OLD_KERNELS' values for others).
seeds: setup
	$(NB_ENV) COURSE_TEST_SEEDS=20 $(PY) -m pytest -n $(JOBS) -q $(PYTEST_ARGS) tests/test_scenario_*.py

# Refresh the reference outputs of the solution notebooks after an intended change (then review and commit).
outputs: setup
	$(PY) tools/refresh_outputs.py

lab: setup
	$(BIN)/jupyter lab notebooks/

# Formgrader: JupyterLab in the course root with the venv's bin/ on PATH (nbgrader runs alembic from it), a
# complete gradebook (a half-made one is repaired), every assignment in it and the exchange folder made first;
# --allow-root only when run as root. LAB_ARGS e.g. "--no-browser --port 8899".
formgrader: setup
	$(PY) tools/formgrader.py -- $(LAB_ARGS)

# A real browser (system chromium, Playwright) runs all cells of a learner notebook in fast mode, saves, reloads,
# and fails on a stopped run, an error box or a widget error. Installs chromium (apt) and playwright (pip) if
# missing. Not part of `make test`. NB=00 picks notebooks/00_*; ARGS=--plant-error checks that a planted failing
# cell is caught.
NB ?= 00
ARGS ?=
browser-check: setup
	$(PY) tools/browser_check.py $(NB) $(ARGS)

release: setup
	$(PY) -m grading_cli release $(ASSIGNMENTS)

# Grade a class: collect -> repair -> run each submission in a sandbox (Dask, all cores) -> gradebook,
# feedback, grading/grades.csv and grading/report.md. GRADE_ARGS e.g. "--scheduler tcp://host:8786".
grade: setup
	@test -n "$(SUBMISSIONS)" || { echo "usage: make grade SUBMISSIONS=<folder or .zip> [GRADE_ARGS=...]"; exit 2; }
	$(PY) -m grading_cli grade "$(SUBMISSIONS)" $(GRADE_ARGS)

sync: setup
	$(PY) tools/sync_notebooks.py

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf runs .pytest_cache grading/gradebook.db
