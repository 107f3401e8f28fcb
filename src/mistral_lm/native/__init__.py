"""Native CPU kernels (C, loaded with ctypes) and the pure-torch references they are tested against.

`build` compiles and caches the libraries; each kernel family has its own module here.
"""

from .build import build_all, enabled, isa_cap, library

__all__ = ["build_all", "enabled", "isa_cap", "library"]
