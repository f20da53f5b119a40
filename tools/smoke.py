"""make dist's smoke test of an installed refx (run in a fresh venv, outside
the source tree): the version, the files a wheel must carry, and a Ref
written through refx.jit."""

import importlib.metadata
import pathlib
import sys

import jax.numpy as jnp

import refx

pkg = pathlib.Path(refx.__file__).parent
assert "site-packages" in str(pkg), f"refx imported from {pkg}, not from the venv"
version = importlib.metadata.version("refx")
assert refx.__version__ == version, (refx.__version__, version)
for name in ("py.typed", "__init__.pyi"):
    assert (pkg / name).is_file(), f"{name} missing from the installed package {pkg}"
lic = importlib.metadata.metadata("refx")
assert lic["License-Expression"] == "Apache-2.0", lic["License-Expression"]

model = {"w": refx.Ref(jnp.ones(3), "params"), "n": refx.Ref(jnp.array(0), "state")}
model["tied"] = model["w"]


@refx.jit
def step(m, x):
    m["n"].value += 1
    m["w"].value = m["w"].value * x
    return m["tied"].value.sum()


for _ in range(3):
    s = step(model, 2.0)
assert int(model["n"].value) == 3 and float(s) == 24.0, (model["n"].value, s)
assert model["tied"] is model["w"]
print(f"smoke: refx {version} from {pkg} ({sys.executable}): ok")
