"""C++ sources of jaxmem's native CPU kernels.

Built by ``setup.py`` at install time; loaded by :mod:`jaxmem._src.native`.
"""
