#!/usr/bin/env bash
# Build refx into OUTDIR/refx (C extension + the Python files) for
# development: PYTHONPATH=OUTDIR python -c 'import refx'.
#
# The new .so is moved into place with rename(2), never written over:
# a process that has the old one loaded keeps its (still valid) mapping.
# Extra environment (REFX_SANITIZE=1, REFX_DEBUG=1) is passed to setup.py.
# A development build: compiler warnings are errors (REFX_WERROR=1) unless
# REFX_WERROR=0 is given.
set -euo pipefail
export REFX_WERROR=${REFX_WERROR:-1}
out=${1:?usage: tools/devbuild.sh OUTDIR}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out/refx" "$out/.stage"
out=$(cd "$out" && pwd)
cd "$here"
"$py" setup.py -q build_ext -b "$out/.stage" -t "$out/.stage/tmp" >/dev/null
cp src/refx/*.py src/refx/*.pyi src/refx/py.typed "$out/refx/" 2>/dev/null || cp src/refx/*.py "$out/refx/"
# the Python subpackages (refx.nn)
for pkg in src/refx/*/; do
    [ -f "$pkg/__init__.py" ] || continue
    name=$(basename "$pkg")
    rm -rf "${out:?}/refx/$name"
    mkdir -p "$out/refx/$name"
    cp "$pkg"*.py "$out/refx/$name/"
done
for so in "$out"/.stage/refx/_core*.so; do
    cp "$so" "$out/refx/.new.so"
    mv -f "$out/refx/.new.so" "$out/refx/$(basename "$so")"
done
