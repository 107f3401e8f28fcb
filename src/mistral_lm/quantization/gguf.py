"""GGUFLinear: llama.cpp's quantized blocks kept 4-bit, repacked without loss for torch's int4 kernel.

Every supported type is affine in 4-bit codes over 32-element groups along the input, which is
exactly Int4Linear's ``w = (q - 8) * scale + zero`` with group_size 32:

    Q4_0  w = d * (q - 8)                       scale = d           zero = 0
    Q4_1  w = d * q + m                         scale = d           zero = m + 8d
    Q4_K  w = d*sc_j * q - dmin*m_j             scale = d*sc_j      zero = 8*d*sc_j - dmin*m_j
          (256-weight super-blocks of eight 32-weight sub-blocks j with 6-bit sc_j, m_j)
    Q8_0  w = d * q, q int8 in [-128, 127]: with q + 128 = 16h + l, h and l nibbles, two planes
          over the input duplicated as [x, x]: plane h has scale 16d, zero 0 (16d*h - 128d),
          plane l scale d, zero 8d (d*l); their sum is d*q. Same kernel, 1.25 bytes/param.

d, m, dmin are float16 and sc_j, m_j small integers, so with float32 compute every scale and
zero above is exact. With bfloat16 compute (the fast path) each is rounded once to bfloat16,
relative 2^-9 (for a zero-centred block about 1/30 of a quantization step). Q6_K's 16-weight sub-blocks have no
such form (the kernel's smallest group is 32); other types are not supported either:
`GGUFLinear.supports` lets a loader dequantize those instead; `install_gguf_linears` is that
loader step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import gguf
import numpy as np
import torch
from torch import nn

from ..checkpoints.gguf import DECODE_ROWS, GGUFQuantizedTensor
from ..errors import CheckpointError
from .modules import Int4Linear

Q = gguf.GGMLQuantizationType


class QuantizedTensor(Protocol):
    """What `from_quantized` reads: raw blocks along the input dimension of each output row."""

    ggml_type: int
    shape: tuple[int, int]   # (out_features, in_features)
    data: np.ndarray         # uint8 (out_features, bytes_per_row)


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """(..., 2) little-endian float16 bytes -> (...) float32."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles_32(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 codes: element j is the low nibble of byte j, element j + 16 the high one."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _q4_0(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _f16(b[..., 0:2])
    return _nibbles_32(b[..., 2:18]), d, torch.zeros_like(d)


def _q4_1(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    return _nibbles_32(b[..., 4:20]), d, m + 8 * d


def _q4_k(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, blocks = b.shape[:2]
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    s = b[..., 4:16].long()
    # 12 bytes hold eight 6-bit scales and mins: bytes 0-3 / 4-7 carry sub-blocks 0-3 in their
    # low 6 bits and the top 2 bits of sub-blocks 4-7; bytes 8-11 the low 4 bits of 4-7.
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], dim=-1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
    # 128 bytes in 4 chunks of 32: low nibbles are sub-block 2i, high nibbles sub-block 2i + 1.
    qs = b[..., 16:144].reshape(n, blocks, 4, 1, 32)
    q = torch.cat([qs & 15, qs >> 4], dim=3).reshape(n, blocks, 8, 32)
    scale = d * sc
    return q, scale, 8 * scale - dmin * mn


def _q8_0(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _f16(b[..., 0:2])
    u = b[..., 2:34] ^ 128  # int8 q as a byte, XOR the sign bit: u = q + 128 in [0, 255]
    return torch.stack([u >> 4, u & 15]), torch.stack([16 * d, d]), torch.stack([torch.zeros_like(d), 8 * d])


# A decoder maps blocks (N, blocks, bytes) to codes, scale and zero in Int4Linear's convention,
# 32 codes per scale; Q8_0's carry a leading plane dimension of 2.
_Decoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
_DECODERS: dict[Q, _Decoder] = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q4_K: _q4_k, Q.Q8_0: _q8_0}


class GGUFLinear(Int4Linear):
    """A Linear computing directly on llama.cpp blocks (see the module docstring for the maths).

    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    >>> qt = SimpleNamespace(ggml_type=Q.Q4_1, shape=(64, 64), data=gguf.quants.quantize(w, Q.Q4_1))
    >>> GGUFLinear.from_quantized(qt)(torch.ones(1, 64)).shape
    torch.Size([1, 64])
    """

    def __init__(self, in_features: int, out_features: int, ggml_type: int, bias: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        if not self.supports(ggml_type):
            raise _unsupported(ggml_type)
        self._planes = 2 if ggml_type == Q.Q8_0 else 1  # read by Int4Linear.__init__ to size buffers
        super().__init__(in_features, out_features, bias, 32, compute_dtype, device)
        self.ggml_type = Q(ggml_type)

    @staticmethod
    def supports(ggml_type: int) -> bool:
        """Whether blocks of this type can be kept quantized (else a loader should dequantize)."""
        return ggml_type in {int(t) for t in _DECODERS}

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype = torch.bfloat16) -> GGUFLinear:
        """Build from raw blocks; `qt.shape` is (out_features, in_features)."""
        ggml_type = int(qt.ggml_type)
        out_features, in_features = (int(v) for v in qt.shape)
        if not cls.supports(ggml_type):
            raise _unsupported(ggml_type)
        block, type_size = gguf.GGML_QUANT_SIZES[Q(ggml_type)]
        raw = np.asarray(qt.data, dtype=np.uint8)
        if in_features % block or raw.size != out_features * in_features // block * type_size:
            raise CheckpointError(
                f"{_name(ggml_type)} tensor of shape {tuple(qt.shape)} needs {in_features // block * type_size} "
                f"bytes per row in blocks of {block} weights; got {raw.shape}"
            )
        module = cls(in_features, out_features, ggml_type, bias is not None, compute_dtype, "meta")
        raw = raw.reshape(out_features, -1)
        packed, scale_zero = [], []
        # a slice of rows at a time: a whole large head at once would hold several float copies
        for start in range(0, out_features, DECODE_ROWS):
            end = min(out_features, start + DECODE_ROWS)
            blocks = torch.from_numpy(raw[start:end].copy()).reshape(end - start, in_features // block, type_size)
            q, scale, zero = _plane_major(*_DECODERS[Q(ggml_type)](blocks), module._planes, end - start)
            pad = module._rows - out_features if end == out_features else 0
            p, sz = module._pack_rows(q, scale.to(compute_dtype), zero.to(compute_dtype), pad)
            packed.append(p)
            scale_zero.append(sz)
        module._set_packed(torch.cat(packed), torch.cat(scale_zero, dim=1))
        if bias is not None:
            module.bias = torch.nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return module

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ggml_type={self.ggml_type.name}"


def install_gguf_linears(model: nn.Module, blocks: dict[str, GGUFQuantizedTensor], tensors: dict[str, torch.Tensor],
                         dtype: torch.dtype) -> set[str]:
    """Swap each Linear whose weight came as GGUF blocks for a GGUFLinear on those blocks; put
    the rest (embeddings, unsupported types) into `tensors` dequantized to `dtype`. Returns the
    swapped module names. A tied lm_head computes on the embedding's blocks: the same numbers
    as the float tie, at the quantized size."""
    config: Any = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    tied = head is not None and config.tie_word_embeddings and "lm_head.weight" not in blocks
    embedding = "model.embed_tokens.weight"
    if tied and embedding in blocks:
        blocks = {**blocks, "lm_head.weight": blocks[embedding]}
    native: set[str] = set()
    for key, qt in blocks.items():
        name = key.removesuffix(".weight")
        module = model.get_submodule(name) if key.endswith(".weight") else None
        if isinstance(module, nn.Linear) and GGUFLinear.supports(qt.ggml_type):
            model.set_submodule(name, GGUFLinear.from_quantized(qt))
            native.add(name)
        elif key != "lm_head.weight" or not tied:
            tensors[key] = qt.dequantize(dtype)
    return native


def _plane_major(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, planes: int,
                 rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(planes, n, blocks, ...) decoder output -> (n, planes * K) codes and (n, planes * K/32)
    scales and zeros, each row's planes side by side (the kernel sees x repeated per plane)."""
    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(planes, rows, -1).permute(1, 0, 2).reshape(rows, -1)

    return flat(q), flat(scale), flat(zero)


def _unsupported(ggml_type: int) -> CheckpointError:
    return CheckpointError(
        f"GGML type {_name(ggml_type)} has no int4-kernel form; supported: "
        f"{', '.join(t.name for t in _DECODERS)}. Dequantize it (gguf.quants.dequantize) instead"
    )


def _name(ggml_type: int) -> str:
    try:
        return Q(ggml_type).name
    except ValueError:
        return str(ggml_type)
