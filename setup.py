"""Build the C core, refx._core.  Everything else is in pyproject.toml.

REFX_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer
(run it with the ASan runtime preloaded: see `make sanitize`).
REFX_DEBUG=1 builds without optimisation, with debug symbols.
"""

import os

from setuptools import Extension, setup

SOURCES = ["module.c", "ref.c", "deref.c", "partition.c", "update.c", "jit.c"]

compile_args = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"]
link_args: list[str] = []
if os.environ.get("REFX_SANITIZE"):
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
           "-fno-omit-frame-pointer"]
    compile_args += san + ["-O1", "-g"]
    link_args += san
elif os.environ.get("REFX_DEBUG"):
    compile_args += ["-O0", "-g"]

setup(
    ext_modules=[
        Extension(
            "refx._core",
            sources=[f"src/refx/{s}" for s in SOURCES],
            depends=["src/refx/refx.h"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ]
)
