"""`current(dicts, keys, values)`: whether `dicts[i].get(keys[i]) is values[i]` for every i,
the fused step's check that a model's modules are the ones its table describes, in C (links.c)
where it builds, else the same test in Python."""

from __future__ import annotations

import ctypes
import functools
import operator
from typing import Any

from . import build


@functools.cache
def _lib() -> Any:
    path = build.shared_object("links") if build.enabled() else None
    if path is None:
        return None
    try:
        lib = ctypes.PyDLL(str(path))  # the GIL stays held: the loop calls Python's C API
    except OSError:  # an interpreter that does not export its C API to libraries
        return None
    lib.mlm_links_current.argtypes = [ctypes.py_object] * 4
    lib.mlm_links_current.restype = ctypes.c_int
    return lib


def _refuse() -> None:
    raise TypeError("links must be three tuples of one length")


def reference_current(dicts: tuple[dict, ...], keys: tuple[Any, ...], values: tuple[Any, ...]) -> bool:
    """The definition."""
    if not len(dicts) == len(keys) == len(values):
        _refuse()
    return all(map(operator.is_, map(dict.get, dicts, keys), values))


def current(dicts: tuple[dict, ...], keys: tuple[Any, ...], values: tuple[Any, ...]) -> bool:
    lib = _lib()
    if lib is None:
        return reference_current(dicts, keys, values)
    done = lib.mlm_links_current(dicts, keys, values, None)
    if done < 0:
        _refuse()
    return bool(done)
