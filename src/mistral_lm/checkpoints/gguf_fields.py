"""Fields of GGUF's quantized blocks in torch: the torch definitions of the block formats
(native/ggml.py's reference, quantization/gguf.py's int4 repacking) read the same fields of a
block, and read them here once. A leaf module: the checkpoint reader uses the native decoder,
which uses these."""

from __future__ import annotations

import torch


def f16_field(raw: torch.Tensor) -> torch.Tensor:
    """(..., 2) little-endian float16 bytes of a block -> (...) float32 (exact)."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def q4_k_scale_codes(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks (..., 144 bytes) -> the eight 6-bit scales and mins (..., 8) int64 of
    their 32-weight sub-blocks. The 12 bytes after d and dmin hold them: bytes 0-3 / 4-7 carry
    sub-blocks 0-3 in their low 6 bits and the top 2 bits of sub-blocks 4-7; bytes 8-11 the low
    4 bits of 4-7."""
    s = b[..., 4:16].long()
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], dim=-1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
    return sc, mn
