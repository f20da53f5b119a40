# refx: every target sets itself up from nothing (a fresh clone).
#   make test    a contributor's check (budget: 8 min on a fresh clone, 2 cores):
#                lint, the suite in a random order, mypy on the examples,
#                the docs built with --strict (every docs/README code block
#                runs in the suite)
#   make ci      what CI runs (.ci/run): make test, then a benchmark smoke
#                run, the docs' Flax/Equinox blocks, the suite on the oldest
#                and on the newest JAX tested, and make dist
#   make docs    the documentation site (mkdocs --strict) into build/site;
#                make docs-serve serves it at http://127.0.0.1:8000
#   make dist    sdist + wheel in dist/, twine check, each installed into a
#                fresh venv and smoke-tested
#   make demo    venv + install + the demo (examples/train_digits.py)
#   make examples  venv + install + the transform examples (scan, vmap, remat)
#   make demo-sharded  the demo's MLP on 8 simulated devices (train_sharded.py)
#   make bench   venv + install + peers (flax, equinox, optax) + benchmarks
#   make debug   the C core unoptimised with debug symbols (-O0 -g), in
#                build/debug, for gdb (the venv's install stays optimised)
#
# Pins: ci/tools.txt (ruff, clang-format, pytest-randomly, every venv),
# ci/jax-oldest.txt and ci/jax-newest.txt (the two JAX compatibility venvs),
# ci/docs.txt (mkdocs and its plugins); docs/development.md says how to
# move them.

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip --disable-pip-version-check -q
# Extra pip constraints files for the venv being built (the JAX
# compatibility targets set it to ci/jax-oldest.txt or ci/jax-newest.txt).
CONSTRAINTS ?=
PIN    := -c ci/tools.txt $(addprefix -c ,$(CONSTRAINTS))
# Extra pytest arguments, e.g. PYTEST_ARGS='--randomly-seed=N -x'.
PYTEST_ARGS ?=
# The command that reruns this venv's suite (the replay hint it prints).
REPLAY ?= make pytest

# Development builds fail on any compiler warning: setup.py adds -Werror
# only when REFX_WERROR=1, so a user's `pip install .` never stops on a
# newer compiler's new warning.  Exported to every build below (install,
# sanitize, tools/devbuild.sh); REFX_WERROR=0 on the command line turns it off.
export REFX_WERROR ?= 1

.PHONY: all venv install install-bench docs-tools test ci pytest demo demo-sharded examples bench bench-smoke \
        sanitize debug leakcheck lint typecheck test-jax-oldest test-jax-newest \
        test-pythons docs docs-serve docs-peers dist clean

# The venvs share build/ (pip builds refx in the tree) and tests/.hypothesis:
# never build or test two of them at once, even under make -j.
.NOTPARALLEL:

all: test

# A venv with the build tools refx needs (--no-build-isolation below).
$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip 'setuptools>=77' wheel

venv: $(VPY)

# Always reinstall refx (cheap when nothing changed) so tests see the
# current C sources.  pip replaces files by rename, so a running process
# keeps the extension it loaded.
install: venv
	$(PIP) install --no-build-isolation $(PIN) '.[test]'

# install + the peers the benchmarks compare against.
install-bench: install
	$(PIP) install $(PIN) '.[bench]'

# A contributor's check, cheapest first so a lint error fails in seconds.
test: lint pytest typecheck docs

# Everything CI checks: make test, then the slow parts.  docs-peers runs
# after bench-smoke, which installs Flax and Equinox into .venv.
ci: test bench-smoke docs-peers test-jax-oldest test-jax-newest dist

# The whole suite, in a random order (pytest-randomly): the seed is printed
# at the start and the end; PYTEST_ARGS=--randomly-seed=N replays an order
# and the Hypothesis examples that went with it (tests/conftest.py).
pytest: install
	@$(VPY) -c 'import sys, jax, jaxlib; print(f"== suite on CPython {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {jaxlib.__version__} ($(VENV))")'
	cd tests && REFX_REPLAY='$(REPLAY)' ../$(VPY) -m pytest -q -p no:cacheprovider -p randomly $(PYTEST_ARGS) .

# Fail with a clear message unless $(2) is CPython $(3) ($(1): the target).
define need_python
	@test -n "$(2)" || { echo "$(1): no CPython $(3) found (looked for $(HOME)/.pyenv/versions/$(3).*/bin/python and python$(3) on PATH); install it (pyenv install $(3)) or pass $(4)=/path/to/python$(3)"; exit 1; }
	@v=$$($(2) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); \
	test "$$v" = "$(3)" || { echo "$(1): $(4)=$(2) does not run as CPython $(3) (its sys.version_info: '$$v')"; exit 1; }
