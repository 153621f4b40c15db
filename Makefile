# make demo: the whole nightly path on a generated sample archive (./demo-run/)
# make test: the test suite (unit + integration: real Ray, MLflow on sqlite, moto S3 server)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test clean browser

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	rm -rf demo-run
	RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 $(PY) -m jobs.demo --root demo-run

# the report's browser test needs Debian's chromium: installed here when missing (as root, with apt)
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium missing and not installable here: the report's browser test will fail" >&2

# two test processes, a whole file each (its module fixtures stay in one process): most of the suite's wall time
# is Ray, MLflow and moto starting and waiting, so two overlap on a 2-core machine (pytest-xdist)
TEST_WORKERS ?= 2

test: $(VENV)/.installed browser
	HF_HUB_OFFLINE=1 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf demo-run anople-root .pytest_cache
