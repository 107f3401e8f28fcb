"""`torch.multinomial(probs, 1, generator=g)` in C (draw.c): the same tokens, the generator left
in the same state, about 10x faster on a processed vocabulary row.

generate()'s sampled tokens are torch's multinomial draws, so a seeded generate() (or
`torch.manual_seed` before it) samples the tokens Transformers samples. torch draws an
exponential number for every vocabulary entry, ~1.5 ms a token on a 49k vocabulary; draw.c
produces the same generator words but takes the logarithm only where a token can win.

The reference is torch.multinomial itself: at first use `multinomial` draws from a scratch
generator both ways and keeps to torch if tokens or generator states differ (another torch
version, another state layout), with a warning. Where the library cannot be built, the input
is not contiguous float32 rows on the CPU (torch draws a strided tensor's numbers in its memory
order), or torch would raise (NaN, a negative entry, a row of zeros),
`multinomial` returns None and the caller calls torch.

The generator's state is read, advanced in C and written back under one lock, so threads that
sample through here (generate() in several threads on torch's default generator) never draw
the same numbers. Another thread drawing from the same generator through torch itself in that
moment could (torch's own lock is not reachable from Python): give such threads their own
generators.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import warnings

import torch

from . import build

_STATE_BYTES = 5056  # torch's CPUGeneratorImplState


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = build.library("draw")
    if lib is None:
        return None
    lib.mlm_multinomial.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_void_p]
    lib.mlm_multinomial.restype = ctypes.c_int
    return lib


_LOCK = threading.Lock()  # one read-draw-write of a generator's state at a time (see the module docstring)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
    out = torch.empty(probs.shape[0], dtype=torch.int64)
    with _LOCK:
        state = generator.get_state()
        if state.numel() != _STATE_BYTES or state.dtype != torch.uint8:
            return None
        if library().mlm_multinomial(probs.data_ptr(), probs.shape[0], probs.shape[1], state.data_ptr(),
                                     out.data_ptr()):
            return None
        generator.set_state(state)
    return out


@functools.cache
def agrees_with_torch() -> bool:
    """Whether draw.c draws torch's tokens and leaves torch's generator state, on rows with
    zeros, ties and a row drawn across the state's refill; checked once per process."""
    if library() is None:
        return False
    probs = torch.rand(3, 1000, generator=torch.Generator().manual_seed(0))
    probs[0, ::3] = 0
    probs[1, :990] = 0
    probs[2] = 0.5
    ours, theirs = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    for _ in range(3):
        drawn = _draw(probs, ours)
        expected = torch.multinomial(probs, 1, generator=theirs)[:, 0]
        if drawn is None or not torch.equal(drawn, expected) or not torch.equal(ours.get_state(), theirs.get_state()):
            warnings.warn("mistral_lm: the native multinomial draw differs from this torch's; sampling with "
                          "torch.multinomial (slower)", RuntimeWarning, stacklevel=3)
            return False
    return True


def multinomial(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """(B,) token ids: `torch.multinomial(probs, 1, generator=generator)[:, 0]` for probs (B, V),
    the generator (torch's default one when None) advanced as torch advances it; None where
    the caller must call torch (see the module docstring)."""
    if (probs.dtype != torch.float32 or probs.dim() != 2 or probs.device.type != "cpu" or not probs.is_contiguous()
            or not 0 < probs.shape[1] <= 2**24 or probs.requires_grad or (generator is not None and generator.device.type != "cpu")):
        return None
    if not agrees_with_torch():
        return None
    return _draw(probs, generator if generator is not None else torch.default_generator)
