"""Batch-invariant float32 and bfloat16 attention, RMSNorm and SiLU gating on CPU (attention.c), for inference.

Why: GGUF models compute their linears on int8-quantized activations (ggml.py), so a last-bit
difference anywhere upstream flips codes and moves a log-probability by up to ~1. torch's SDPA
and reductions sum in an order that depends on how many rows, queries or keys a call has, so a
one-token decode step and the same token inside a prefill disagree in the last bits. These
kernels sum in one fixed order per query (per row): a token's output depends only on its own
inputs, its allowed keys and their order — not on the other tokens of the call, the number of
cache slots (masked slots are skipped, never added), the tiling or the thread count. The
AVX-512, AVX2 and scalar paths are bit-identical (see attention.c for the orders).

Key order is the order of the key axis. A static cache holds keys in position order; a rolling
(sliding-window) cache stores them by slot, which differs from position order once the window
has wrapped, so from then on a decode step and a recompute over positions sum the same terms in
different orders (differences of float32 rounding, no longer bitwise equal).

The SiLU-gated product (silu(g) * u, the MLP's) is here for one reason: the fused decode step
(step.c) computes it in C, and a layer run from Python must compute the very same bits, which
torch's own exp does not promise.

bfloat16 tensors take the same kernels' bf16 twins: float32 arithmetic on the widened values (exact),
in the same orders, rounded to bf16 where torch's bf16 expression rounds. So a bf16 result is
what the float32 kernel computes from the widened inputs, rounded (attention: once, at the end;
RMSNorm: `weight * (x * r).to(bf16)` as MistralRMSNorm; SiLU: `F.silu(g) * u`, each op rounded),
and it is batch-invariant the same way. K and V are widened as they are read, never copied.
float32 queries over a float16 or bfloat16 cache (a GGUF model's `kv_cache_dtype`) load it the same
way: the result is the float32 kernel's on the widened keys and values, exactly, in float32.

`reference_attention` / `reference_rmsnorm` / `reference_silu_mul` are the definitions in torch (SDPA's semantics:
a query with no allowed key gets zeros); the kernels agree with them to float32 rounding (bf16: to
one bf16 rounding step, since the float32 values the roundings see differ in their last bits).
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from ..errors import InputError
from . import build


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = build.library("attention")
    if lib is None:
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.mlm_attention.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_float, ptr, ctypes.c_int]
    lib.mlm_attention.restype = ctypes.c_int
    lib.mlm_rmsnorm.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_float, ptr, ctypes.c_int]
    lib.mlm_rmsnorm.restype = None
    lib.mlm_silu_mul.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr, ctypes.c_int]
    lib.mlm_silu_mul.restype = None
    lib.mlm_attention_bf16.argtypes = lib.mlm_attention.argtypes
    lib.mlm_attention_bf16.restype = ctypes.c_int
    for name in ("mlm_attention_kv16", "mlm_attention_kvf16"):
        getattr(lib, name).argtypes = lib.mlm_attention.argtypes
        getattr(lib, name).restype = ctypes.c_int
    lib.mlm_f32_to_f16.argtypes = [ptr, i64, ptr]
    lib.mlm_f16_to_f32.argtypes = [ptr, i64, ptr]
    lib.mlm_rmsnorm_bf16.argtypes = lib.mlm_rmsnorm.argtypes
    lib.mlm_rmsnorm_bf16.restype = None
    lib.mlm_silu_mul_bf16.argtypes = lib.mlm_silu_mul.argtypes
    lib.mlm_silu_mul_bf16.restype = None
    return lib


_available: bool | None = None


def available() -> bool:
    """Whether the C library is built and loaded (a plain global after the first call, which
    torch.compile reads without tracing the loader)."""
    global _available
    if _available is None:
        _available = _lib() is not None
    return _available


def _inference_tensors(dtype: torch.dtype, tensors: tuple[torch.Tensor, ...]) -> bool:
    grad = torch.is_grad_enabled()
    return all(t.dtype == dtype and t.device.type == "cpu" and not (grad and t.requires_grad) for t in tensors)


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the float32 kernels take these tensors: float32 on CPU, no autograd through them."""
    return _inference_tensors(torch.float32, tensors) and available()


def supports_bf16(*tensors: torch.Tensor) -> bool:
    """Whether the bfloat16 kernels take these tensors: bfloat16 on CPU, no autograd through them."""
    return _inference_tensors(torch.bfloat16, tensors) and available()


def supports_kv16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernels for float32 queries over a bfloat16 or float16 KV cache take these tensors."""
    return (_inference_tensors(torch.float32, (q,)) and k.dtype in _KV16 and _inference_tensors(k.dtype, (k, v))
            and available())


_KV16 = {torch.bfloat16: "mlm_attention_kv16", torch.float16: "mlm_attention_kvf16"}


def _storage_dtype(op: str, *tensors: torch.Tensor) -> torch.dtype:
    """The one dtype the kernels compute in (float32 or bfloat16), or an error naming the mix."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.bfloat16}:
        raise InputError(f"native {op} takes tensors that are all float32 or all bfloat16, got "
                         f"{[str(t.dtype) for t in tensors]}; cast them to one of the two first")
    return dtypes.pop()


