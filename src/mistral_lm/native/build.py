"""Compile the project's C kernels once per machine and load them with ctypes.

Why C through ctypes rather than a torch C++ extension: a C file builds in about a second with
only the system compiler (torch's headers take a minute and need ninja), so `make install` and a
fresh `pip install` both work with Python and a C compiler, as the README promises. Kernels are
compiled with `-fopenmp` and linked by soname to `libgomp.so.1`, which torch has already loaded:
our parallel regions run on torch's own OpenMP runtime, not a second thread pool.

The shared object is cached under ``$MISTRAL_LM_CACHE`` (default ``~/.cache/mistral_lm``) in
``native/<name>-<hash>.so``, the hash covering the source, the flags and the compiler's version,
so an edit or another compiler rebuilds and a stale file is never loaded. Where nothing can be
compiled (no compiler, `MISTRAL_LM_NATIVE=0`), `library` returns None and callers keep their
pure-torch path, which is also the reference the tests compare every kernel with.

Instruction sets: each library picks its fastest path at run time (`__builtin_cpu_supports`)
and exports ``int mlm_set_isa(int cap)`` to cap it. `isa_cap` reads the cap from
``MISTRAL_LM_NATIVE_ISA`` (scalar / avx2 / avx512 / amx; avx512 leaves AMX out), or else takes
the lower of torch's own caps, ``ATEN_CPU_CAPABILITY`` (default / avx2 / avx512) and oneDNN's
``ONEDNN_MAX_CPU_ISA`` (AVX2... caps at AVX2, AVX512_CORE_BF16 at AVX-512 without AMX). So the
second kernel set the numerics tests run under covers our kernels too, and a run with AMX
switched off for torch has it off for our kernels as well.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch  # noqa: F401  (loads libgomp.so.1 before any of our libraries binds to it)

SOURCE_DIR = Path(__file__).resolve().parent
FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-Wall"]
ISA = {"scalar": 0, "avx2": 1, "avx512": 2, "amx": 3, "default": 3}
# a second try where the first compile fails: an assembler older than the AMX tile instructions
# (binutils 2.36) still builds the vector kernels
RETRY_FLAGS = ["-DMLM_NO_AMX"]
# torch's own levels: its avx512 is its widest, so it caps nothing of ours
ATEN_ISA = {"default": 3, "avx2": 1, "avx512": 3}
# The dtype codes the kernels take for their float arrays (float_common.h's DT_F32, DT_BF16, DT_F16).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def cache_dir() -> Path:
    root = os.environ.get("MISTRAL_LM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mistral_lm")
    return Path(root) / "native"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def enabled() -> bool:
    return os.environ.get("MISTRAL_LM_NATIVE", "1").lower() not in ("0", "off", "false", "no")


def _onednn_cap(value: str) -> int:
    """Our level for a ``ONEDNN_MAX_CPU_ISA`` value: its AMX ISAs 3, its other AVX-512 (and
    AVX10) ones 2, AVX2 and its VNNI variants 1, SSE4.1 and AVX 0; ALL, DEFAULT or none: no cap."""
    value = value.upper()
    if not value or value in ("ALL", "DEFAULT") or "AMX" in value:
        return ISA["default"]
    if value.startswith(("AVX512", "AVX10")):
        return ISA["avx512"]
    return ISA["avx2"] if value.startswith("AVX2") else ISA["scalar"]


def isa_cap() -> int:
    """The widest instruction set the kernels may use: 0 scalar, 1 AVX2, 2 AVX-512, 3 AVX-512 and AMX."""
    own = os.environ.get("MISTRAL_LM_NATIVE_ISA", "").lower()
    if own in ISA:
        return ISA[own]
    aten = ATEN_ISA.get(os.environ.get("ATEN_CPU_CAPABILITY", "").lower(), ISA["default"])
    return min(aten, _onednn_cap(os.environ.get("ONEDNN_MAX_CPU_ISA", "")))


@functools.cache
def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def shared_object(name: str) -> Path | None:
    """Build `<name>.c` into the cache if it is not there yet; None if it cannot be built."""
    source = SOURCE_DIR / f"{name}.c"
    cc = compiler()
    if cc is None or not source.is_file():
        return None
    text = source.read_bytes()
    headers = b"".join(p.read_bytes() for p in sorted(SOURCE_DIR.glob("*.h")))
    key = hashlib.sha256(text + headers + " ".join(FLAGS).encode() + _compiler_version(cc).encode()
                         + sys.platform.encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for extra in ([], RETRY_FLAGS):
            done = subprocess.run([cc, *FLAGS, *extra, f"-I{SOURCE_DIR}", str(source), "-o", tmp, "-lm"],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                break
        if done.returncode != 0:
            warnings.warn(f"mistral_lm: could not compile {source.name} with {cc}; using the pure-torch "
                          f"path instead (slower). Compiler said:\n{done.stderr[-2000:]}", RuntimeWarning,
                          stacklevel=3)
            return None
        os.replace(tmp, target)  # atomic: a concurrent process sees the old state or the whole file
        return target
    except (OSError, subprocess.SubprocessError) as exc:
        warnings.warn(f"mistral_lm: could not compile {source.name}: {exc}; using the pure-torch path",
                      RuntimeWarning, stacklevel=3)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The loaded library `name` (compiled on first use and cached), its ISA capped by
    `isa_cap()`; None when native kernels are off or cannot be built here."""
    if not enabled():
        return None
    path = shared_object(name)
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    if hasattr(lib, "mlm_set_isa"):
        lib.mlm_set_isa.argtypes = [ctypes.c_int]
        lib.mlm_set_isa.restype = ctypes.c_int
        lib.mlm_set_isa(isa_cap())
    return lib


def build_all() -> dict[str, Path | None]:
    """Compile every kernel source (`python -m mistral_lm.native`, run by `make install`), one
    compiler per core: the install waits for the largest source rather than for their sum."""
    names = sorted(p.stem for p in SOURCE_DIR.glob("*.c"))
    largest_first = sorted(names, key=lambda n: -(SOURCE_DIR / f"{n}.c").stat().st_size)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1))) as pool:
        built = dict(zip(largest_first, pool.map(shared_object, largest_first)))
    return {name: built[name] for name in names}
