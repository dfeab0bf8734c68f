# pgturso: PGXS build of the extension, plus the Python worker, demo, tests and benchmark.
#   make install   install the extension into the server that PG_CONFIG names (and its Python helpers)
#   make demo      set everything up on this machine and show replication into a local Turso file
#   make test      set everything up and run the test suite against real Postgres and real Turso
#   make bench     the benchmark (QUICK=1 for a one-minute smoke run)

EXTENSION    = pgturso
EXTVERSION   = 0.7.0
# Every earlier release: its install script is kept (extension/history/) and an upgrade script built from it.
OLD_VERSIONS = 0.1.0 0.2.0 0.3.0 0.4.0 0.5.0 0.6.0
PG_CONFIG   ?= /usr/lib/postgresql/15/bin/pg_config
DATA_built   = $(EXTENSION)--$(EXTVERSION).sql \
               $(foreach v,$(OLD_VERSIONS),$(EXTENSION)--$(v).sql $(EXTENSION)--$(v)--$(EXTVERSION).sql)
EXTRA_CLEAN  = $(DATA_built)
# pgturso.so: the background workers that run the Python worker (shared_preload_libraries = 'pgturso').
# Built in its own directory: a pgturso.so at the top would shadow the package for `python -m pgturso` here.
MODULES      = extension/supervisor/pgturso

SQL_SOURCES  = $(sort $(wildcard extension/sql/*.sql))
PY_GROUPS    = capture sources delivery run common
PY_SOURCES   = $(wildcard worker/pgturso/*.py $(foreach g,$(PY_GROUPS),worker/pgturso/$(g)/*.py))

PGXS := $(shell $(PG_CONFIG) --pgxs 2>/dev/null)
ifneq ($(wildcard $(PGXS)),)
include $(PGXS)
PYTHON_DIR = $(datadir)/extension/pgturso_python
# A relocated copy of a packaged server (pg_config moved elsewhere) has no headers of its own: use the
# package's, which belong to the same server.
ifeq ($(wildcard $(includedir_server)/postgres.h),)
override CPPFLAGS += -I/usr/include/postgresql/$(MAJORVERSION)/server
endif
else
# No server development files yet: `make deps` installs them; `make test` and `make demo` do it for you.
PYTHON_DIR = /usr/share/postgresql/15/extension/pgturso_python
install:
	@echo "PGXS not found via $(PG_CONFIG): run 'make deps' first (installs postgresql-server-dev-15)"; exit 1
endif

# `make test` runs the suite on three pytest-xdist workers, each with its own Postgres cluster: most tests wait
# on servers, so three fit two cores (about 13 minutes instead of 40). PYTEST_ARGS replaces this (-n 0: serial).
TEST_WORKERS = -n 3

VENV   = .venv
PY     = $(VENV)/bin/python
TURSO_DIR = .cache/turso

$(DATA_built): $(SQL_SOURCES) $(wildcard extension/history/*.sql) extension/build.py worker/pgturso/capture/sql.py \
		worker/pgturso/sources/pgoutput.py
	python3 extension/build.py $@ '$(PYTHON_DIR)' $(SQL_SOURCES)

# The PL/Python functions import the pure-Python part of the worker package from here.
install: install-python
install-python:
	rm -rf '$(DESTDIR)$(PYTHON_DIR)/pgturso'
	$(MKDIR_P) '$(DESTDIR)$(PYTHON_DIR)/pgturso' $(foreach g,$(PY_GROUPS),'$(DESTDIR)$(PYTHON_DIR)/pgturso/$(g)')
	$(INSTALL_DATA) $(wildcard worker/pgturso/*.py) '$(DESTDIR)$(PYTHON_DIR)/pgturso/'
	$(foreach g,$(PY_GROUPS),$(INSTALL_DATA) $(wildcard worker/pgturso/$(g)/*.py) '$(DESTDIR)$(PYTHON_DIR)/pgturso/$(g)/' &&) true

.PHONY: deps venv turso install-python demo test lint bench soak

deps:
	bash tests/setup/deps.sh

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

turso: $(TURSO_DIR)/node_modules/.bin/tursodb
$(TURSO_DIR)/node_modules/.bin/tursodb:
	mkdir -p $(TURSO_DIR)
	cd $(TURSO_DIR) && npm install --silent --no-audit --no-fund turso@0.6.0
	ln -sf ../@tursodatabase/cli-linux-$$(uname -m | sed 's/x86_64/x64/;s/aarch64/arm64/')-gnu/tursodb $@

demo: deps
	$(MAKE) install venv
	cd tests && ../$(PY) demo.py

test: deps
	$(MAKE) install venv turso
	$(VENV)/bin/ruff check worker tests bench extension
	TURSODB=$(CURDIR)/$(TURSO_DIR)/node_modules/.bin/tursodb $(VENV)/bin/pytest $(or $(PYTEST_ARGS),$(TEST_WORKERS))

lint: venv
	$(VENV)/bin/ruff check worker tests bench extension

bench: deps
	$(MAKE) install venv turso
	TURSODB=$(CURDIR)/$(TURSO_DIR)/node_modules/.bin/tursodb $(PY) bench/run.py $(if $(QUICK),--quick)

# The long concurrency runs of tests/test_guarantees.py (SOAK_SECONDS per run; default 10 minutes).
soak: deps
	$(MAKE) install venv turso
	SOAK_SECONDS=$${SOAK_SECONDS:-600} BIG_TRANSACTION_ROWS=1000000 COPY_TEST_ROWS=1000000 \
	TURSODB=$(CURDIR)/$(TURSO_DIR)/node_modules/.bin/tursodb $(VENV)/bin/pytest tests/test_guarantees.py \
	  tests/test_initial_copy.py $(PYTEST_ARGS)
