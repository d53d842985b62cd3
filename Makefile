# Everything a fresh machine needs: `make run` and `make test` create .venv and install first.
PYTHON ?= $(shell command -v python3.11 || echo python3)
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

# The quick cell (until grid sweeps land): badnet at 10% on digits, then ft with the digits-sized
# settings stated in the README (20% clean data, 30 epochs, batch 64, lr 0.05).
run: install
	$(VENV)/bin/bdsweep cell --dataset digits --model smallcnn --attack badnet --ratio 0.1 --defense ft \
	  --defense-param clean_fraction=0.2 --defense-param epochs=30 --defense-param batch_size=64 \
	  --defense-param lr=0.05 --out runs/quickstart

test: install
	$(PY) -m pytest -q --durations=10

bench: install
	$(PY) bench/train_throughput.py

clean:
	rm -rf runs .pytest_cache
