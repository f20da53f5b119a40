# refx: every target sets itself up from nothing (a fresh clone).
#   make test    venv + install refx with test deps + the whole suite
#   make demo    venv + install + the demo (examples/train_digits.py)
#   make bench   venv + install + peers (flax, equinox, optax) + benchmarks

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip --disable-pip-version-check -q

.PHONY: all venv install install-bench test pytest demo bench bench-smoke \
        sanitize leakcheck lint typecheck test-pythons clean

all: test

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip 'setuptools>=70.1' wheel

venv: $(VPY)

# Always reinstall refx (cheap when nothing changed) so tests see the
# current C sources.  pip replaces files by rename, so a running process
# keeps the extension it loaded.
install: venv
	$(PIP) install --no-build-isolation '.[test]'

install-bench: install
	$(PIP) install '.[bench]'

pytest: install
	cd tests && ../$(VPY) -m pytest -q -p no:cacheprovider .

test: pytest typecheck bench-smoke

demo: install
	$(PIP) install '.[demo]'
	$(VPY) examples/train_digits.py

# mypy --strict on the examples, against the installed refx stubs.
typecheck: install
	$(VPY) -m mypy --config-file examples/mypy.ini examples

bench: install-bench
	$(VPY) benchmarks/run_all.py

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
	cd tests && $(SAN_ENV) ../$(VPY) -m pytest -q -p no:cacheprovider .; rc=$$?; \
	if ls $(SAN_LOG).* >/dev/null 2>&1; then \
	    echo "sanitizer reports:"; cat $(SAN_LOG).*; exit 1; \
	fi; \
	if [ $$rc = 0 ]; then echo "make sanitize: no sanitizer reports"; fi; exit $$rc

# Drift per call of every public operation and error path (20,000 calls
# each): pymalloc blocks, traced bytes, and refcounts of what refx holds.
leakcheck: install
	$(VPY) tools/leakcheck.py

# The suite on other CPython versions (CI runs 3.11): one venv per version,
# .venv-3.12 etc.  Default: every pyenv-installed 3.12+; override with
# PYTHONS="/path/to/python3.12 /path/to/python3.13".
PYTHONS ?= $(wildcard $(HOME)/.pyenv/versions/3.1[2-9].*/bin/python)
test-pythons:
	@test -n "$(strip $(PYTHONS))" || { echo "test-pythons: no CPython 3.12+ found; set PYTHONS"; exit 1; }
	@set -e; for py in $(PYTHONS); do \
	    v=$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	    echo "== CPython $$v ($$py)"; \
	    $(MAKE) --no-print-directory pytest PYTHON=$$py VENV=.venv-$$v; \
	done

lint: venv
	$(PIP) install ruff clang-format
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/clang-format --dry-run --Werror src/refx/*.c src/refx/*.h

clean:
	rm -rf build dist src/*.egg-info src/refx/*.so .pytest_cache .venv-3.*