# ------------------------------------------------------------------ attention
def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor:
    lib = _lib()
    if lib is None:
        return reference_attention(q, k, v, mask, scale)
    b, h, nq, d = q.shape
    h_kv, nk = k.shape[1], k.shape[2]
    if k.shape != (b, h_kv, nk, d) or v.shape != k.shape or h_kv == 0 or h % h_kv:
        raise InputError(f"attention needs q (B, H, Q, D) and k, v (B, H_kv, K, D) with H % H_kv == 0; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype == torch.float32 and k.dtype == v.dtype and k.dtype in _KV16:  # float32 model, 16-bit cache
        dtype, kernel = torch.float32, getattr(lib, _KV16[k.dtype])
    else:
        dtype = _storage_dtype("attention", q, k, v)
        kernel = lib.mlm_attention if dtype == torch.float32 else lib.mlm_attention_bf16
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    mstrides = (0, 0, 0)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise InputError(f"the native attention takes a boolean mask (True = allowed), got {mask.dtype}")
        mask = mask.expand(b, 1, nq, nk)
        mstrides = (mask.stride(0), mask.stride(2), mask.stride(3))
    out = torch.empty(b, nq, h, d, dtype=dtype)
    if out.numel() == 0:
        return out
    shape = (ctypes.c_int64 * 6)(b, h, h_kv, nq, nk, d)
    strides = (ctypes.c_int64 * 12)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mstrides)
    rc = kernel(q.data_ptr(), k.data_ptr(), v.data_ptr(), None if mask is None else mask.data_ptr(),
                shape, strides, scale, out.data_ptr(), torch.get_num_threads())
    if rc:
        raise MemoryError("native attention could not allocate its scratch memory") if rc == -2 else \
            InputError("native attention refused its arguments")
    return out


@torch.library.custom_op("mistral_lm::native_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """The kernel behind an opaque op, so torch.compile calls it instead of tracing ctypes."""
    return _attention(q, k, v, mask, scale)


@_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    b, h, nq, d = q.shape
    return q.new_empty((b, nq, h, d))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """q (B, H, Q, D), k and v (B, H_kv, K, D) CPU (any strides), all float32 or all bfloat16, or
    float32 q over bfloat16 or float16 k and v (a 16-bit KV cache), boolean mask (B, 1, Q, K) True = allowed
    or None = causal over the first Q keys -> out (B, Q, H, D) in q's dtype (bf16: the float32
    result on the widened inputs, rounded; float32 q: the float32 result on the widened k, v)."""
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v, mask, scale)
    return _attention(q, k, v, mask, scale)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """The definition: SDPA (zeros for a query with no allowed key), in (B, Q, H, D); bf16 inputs
    are attended in float32 and the result rounded once, as the kernel does."""
    wide = torch.promote_types(q.dtype, torch.float32)
    out = F.scaled_dot_product_attention(q.to(wide), k.to(wide), v.to(wide), attn_mask=mask, scale=scale,
                                         is_causal=mask is None, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).to(q.dtype)


# ------------------------------------------------------------------ RMSNorm
def _rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    lib = _lib()
    c = x.shape[-1]
    if lib is None:
        return reference_rmsnorm(x, weight, eps)
    dtype = _storage_dtype("rmsnorm", x)
    if weight.shape != (c,) or weight.dtype != dtype:
        raise InputError(f"rmsnorm of {dtype} x needs a {dtype} weight of shape ({c},), got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    kernel = lib.mlm_rmsnorm if dtype == torch.float32 else lib.mlm_rmsnorm_bf16
    x2 = x.reshape(-1, c)
    x2 = x2 if x2.stride(-1) == 1 or c == 1 else x2.contiguous()
    w = weight.contiguous()
    out = torch.empty(x2.shape, dtype=dtype)
    if out.numel():
        kernel(x2.data_ptr(), x2.shape[0], c, x2.stride(0), w.data_ptr(), eps, out.data_ptr(),
               torch.get_num_threads())
    return out.view(x.shape)


@torch.library.custom_op("mistral_lm::native_rmsnorm", mutates_args=())
def _rmsnorm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rmsnorm(x, weight, eps)


@_rmsnorm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim of float32 (..., C), each row summed
    in one fixed order, the same for one row or many and any thread count (torch's mean is
    too for rows of up to ~16k values, not beyond: measured with torch 2.13). bfloat16 x and
    weight -> bfloat16, with MistralRMSNorm's roundings: weight * (x * r).to(bf16)."""
    if torch.compiler.is_compiling():
        return _rmsnorm_op(x, weight, eps)
    return _rmsnorm(x, weight, eps)


def reference_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The definition in torch (MistralRMSNorm's expression; bf16: normalized in float32, rounded, then weighted)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# ------------------------------------------------------------------ SiLU-gated product
def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or n == 1 else t2.contiguous()


def _silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    lib = _lib()
    if lib is None or g.shape != u.shape:
        return reference_silu_mul(g, u)
    dtype = _storage_dtype("silu_mul", g, u)
    kernel = lib.mlm_silu_mul if dtype == torch.float32 else lib.mlm_silu_mul_bf16
    n = g.shape[-1]
    g2, u2 = _rows(g, n), _rows(u, n)
    out = torch.empty(g2.shape, dtype=dtype)
    if out.numel():
        kernel(g2.data_ptr(), g2.stride(0), u2.data_ptr(), u2.stride(0), g2.shape[0], n, out.data_ptr(),
               torch.get_num_threads())
    return out.view(g.shape)


@torch.library.custom_op("mistral_lm::native_silu_mul", mutates_args=())
def _silu_mul_op(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return _silu_mul(g, u)


@_silu_mul_op.register_fake
def _(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return g.new_empty(g.shape)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for float32 (..., N) tensors of one shape, elementwise in one fixed way (the
    fused decode step's), the same for every row count and thread count. bfloat16 g and u ->
    bfloat16, rounded as torch's `F.silu(g) * u` rounds: after the SiLU and after the product."""
    if torch.compiler.is_compiling():
        return _silu_mul_op(g, u)
    return _silu_mul(g, u)


def reference_silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The definition in torch (MistralMLP's expression; in bf16 each op rounds)."""
    return F.silu(g) * u
