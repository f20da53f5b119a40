# refx: every target sets itself up from nothing (a fresh clone).
#   make test    venv + install refx with test deps + the whole suite
#   make demo    venv + install + the demo (examples/train_digits.py)
#   make bench   venv + install + peers (flax, equinox, optax) + benchmarks

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip --disable-pip-version-check -q

.PHONY: all venv install install-bench test pytest demo bench bench-smoke \
        sanitize leakcheck lint typecheck clean

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

test: pytest typecheck

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

lint: venv
	$(PIP) install ruff clang-format
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/clang-format --dry-run --Werror src/refx/*.c src/refx/*.h

clean:
	rm -rf build dist src/*.egg-info src/refx/*.so .pytest_cache