endef
# The newest CPython X.Y that pyenv has, else pythonX.Y on PATH.
find_python = $(or $(lastword $(shell ls -d $(HOME)/.pyenv/versions/$(1).*/bin/python 2>/dev/null | sort -V)),$(shell command -v python$(1) 2>/dev/null))
PYTHON_OLDEST ?= $(call find_python,3.11)
PYTHON_NEWEST ?= $(call find_python,3.13)

# The suite on the oldest JAX refx supports (0.4.36, CPython 3.11), in
# .venv-jax-oldest pinned by ci/jax-oldest.txt: a change that needs a newer
# JAX fails here, not in a user's install.
test-jax-oldest:
	$(call need_python,$@,$(PYTHON_OLDEST),3.11,PYTHON_OLDEST)
	$(MAKE) --no-print-directory pytest PYTHON=$(PYTHON_OLDEST) VENV=.venv-jax-oldest CONSTRAINTS=ci/jax-oldest.txt REPLAY='make $@'

# The suite on the newest JAX tested (CPython 3.13), in .venv-jax-newest
# pinned by ci/jax-newest.txt: a change that breaks it fails here.
test-jax-newest:
	$(call need_python,$@,$(PYTHON_NEWEST),3.13,PYTHON_NEWEST)
	$(MAKE) --no-print-directory pytest PYTHON=$(PYTHON_NEWEST) VENV=.venv-jax-newest CONSTRAINTS=ci/jax-newest.txt REPLAY='make $@'

# Train the digits MLP: the quick start's model done for real, end to end.
demo: install
	$(PIP) install $(PIN) '.[demo]'
	$(VPY) examples/train_digits.py

# The transform examples, a few seconds each: a GRU trained with refx.scan,
# an ensemble made and trained with refx.vmap, a deep MLP under refx.remat.
examples: install
	$(PIP) install $(PIN) '.[demo]'
	$(VPY) examples/char_gru.py
	$(VPY) examples/ensemble.py
	$(VPY) examples/remat_mlp.py

# The digits MLP data- and model-parallel on 8 simulated CPU devices
# (examples/train_sharded.py; issue 13).
demo-sharded: install
	$(PIP) install $(PIN) '.[demo]'
	$(VPY) examples/train_sharded.py

# mypy --strict on the examples, against the installed refx stubs.
typecheck: install
	$(VPY) -m mypy --config-file examples/mypy.ini examples

# Every benchmark, full size: tables and benchmarks/results/.
bench: install-bench
	$(VPY) benchmarks/run_all.py

# Every benchmark at tiny sizes: they still run and still check their answers.
bench-smoke: install-bench
	$(VPY) benchmarks/run_all.py --smoke

# The whole suite against an ASan+UBSan build of the extension
# (REFX_SANITIZE=1: -fsanitize=address,undefined, UB not recoverable), built
# into build/sanitize and imported from there.  libstdc++ is preloaded with
# libasan so ASan's __cxa_throw interceptor finds it (jaxlib throws C++
# exceptions at start-up); leak detection at exit is off because CPython
# itself does not free everything at exit (make leakcheck covers leaks).
# PYTHONMALLOC=malloc sends Python objects through malloc, where ASan sees
# them: under pymalloc a use-after-free of an object is at best a SEGV
# (measured: merge_partitions' old list bug read as "SEGV in _PyDict_Next",
# with malloc as "heap-use-after-free at partition.c:1284").
# Any report aborts the run, so the target fails.  Reports go to
# build/sanitize/report.<pid> (pytest's output capture would swallow them
# with the aborted process) and are printed at the end; any report file,
# from the suite or a subprocess of it, fails the target.
SAN_DIR := build/sanitize
SAN_LOG := $(CURDIR)/$(SAN_DIR)/report
SAN_ENV := LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
           PYTHONMALLOC=malloc \
           ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:log_path=$(SAN_LOG) \
           UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$(SAN_LOG) \
           PYTHONPATH=$(CURDIR)/$(SAN_DIR)
sanitize: install
	rm -rf $(SAN_DIR)
	REFX_SANITIZE=1 PYTHON=$(VPY) tools/devbuild.sh $(SAN_DIR)
	cd tests && $(SAN_ENV) ../$(VPY) -c "import refx._core as c, sys; assert '$(SAN_DIR)' in c.__file__, c.__file__; print('sanitized build:', c.__file__)"
	cd tests && REFX_REPLAY='make sanitize' $(SAN_ENV) ../$(VPY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) .; rc=$$?; \
	if ls $(SAN_LOG).* >/dev/null 2>&1; then \
	    echo "sanitizer reports:"; cat $(SAN_LOG).*; exit 1; \
	fi; \
	if [ $$rc = 0 ]; then echo "make sanitize: no sanitizer reports"; fi; exit $$rc

