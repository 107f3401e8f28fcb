"""Rotary position embeddings in the Hugging Face half-split layout.

Pure functions. Angles are computed in float32 from absolute positions: in half precision,
`position * inv_freq` loses integer precision past a few thousand tokens, and the rotation of
nearby positions would collide.
"""

from __future__ import annotations

import threading

import numpy as np
import torch


def inv_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """(head_dim // 2,) float32: theta ** (-2i / head_dim)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for `position_ids` (B, T) -> two (B, T, head_dim) float32 tensors.

    On the CPU the float32 angles' cos and sin come from numpy in float64, rounded once: torch's
    float32 cos splits a table over 2048 elements across threads, and on one Xeon the worker
    thread's half came out 1.5e-4 off in about one fresh process in ten, enough to change a greedy
    continuation between two runs of the same command."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # (B, T, D/2)
    if freqs.device.type == "cpu" and not torch.compiler.is_compiling():
        angles = freqs.detach().numpy().astype(np.float64)
        cos, sin = (torch.from_numpy(f(angles).astype(np.float32)) for f in (np.cos, np.sin))
    else:
        cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)  # (B, T, D): half-split layout


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """`sin` with its first half negated: the table `rotate` takes.

    The half-split rotation cat(-x2, x1) = roll(x, D/2) * [-1.., +1..], so folding the signs into the
    table once per forward turns every layer's rotation into one roll and two multiply-adds."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


_TABLE_LIMIT = 1 << 17  # positions past it are computed per step: a table stays under 128 MB at D=128
_TABLES: dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]] = {}
_TABLES_LOCK = threading.Lock()


def _grown(head_dim: int, theta: float, need: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (n, head_dim) cos and signed sin rows of positions [0, n), n >= need: rows 0..n-1 of
    `cos_sin` and `signed_sin`, the same bits. Grown by doubling under a lock; a reader holds
    the tuple it got, so a growth never changes rows under it."""
    with _TABLES_LOCK:
        table = _TABLES.get((head_dim, theta))
        if table is None or table[0].shape[0] < need:
            n = min(_TABLE_LIMIT, max(need, 256, 2 * (0 if table is None else table[0].shape[0])))
            cos, sin = cos_sin(torch.arange(n)[None], inv_frequencies(head_dim, theta))
            table = _TABLES[(head_dim, theta)] = (cos[0], signed_sin(sin)[0])
        return table


def step_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) tables for `positions` (B, T): `cos_sin` and `signed_sin`, read for CPU
    positions from rows cached per (head_dim, theta), so a decode step looks its rows up instead
    of computing a dozen small tensors; the same bits."""
    if positions.device.type == "cpu" and not torch.compiler.is_compiling() and positions.numel():
        lo, hi = (int(v) for v in torch.aminmax(positions))
        if lo >= 0 and hi < _TABLE_LIMIT:
            table = _TABLES.get((head_dim, theta))
            if table is None or table[0].shape[0] <= hi:
                table = _grown(head_dim, theta, hi + 1)
            return table[0][positions], table[1][positions]
    cos, sin = cos_sin(positions, inv_frequencies(head_dim, theta, positions.device))
    return cos, signed_sin(sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + cat(-x2, x1) * sin in float32 (x1, x2 the halves of x), returned in x's dtype;
    the tables broadcast to x."""
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin_signed).to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the (B, T, D) tables of `cos_sin`: `rotate` with the signs
    folded in here rather than once per forward, as the model does."""
    return rotate(x, cos[:, None], signed_sin(sin)[:, None])
