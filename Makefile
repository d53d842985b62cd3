# Everything a fresh machine needs: `make run` and `make test` create .venv and install first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bdcore-installed

.PHONY: install run test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-installs only when pyproject.toml changes; the package itself is editable.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/bdsweep cell --dataset digits --model smallcnn --attack badnet --ratio 0.1 --defense ft --out runs/quickstart

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/train_throughput.py

clean:
	rm -rf runs .pytest_cache
