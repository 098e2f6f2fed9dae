# Two commands for a fresh machine: `make demo` and `make test`. Each builds the virtualenv
# (with uv, which links torch from its cache instead of copying 5 GB) before it runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= local,offline,samples,dashboard,dev
PYTEST_ARGS ?=
# pytest-xdist workers for the main suite, each with its own emulator stack and Spark session.
# Most of a test's time is waiting (emulators, triggers, leases), so 2 on 2 cores pays; 3 beside
# the compat run starved Spark's Python workers past their 10 s connect-back. Files stay whole
# on one worker (--dist loadfile) so a module's fixtures start once, handed out in collection
# order (--no-loadscope-reorder; xdist would otherwise start the files with most tests first and
# the benchmarks' 2 tests, ~6 min of one worker, last): tests/helpers/markers.py puts the
# slowest first.
WORKERS ?= 2
# The Spark versions users deploy on besides the newest: Dataproc image 3.0.0-RC1 and Serverless
# runtime 3.0 run Spark 4.0.0; images 3.0.0–3.0.2 run 4.1.1/4.1.2. Each gets its own virtualenv
# in which the Spark-facing tests that carry the delivery guarantees run again.
COMPAT_SPARK ?= 4.0.0 4.1.2
COMPAT_VENVS := $(foreach v,$(COMPAT_SPARK),.venv-spark$(v))
# Only the files that hold compat tests are collected there (collecting all ~50 imports every
# test module: 3.6 CPU-s of each rerun's start).
COMPAT_FILES = $(shell grep -l 'mark\.compat' tests/test_*.py)
# pyspark ships only as a 400 MB sdist. Where the index's file response is not cacheable (this
# machine's registry proxy), uv builds it again for every environment it installs: 20 CPU-s and
# a new 1.4 GB revision in uv's cache each time, four per `make test` (main, two compat, the
# rehearsal), which filled this machine's disk within a day of CI runs. So each version is built
# once, with pip, into a wheelhouse that every uv install finds first (UV_FIND_LINKS reaches the
# rehearsal's uv through the environment).
WHEELHOUSE ?= $(HOME)/.cache/bucketlens/wheels
SPARK_RANGE := $(shell grep -o '"pyspark[^"]*"' pyproject.toml | tr -d '"')
export UV_FIND_LINKS := $(WHEELHOUSE)
# Bytecode: uv writes none by default, and where PYTHONDONTWRITEBYTECODE is set (this machine's
# environment) Python never writes it either, so every process compiled torch, torchvision,
# pandas and the Google clients from source on each import: the executor's imports took 15 CPU-s
# instead of 4.4, in each of the suite's ~300 Python processes. uv compiles the main virtualenv
# at install (~45 CPU-s, once); the compat reruns, which import a fraction of it, let Python
# write what they import as they go, into their own virtualenv (PYTHONPYCACHEPREFIX); `bytecode` compiles the project's own files before each
# run, and tests/helpers/pysparkzip.py the pyspark.zip that Spark's Python processes import.
UV_INSTALL = $(VENV)/bin/uv pip install --quiet --compile-bytecode
SOURCES := pipeline producer deploy tests bench  # schemas/ ships as data files: nothing beside them
# $(call spark-wheel,REQUIREMENT): a no-op when the wheelhouse already holds the version it picks.
spark-wheel = $(PY) -m pip wheel -qq --disable-pip-version-check --no-cache-dir --no-deps \
	--find-links $(WHEELHOUSE) --wheel-dir $(WHEELHOUSE) "$(1)"

.PHONY: venv compat demo test test-compat check lint bench clean chromium bytecode

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(call spark-wheel,$(SPARK_RANGE))
	$(UV_INSTALL) --python $(PY) -e ".[$(EXTRAS)]"
	$(PY) -m tests.helpers.pysparkzip
	touch $@

# Same project and extras, another pyspark: uv links everything from its cache, then compiles.
.venv-spark%/.installed: $(VENV)/.installed
	$(call spark-wheel,pyspark==$*)
	$(VENV)/bin/uv venv --quiet --allow-existing --python $(PY) .venv-spark$*
	$(VENV)/bin/uv pip install --quiet --python .venv-spark$*/bin/python \
		-e ".[$(EXTRAS)]" "pyspark==$*"
	.venv-spark$*/bin/python -m tests.helpers.pysparkzip
	touch $@

compat: $(foreach d,$(COMPAT_VENVS),$(d)/.installed)

demo: venv
	$(VENV)/bin/bucketlens demo --keep

# The compat reruns go alongside the main suite (its log is printed after it), building their
# virtualenvs there too: the main suite starts without waiting for them.
test: venv chromium bytecode
	$(VENV)/bin/ruff check .
	@mkdir -p .bucketlens
	@$(MAKE) --no-print-directory test-compat > .bucketlens/test-compat.log 2>&1 & compat=$$!; \
	$(PY) -m pytest -ra --durations=30 -n $(WORKERS) --dist loadfile --no-loadscope-reorder \
		$(PYTEST_ARGS); main=$$?; \
	wait $$compat; other=$$?; cat .bucketlens/test-compat.log; \
	echo "== main suite exit $$main, compat exit $$other"; \
	test $$main -eq 0 && test $$other -eq 0

# The guarantee-carrying Spark tests (marker `compat`) on every other supported pyspark.
test-compat: compat
	@for d in $(COMPAT_VENVS); do \
		echo "== $$d: pytest -m compat"; \
		PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX=$$d/pycache \
			$$d/bin/python -m pytest -ra -m compat -p no:cacheprovider \
			$(PYTEST_ARGS) $(COMPAT_FILES) || exit 1; \
	done

# The dashboard's test drives a real headless Chromium (and its WebDriver) from the
# distribution's packages; installed when missing and we may (root), else that test skips.
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| { test "$$(id -u)" -eq 0 && apt-get update -qq \
		     && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
		|| echo "chromium: not installed (needs root and apt-get); the dashboard's browser test skips"

# The inner loop: ruff and every test that needs no emulator stack and no Spark (< 60 s).
check: venv bytecode
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not integration and not spark and not process" -p no:cacheprovider $(PYTEST_ARGS)

bytecode: venv
	@$(PY) -m compileall -q -j 0 $(SOURCES) > /dev/null

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .venv-spark* .bucketlens
