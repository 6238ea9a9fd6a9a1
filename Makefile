# `make run` and `make test` work on a fresh clone: they install what they need.
# `make run` needs nothing but Python (as a normal user too); `make test` also
# installs the system tools the tests drive (tools/system-deps.sh, apt-get as root).
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
CONFIG  ?= conf/scriptsftp.toml
ROOTFLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
SHELL   := bash
.SHELLFLAGS := -o pipefail -c   # a failed pip install fails the target, whatever the filter after it
# the package is reinstalled (non-editable: what `pip install .` gives) only when these change
SOURCES := pyproject.toml $(shell find server scripting -type f \( -name '*.py' -o -name '*.toml' \) 2>/dev/null)
PKG_STAMP  := $(VENV)/.pkg-stamp
TEST_STAMP := $(VENV)/.deps-stamp

.PHONY: all system-deps install run test typecheck bench check clean

all: test

system-deps:
	@tools/system-deps.sh

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# runtime dependencies and the package: once, then again only when the source changed
$(PKG_STAMP): $(SOURCES) | $(PY)
	$(PIP) install -q . 2>&1 | { grep -v -i warning || true; }
	touch $@

# the test extras (pytest, hypothesis, aiosmtpd): once per pyproject.toml
$(TEST_STAMP): pyproject.toml | $(PY)
	$(PIP) install -q '.[test]' 2>&1 | { grep -v -i warning || true; }
	touch $@

install: system-deps $(TEST_STAMP) $(PKG_STAMP)

# as root, the demo also needs the accounts workers run as (created if missing)
run: $(PKG_STAMP)
	@tools/worker-accounts.sh
	$(VENV)/bin/scriptsftp run -c $(CONFIG) $(ROOTFLAG)

check: $(PKG_STAMP)
	$(VENV)/bin/scriptsftp check -c $(CONFIG)

# mypy on the installed package (only there is server/ scriptsftp.server), the reported paths
# turned back into the source files'; the scope and strictness are [tool.mypy] in pyproject.toml
typecheck: install
	$(VENV)/bin/mypy -p scriptsftp.server -p scriptsftp.scripting 2>&1 \
	  | sed -E 's#^[^:]*site-packages/scriptsftp/##'

# three pytest-xdist workers, a test file each at a time (a module's shared daemon stays in one
# worker); `make test PYTEST_ARGS=` runs one test at a time, `PYTEST_ARGS="-n 4 --dist loadfile"` more
PYTEST_ARGS ?= -n 3 --dist loadfile
test: install typecheck
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/sftp_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info var data
