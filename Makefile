# `make run` and `make test` work on a fresh clone: they install what they need.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.deps-stamp
CONFIG  ?= conf/scriptsftp.toml
ROOTFLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

.PHONY: all system-deps install run test bench check clean

all: test

system-deps:
	@tools/system-deps.sh

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Dependencies once (re-done when pyproject.toml changes); the package itself
# every time, non-editable, so tests run against what `pip install .` gives.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q '.[test]'
	touch $(STAMP)

install: system-deps $(STAMP)
	$(PIP) install -q --no-deps --force-reinstall . 2>&1 | grep -v -i warning || true

run: install
	$(VENV)/bin/scriptsftp run -c $(CONFIG) $(ROOTFLAG)

check: install
	$(VENV)/bin/scriptsftp check -c $(CONFIG)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/sftp_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info var data
