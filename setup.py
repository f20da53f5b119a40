"""Build the C core, refx._core.  Everything else is in pyproject.toml.

REFX_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer
(run it with the ASan runtime preloaded: see `make sanitize`).
REFX_DEBUG=1 builds without optimisation, with debug symbols.
REFX_WERROR=1 turns compiler warnings into errors (the Makefile sets it for
development builds; a user's `pip install .` leaves it off).
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = ["module.c", "tree.c", "ref.c", "kinds.c", "deref.c", "filter.c", "partition.c",
           "update.c", "jit.c", "nnmodule.c",
           "flatmemo.c", "flatvalue.c"]

compile_args = ["-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
# -Werror only in development builds (REFX_WERROR=1, set by the Makefile):
# a newer compiler's new warning must not stop a user's `pip install .`.
if os.environ.get("REFX_WERROR") == "1":
    compile_args.append("-Werror")
link_args: list[str] = []
if os.environ.get("REFX_SANITIZE"):
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
           "-fno-omit-frame-pointer"]
    compile_args += san + ["-O1", "-g"]
    link_args += san
elif os.environ.get("REFX_DEBUG"):
    compile_args += ["-O0", "-g"]


class BuildExt(build_ext):
    """The flags above are gcc/clang's: give them only to such a compiler
    (setuptools' "unix", MinGW, Cygwin), never to another (MSVC)."""

    def build_extensions(self):
        if self.compiler.compiler_type not in ("unix", "mingw32", "cygwin"):
            for ext in self.extensions:
                ext.extra_compile_args = []
                ext.extra_link_args = []
        super().build_extensions()


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "refx._core",
            sources=[f"src/refx/{s}" for s in SOURCES],
            depends=["src/refx/refx.h", "src/refx/ptrmap.h"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ]
)
