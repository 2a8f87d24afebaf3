"""Builds sagd's compiled core: one extension from sagd/_kernels.pyx and kernels/*.c.

Flags are chosen per compiler. Nothing is tuned to the build machine (no -march=native):
AVX2 code is compiled separately and chosen at run time (kernels/api.c). OpenMP is used
when the compiler supports it; without it sagd builds and runs single-threaded.
Set SAGD_NO_OPENMP=1 to build without OpenMP.
"""
import os
import sys
import tempfile
import textwrap
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = ["api.c", "hot.c", "hot_avx2.c", "layers.c", "loss.c"]


def _compiles(compiler, source, extra_args):
    """True if `source` compiles and links with extra_args."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as f:
            f.write(textwrap.dedent(source))
        try:
            objs = compiler.compile([path], output_dir=tmp, extra_postargs=extra_args)
            compiler.link_executable(objs, os.path.join(tmp, "probe"),
                                     extra_postargs=extra_args)
        except Exception:
            return False
    return True


OPENMP_PROBE = """
    #include <omp.h>
    int main(void) { int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return omp_get_max_threads() > 0 && n > 0 ? 0 : 1; }
"""


class BuildExt(build_ext):
    def build_extensions(self):
        ctype = self.compiler.compiler_type
        if ctype == "msvc":
            compile_args, link_args = ["/O2", "/fp:precise"], []
            omp_variants = [(["/openmp"], [])]
        else:
            # fp-contract=off: no fused multiply-add, so every SIMD path gives the same bits
            compile_args = ["-O3", "-ffp-contract=off", "-fno-strict-aliasing"]
            link_args = []
            omp_variants = [(["-fopenmp"], ["-fopenmp"]),
                            (["-Xpreprocessor", "-fopenmp"], ["-lomp"])]
        if os.environ.get("SAGD_NO_OPENMP", "0") not in ("", "0"):
            omp_variants = []
        for cflags, lflags in omp_variants:
            if _compiles(self.compiler, OPENMP_PROBE, cflags + lflags):
                compile_args += cflags
                link_args += lflags
                break
        else:
            warnings.warn("sagd: building without OpenMP; the kernels will run single-threaded")
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
