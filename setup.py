"""Builds jaxmem's native CPU kernels (``jaxmem/_native/qmatmul.cc``) against XLA's FFI headers.

Everything else about the package is in ``pyproject.toml``. The extension is optional: where no
C++ compiler is present (or the build fails) jaxmem installs without it and runs XLA's ops.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildNative(build_ext):
  """Adds the jaxlib FFI include directory (from the build environment) before compiling."""

  def build_extensions(self):
    import jaxlib  # a build requirement (pyproject.toml [build-system])

    include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
    for ext in self.extensions:
      ext.include_dirs.append(include)
    super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "jaxmem._native._qmatmul",
            sources=["jaxmem/_native/qmatmul.cc"],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildNative},
)
