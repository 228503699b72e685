# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and
# install what they need from this repository's own files.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export DAGSTER_HOME := $(CURDIR)/.data/dagster_home

.PHONY: install browser postgres demo test ui bench experiments gc clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The local CPU build of torch first, so nothing pulls the CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

$(DAGSTER_HOME)/dagster.yaml: deploy/dagster-local.yaml
	mkdir -p $(DAGSTER_HOME)
	cp deploy/dagster-local.yaml $@

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m sae_assets.demo

# Debian's Chromium and ChromeDriver for the browser tests (as root, or through sudo).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null

# Debian's PostgreSQL server binaries for the cluster test, which starts its own server on
# 127.0.0.1 as Dagster's storage (tests/cluster.py).
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then exit 0; fi; \
	SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: install browser postgres
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

ui: install $(DAGSTER_HOME)/dagster.yaml
	VIRTUAL_ENV=$(CURDIR)/$(VENV) PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dg dev -h 127.0.0.1 -p 3000

bench: install
	$(PY) bench/demo_walltime.py
	$(PY) bench/lm_train_overhead.py
	$(PY) bench/capture_overhead.py
	$(PY) bench/feature_sampling.py
	$(PY) bench/scale_projection.py

# The published findings reproduced (README "Results"); not part of `make demo` or `make test`.
# Artifacts under .data/experiments/, plots under bench/results/.
experiments: install
	$(PY) bench/attribution_experiment.py
	$(PY) bench/training_tricks.py
	$(PY) bench/informed_init.py
	$(PY) bench/sae_sweep.py --train-tokens 500000 --workdir .data/experiments/sae_frontier

# Remove artifact versions past retention (storage.gc_grace_hours, storage.gc_keep_versions in the
# run config named by $SAE_ASSETS_CONFIG); `make gc GC_ARGS=--dry-run` only reports.
gc: install
	$(PY) -m resources.gc $(GC_ARGS)

clean:
	rm -rf .data
