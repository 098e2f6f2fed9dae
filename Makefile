# Two commands for a fresh machine: `make demo` and `make test`. Each builds the virtualenv
# (with uv, which links torch from its cache instead of copying 5 GB) before it runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= local,offline,samples,dev
PYTEST_ARGS ?=

.PHONY: venv demo test lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) -e ".[$(EXTRAS)]"
	touch $@

demo: venv
	$(VENV)/bin/bucketlens demo

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -ra $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .bucketlens
