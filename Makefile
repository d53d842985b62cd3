# Everything a fresh machine needs: `make run` and `make test` create .venv and install first.
PYTHON ?= $(shell command -v python3.11 || echo python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bdcore-installed

.PHONY: install run test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-installs only when pyproject.toml changes; the package itself is editable. --no-compile: byte-compiling
# every installed module (torch's thousands) took ~60 s of a 2.4 min install; Python compiles what it imports.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job: the quick grid (digits + smallcnn, badnet + blended at 2 ratios, none + ft) on a
# local Ray instance; re-running it resumes and repeats nothing.
run: install
	$(VENV)/bin/bdsweep run grids/quickstart.yaml --out runs/quickstart

test: install
	$(PY) -m pytest -q --durations=10

bench: install
	$(PY) bench/train_throughput.py
	$(PY) bench/engine_overhead.py

clean:
	rm -rf runs .pytest_cache
