"""Attention kernels behind one signature, chosen by `attn_implementation`.

Every function takes q (B, H, Q, D), k and v (B, H_kv, K, D), a boolean mask (B, 1, Q, K) that
is True where attention is allowed, and returns (output (B, Q, H, D), weights or None). The mask
already encodes causality, the sliding window, padding and empty cache slots (see masks.py), so
the kernels never need to know about any of them. `mask=None` means plain causal attention of
Q queries over the same Q keys (a first prefill without padding): kernels that can skip the
masked half (SDPA's `is_causal`, flash-attn's `causal`) do. `causal=True` says the same of a
given mask that is causal and banded by `window` alone, for kernels that take a window instead
of a mask (flash-attn).

"native" (the default for float32 and bfloat16 models on CPU when the C kernels build) is batch-invariant:
a query's output does not depend on the other queries of the call, the number of cache slots or
the threads (native/attention.py), so a decode step equals that token of a prefill bit for bit.
It serves float32 and bfloat16 CPU inference; other dtypes, devices and autograd run on SDPA.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .native import attention as native

AttentionFn = Callable[..., "tuple[torch.Tensor, torch.Tensor | None]"]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, K, D) -> (B, H_kv * n_rep, K, D), each kv head serving n_rep query heads."""
    if n_rep == 1:
        return x
    b, h, k, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, k, d).reshape(b, h * n_rep, k, d)


def _kv_like(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v in q's dtype: a cache may store them narrower than the model computes (kv_cache_dtype)."""
    return (k, v) if k.dtype == q.dtype else (k.to(q.dtype), v.to(q.dtype))


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    dropout: float = 0.0, training: bool = False, *, causal: bool = False, window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path; the only one that returns attention weights. Softmax runs in float32."""
    if mask is None:
        mask = _causal(q.shape[2], k.shape[2], q.device)
    k, v = _kv_like(q, k, v)
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, H, Q, K)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, v).transpose(1, 2), weights


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    dropout: float = 0.0, training: bool = False, *, causal: bool = False, window: int | None = None,
) -> tuple[torch.Tensor, None]:
    """torch's fused scaled_dot_product_attention; GQA is handled by the kernel, not by copies."""
    k, v = _kv_like(q, k, v)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout if training else 0.0, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1], is_causal=mask is None,
    )
    return out.transpose(1, 2), None


def native_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    dropout: float = 0.0, training: bool = False, *, causal: bool = False, window: int | None = None,
) -> tuple[torch.Tensor, None]:
    """Our C kernel (native/attention.c), batch-invariant; SDPA where it does not apply
    (not float32 on CPU, gradients needed, dropout in training)."""
    if (training and dropout > 0.0) or not (native.supports(q, k, v) or native.supports_bf16(q, k, v)
                                             or native.supports_kv16(q, k, v)):
        return sdpa_attention(q, k, v, mask, scale, dropout, training)
    return native.attention(q, k, v, mask, scale), None


def flash_attention_2(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    dropout: float = 0.0, training: bool = False, *, causal: bool = False, window: int | None = None,
) -> tuple[torch.Tensor, None]:
    """flash-attn's kernel for the masks it can express; SDPA for the rest.

    flash-attn takes no arbitrary mask, only `causal` plus a window. That is exact when the keys
    are the queries themselves in order with nothing masked but the future and the window (a
    prefill without padding: `mask is None` or `causal`); a rolling cache or padding needs the
    explicit mask, so those steps run on SDPA (itself flash-backed on CUDA).
    """
    if mask is not None and not causal:
        return sdpa_attention(q, k, v, mask, scale, dropout, training)
    from flash_attn import flash_attn_func  # type: ignore[import-not-found]

    k, v = _kv_like(q, k, v)

    band = (window - 1, 0) if window is not None and window < k.shape[2] else (-1, -1)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          dropout_p=dropout if training else 0.0, softmax_scale=scale, causal=True, window_size=band)
    return out, None


def _causal(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()[None, None]


ATTENTION_FUNCTIONS: dict[str, AttentionFn] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flash_attention_2": flash_attention_2,
    "native": native_attention,
}


def default_implementation(dtype: torch.dtype | None = None) -> str:
    """The default kernel: "native" for float32, bfloat16 (or unknown) models when the C kernels are
    available, else "sdpa"."""
    return "native" if dtype in (None, torch.float32, torch.bfloat16) and native.available() else "sdpa"


def check_implementation(name: str | None, dtype: torch.dtype | None = None) -> str:
    """Validate an `attn_implementation` choice up front, with the fix in the message."""
    name = name or default_implementation(dtype)
    if name not in ATTENTION_FUNCTIONS:
        raise ConfigError(f"attn_implementation must be one of {sorted(ATTENTION_FUNCTIONS)}, got {name!r}")
    if name == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "attn_implementation='flash_attention_2' needs the flash-attn package "
                "(pip install flash-attn --no-build-isolation); use 'sdpa' otherwise"
            )
        if not torch.cuda.is_available():
            raise ConfigError("attn_implementation='flash_attention_2' needs a CUDA GPU; use 'sdpa' on CPU")
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            raise ConfigError(
                f"flash_attention_2 runs in float16 or bfloat16, not {dtype}; pass torch_dtype=torch.float16"
            )
    return name
