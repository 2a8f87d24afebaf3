"""Builds sagd's compiled core: one extension from sagd/_kernels.pyx and kernels/*.c.

Flags are chosen per compiler. Nothing is tuned to the build machine (no -march=native):
AVX2 code is compiled separately and chosen at run time (kernels/api.c). Threads are
sagd's own small pool (kernels/threads.c: POSIX threads, or Windows threads), not OpenMP,
so there is no OpenMP runtime to find, bundle or miss.
"""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = ["api.c", "dense.c", "hot.c", "hot_avx2.c", "layers.c", "loss.c", "threads.c"]


class BuildExt(build_ext):
    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            compile_args, link_args = ["/O2", "/fp:precise"], []
        else:
            # fp-contract=off: no fused multiply-add, so every SIMD path gives the same bits;
            # no-math-errno: sqrtf and friends without errno, so their loops vectorize
            # -g0: no debug info in distributed binaries (a smaller wheel)
            compile_args = ["-O3", "-g0", "-ffp-contract=off", "-fno-math-errno", "-pthread"]
            link_args = ["-pthread"]
        for ext in self.extensions:
            ext.extra_compile_args = compile_args + ext.extra_compile_args
            ext.extra_link_args = link_args + ext.extra_link_args
        super().build_extensions()


def extensions():
    from Cython.Build import cythonize

    ext = Extension(
        "sagd._kernels",
        sources=["sagd/_kernels.pyx"] + [os.path.join("kernels", k) for k in KERNELS],
        include_dirs=["kernels"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    directives = {"language_level": 3, "boundscheck": False, "wraparound": False,
                  "cdivision": True, "initializedcheck": False}
    if os.environ.get("SAGD_DEBUG", "0") not in ("", "0"):
        directives.update(boundscheck=True, initializedcheck=True)
    return cythonize([ext], compiler_directives=directives)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
