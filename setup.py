"""Build the Cython kernels: qviz/_packed.pyx (bit-packed low-bit kernels) and qviz/_fused.pyx (fused
fake-quantize kernels).

The build never uses -march=native: a wheel or an editable install must run on any x86-64 (and build on
aarch64). Fast SIMD paths are compiled per function with target attributes and chosen at run time from
the CPU's features (see qviz/_packed_kernels.h). OpenMP is used when the compiler accepts -fopenmp.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup


def _compiler_accepts(flag: str) -> bool:
    """Compile and link a tiny OpenMP program to see whether `flag` works with this toolchain."""
    cc = os.environ.get("CC", "cc")
    source = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as f:
            f.write(source)
        try:
            result = subprocess.run(
                [cc, flag, path, "-o", os.path.join(tmp, "probe")], capture_output=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return result.returncode == 0


openmp = [] if sys.platform == "win32" or os.environ.get("QVIZ_NO_OPENMP") else ["-fopenmp"]
if openmp and not _compiler_accepts(openmp[0]):
    openmp = []

extension = Extension(
    "qviz._packed",
    sources=["qviz/_packed.pyx"],
    include_dirs=["qviz"],
    # the C kernels live in headers: a change there must rebuild the extension
    depends=sorted(str(p) for p in Path(__file__).parent.joinpath("qviz").glob("_packed*.h")),
    extra_compile_args=["-O3", "-fno-strict-aliasing", *openmp],
    extra_link_args=openmp,
    define_macros=[("QVIZ_HAVE_OPENMP", "1" if openmp else "0")],
)

# one pass per fake-quantize instead of a chain of PyTorch ops. No contraction into fused multiply-adds, so
# every code path rounds as the PyTorch formulation does; no floating-point traps (nobody reads the
# exception flags), which lets floor() vectorize.
fused = Extension(
    "qviz._fused",
    sources=["qviz/_fused.pyx"],
    include_dirs=["qviz"],
    depends=["qviz/_fused.h"],
    extra_compile_args=["-O3", "-fno-strict-aliasing", "-ffp-contract=off", "-fno-trapping-math"],
)

setup(
    ext_modules=cythonize(
        [extension, fused],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
