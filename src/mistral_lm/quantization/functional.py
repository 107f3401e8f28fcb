"""Pure quantize / dequantize functions: the numeric definitions everything else is tested against.

Weights are (N, K) = (out_features, in_features); groups (blocks) run along K, so every
function below reshapes to (N, K // group, group). Each scheme states its formula once:

- int8:  w ≈ q * scale[n],                       q in [-127, 127], symmetric per output row.
- int4:  w ≈ (q - 8) * scale[n, g] + zero[n, g], q in [0, 15]; asymmetric (min/max) per group.
         This is torch's int4 kernel convention: the zero point is a float offset around the
         mid-point 8, not an integer subtracted from q (see kernels.py).
- nf4/fp4: w ≈ codebook[q] * absmax[n, g],       q in [0, 15]; bitsandbytes' 4-bit formats,
         q is the codebook entry nearest to w / absmax.
"""

from __future__ import annotations

import torch

# bitsandbytes' NormalFloat4: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_CODEBOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
# bitsandbytes' FP4 (its dDequantizeFP4Tree): bit 3 is the sign, bits 0-2 pick a magnitude.
FP4_CODEBOOK = torch.tensor([
    0.0, 0.005208333333, 0.6666666667, 1.0, 0.3333333333, 0.5, 0.1666666667, 0.25,
    -0.0, -0.005208333333, -0.6666666667, -1.0, -0.3333333333, -0.5, -0.1666666667, -0.25,
])
CODEBOOKS = {"nf4": NF4_CODEBOOK, "fp4": FP4_CODEBOOK}


def _groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features ({k}) is not a multiple of the group size ({group_size})")
    return weight.float().reshape(n, k // group_size, group_size)  # (N, G, group)


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: (q int8 (N, K), scale (N,) in `scale_dtype`).

    The scale is rounded to `scale_dtype` before q is chosen, so q is the best code for the
    scale actually stored. An all-zero row gets scale 1 (any scale reproduces it).
    """
    w = weight.to(torch.float32, copy=True)  # the one full-size temporary: the rest works in place
    low, high = w.aminmax(dim=1)
    absmax = torch.maximum(-low, high)
    scale = torch.where(absmax > 0, absmax / 127, 1.0).to(scale_dtype)
    q = w.div_(scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 (N, K) = q * scale[n]."""
    return q.float() * scale.float()[:, None]


def quantize_int4(
    weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4-bit: (q uint8 (N, K) in [0, 15], scale (N, G), zero (N, G)).

    scale = (max - min) / 15 and zero = min + 8 * scale, so codes 0..15 span [min, max]; both
    are rounded to `scale_dtype` first and q is the nearest level of what is stored. A
    constant group gets scale 0 and q = 8, i.e. w = zero.
    """
    w = _groups(weight, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).to(scale_dtype)
    zero = (lo + 8 * scale.float()).to(scale_dtype)
    s, z = scale.float()[..., None], zero.float()[..., None]
    # in place after the first pass: quantizing a model at load time is bound by these passes
    q = (w - z).div_(torch.where(s > 0, s, 1.0)).round_().add_(8).clamp_(0, 15).masked_fill_(s == 0, 8)
    return q.to(torch.uint8).reshape(weight.shape), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 (N, K) = (q - 8) * scale[n, g] + zero[n, g]; the group size is K // G."""
    n, k = q.shape
    w = (q.float() - 8).reshape(n, scale.shape[1], -1) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(n, k)


def quantize_4bit_codebook(
    weight: torch.Tensor, codebook: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes-style 4-bit: (q uint8 (N, K) in [0, 15], absmax float32 (N, K // blocksize)).

    q is the codebook entry nearest to w * (1 / absmax) (bitsandbytes' decision trees compare
    against the mid-points between sorted entries; bucketize over those mid-points is the same
    rule). The scale is bitsandbytes' arithmetic, the float32 reciprocal of absmax times w, not
    a division: the two round differently, and weights that sit on a mid-point (GGUF-decoded
    weights often do) then get another code.
    """
    n, k = weight.shape
    if k % blocksize:
        raise ValueError(f"in_features ({k}) is not a multiple of the group size ({blocksize})")
    values, order = codebook.to(weight.device).sort(stable=True)
    mids, order = (values[1:] + values[:-1]) / 2, order.to(torch.uint8)
    q = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(n, k // blocksize, dtype=torch.float32, device=weight.device)
    step = max(1, _CODEBOOK_VALUES // max(1, k))  # rows at a time: the float32 and index temporaries stay bounded
    for start in range(0, n, step):
        w = _groups(weight[start:start + step], blocksize)
        part = w.abs().amax(dim=-1)
        normed = w * (1.0 / torch.where(part > 0, part, 1.0))[..., None]
        q[start:start + step] = order[torch.bucketize(normed, mids, out_int32=True)].reshape(-1, k)
        absmax[start:start + step] = part
    return q, absmax


# Weight values `quantize_4bit_codebook` takes at a time (every row is quantized on its own).
_CODEBOOK_VALUES = 1 << 20


def dequantize_4bit_codebook(q: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """float32 (N, K) = codebook[q] * absmax[n, g]; the block size is K // G."""
    n, k = q.shape
    w = codebook.to(q.device)[q.long()].reshape(n, absmax.shape[1], -1) * absmax.float()[..., None]
    return w.reshape(n, k)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K // 2) bytes, even k in the high nibble.

    That is bitsandbytes' order and the input order of torch's CUDA int4 packer, so one
    portable layout serves the state dict and the CUDA path.
    """
    return ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: (N, K // 2) bytes -> (N, K) codes."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)