# The extension without optimisation and with debug symbols (REFX_DEBUG=1:
# -O0 -g), built into build/debug as sanitize builds (tools/devbuild.sh: a
# build of its own, so no optimised object file is reused) and imported from
# there by PYTHONPATH; the venv's optimised install is left as it is.
DEBUG_DIR := build/debug
debug: install
	rm -rf $(DEBUG_DIR)
	REFX_DEBUG=1 PYTHON=$(VPY) tools/devbuild.sh $(DEBUG_DIR)
	cd tests && PYTHONPATH=$(CURDIR)/$(DEBUG_DIR) ../$(VPY) -c "import refx._core as c; assert '$(DEBUG_DIR)' in c.__file__, c.__file__; print('debug build:', c.__file__)"
	@echo "make debug: e.g. cd tests && PYTHONPATH=$(CURDIR)/$(DEBUG_DIR) gdb --args ../$(VPY) -m pytest -q test_ref.py"

# Drift per call of every public operation and error path (20,000 calls
# each): pymalloc blocks, traced bytes, and refcounts of what refx holds.
leakcheck: install
	$(VPY) tools/leakcheck.py

# The suite on other CPython versions with whatever JAX pip resolves for
# each (not part of make test, which pins 3.11 and 3.13 above): one venv per
# version, .venv-3.12 etc.  Default: every pyenv-installed 3.12+; override
# with PYTHONS="/path/to/python3.12 /path/to/python3.13".
PYTHONS ?= $(wildcard $(HOME)/.pyenv/versions/3.1[2-9].*/bin/python)
test-pythons:
	@test -n "$(strip $(PYTHONS))" || { echo "test-pythons: no CPython 3.12+ found; set PYTHONS"; exit 1; }
	@set -e; for py in $(PYTHONS); do \
	    v=$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	    echo "== CPython $$v ($$py)"; \
	    $(MAKE) --no-print-directory pytest PYTHON=$$py VENV=.venv-$$v REPLAY="make test-pythons PYTHONS=$$py"; \
	done

# ruff over the Python and clang-format (--dry-run: it reports, never
# rewrites) over the C core, at the versions pinned in ci/tools.txt, so a
# new release's rules cannot fail CI on an unchanged tree.
lint: venv
	$(PIP) install $(PIN) ruff clang-format
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/clang-format --dry-run --Werror src/refx/*.c src/refx/*.h
	@echo "make lint: clean ($$($(VENV)/bin/ruff --version), $$($(VENV)/bin/clang-format --version))"

# The documentation site (docs/, mkdocs.yml) into build/site, with --strict:
# a broken link, anchor or API reference fails the build.  The API pages
# are generated by mkdocstrings from the installed refx's docstrings, so
# this installs refx first.  Every code block of docs/ runs in the suite
# (tests/test_docs.py), not here.
export NO_MKDOCS_2_WARNING := 1
docs-tools: install
	$(PIP) install $(PIN) -r ci/docs.txt
docs: docs-tools
	$(VENV)/bin/mkdocs build --strict --site-dir build/site
	@echo "make docs: built build/site/index.html"
docs-serve: docs-tools
	$(VENV)/bin/mkdocs serve --strict

# The docs' code blocks that need Flax or Equinox (the "Coming from" pages),
# which make pytest skips without them: with the bench peers installed,
# REFX_DOCS_ALL=1 makes a block it cannot run a failure, not a skip.
docs-peers: install-bench
	cd tests && REFX_DOCS_ALL=1 ../$(VPY) -m pytest -q -p no:cacheprovider -p no:randomly test_docs.py

# A release: sdist and wheel in dist/ (python -m build, in isolation, as a
# user's pip would), `twine check --strict`, then each installed into a
# fresh venv and smoke-tested (tools/smoke.py): the wheel as built, and
# the sdist built from scratch (so a header or stub missing from the sdist
# fails here).  REFX_WERROR=0: the artifacts are what a user's build makes.
DIST_VENVS := build/dist-check
dist: venv
	$(PIP) install $(PIN) build twine
	rm -rf dist $(DIST_VENVS)
	REFX_WERROR=0 $(VPY) -m build --outdir dist .
	$(VENV)/bin/twine check --strict dist/*
	$(PYTHON) -m venv $(DIST_VENVS)/wheel
	$(DIST_VENVS)/wheel/bin/pip --disable-pip-version-check -q install dist/*.whl
	cd $(DIST_VENVS) && wheel/bin/python $(CURDIR)/tools/smoke.py
	$(PYTHON) -m venv $(DIST_VENVS)/sdist
	REFX_WERROR=0 $(DIST_VENVS)/sdist/bin/pip --disable-pip-version-check -q install --no-binary refx dist/*.tar.gz
	cd $(DIST_VENVS) && sdist/bin/python $(CURDIR)/tools/smoke.py
	@echo "make dist: $$(ls dist | tr '\n' ' ')checked"

# Build products and the extra venvs (the main .venv stays).
clean:
	rm -rf build dist site src/*.egg-info src/refx/*.so .pytest_cache .venv-3.* .venv-jax-*
