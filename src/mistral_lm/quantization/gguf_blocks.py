"""GGUFBlockLinear: a Linear computing on a GGUF file's blocks, as llama.cpp does.

The weight is the file's own bytes: a read-only view of its memory map, or for Q4_0, Q4_1 and
Q8_0 the same bytes regrouped by 16 rows (`ggml.tile`, kept in a cache file beside the GGUF and
mapped the same way). Either way the pages are shared with the page cache and the model's
resident size is the file's. The product runs in `native.ggml`'s C kernels: activations are quantized to 8 bits per
32 values (llama.cpp's q8 scheme) and multiplied with the 4/6/8-bit codes by integer dot
products, then scaled in float32. Each output element is computed the same way whatever the
number of rows, threads or output columns of the call, so a token's logits from a one-row decode
step equal those of a many-row prefill (the server's logprobs rely on it).

It is a GGUFLinear for everything that asks (`isinstance`): no safetensors form, no merge of
adapters into the blocks; peft's LoRA wraps it like the other quantized layers, and the input
gradient (LoRA below it) multiplies by the dequantized rows, a slice at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..matvec import dense_linear
from ..native import ggml
from .gguf import GGUFLinear, Q, _name
from .modules import QuantizedLinear

_GRAD_ROWS = 4096  # weight rows dequantized at a time for the input gradient


def available(ggml_type: int) -> bool:
    """Whether blocks of this type run on the native kernels here (compiled, type supported)."""
    return ggml.available() and int(ggml_type) in ggml.SUPPORTED


def as_tensor(rows: np.ndarray) -> torch.Tensor:
    """(N, bytes) uint8 numpy rows as a torch tensor sharing their memory (a read-only map
    included: the kernels only read it, and torch's warning about writability is moot)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(rows) if rows.strides[-1] != 1 else rows)


class GGUFBlockLinear(GGUFLinear):
    """y = x @ W.T with W in GGUF blocks (N, row_bytes), computed by the native kernels.

    >>> import gguf
    >>> w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    >>> blocks = as_tensor(gguf.quants.quantize(w, Q.Q4_0))
    >>> GGUFBlockLinear(blocks, Q.Q4_0, 64)(torch.ones(1, 64)).shape
    torch.Size([1, 64])
    """

    portable_names = ()
    _buffer_names = ("blocks",)

    def __init__(self, blocks: torch.Tensor, ggml_type: int, in_features: int,
                 row_order: np.ndarray | torch.Tensor | None = None, tiled: bool = False) -> None:
        if int(ggml_type) not in ggml.SUPPORTED:
            raise CheckpointError(f"no native kernel for {_name(int(ggml_type))} blocks; "
                                  f"supported: {sorted(_name(t) for t in ggml.SUPPORTED)}")
        want = ggml.row_bytes(int(ggml_type), in_features)
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != want:
            raise CheckpointError(f"{_name(int(ggml_type))} blocks for {in_features} inputs must be uint8 "
                                  f"(rows, {want}); got {tuple(blocks.shape)} {blocks.dtype}")
        ggml.check_tiled(blocks, int(ggml_type) | (ggml.TILED if tiled else 0))
        QuantizedLinear.__init__(self, in_features, blocks.shape[0], False, torch.float32, None)
        self.ggml_type = Q(int(ggml_type))
        # what the kernels are told: the type, flagged when `blocks` holds the tiled layout
        self.kernel_type = int(ggml_type) | (ggml.TILED if tiled else 0)
        self.group_size = 32
        self._planes = 1
        self.register_buffer("blocks", blocks, persistent=False)
        # llama.cpp stores Q/K rows permuted for its rotary layout: output i is stored row
        # row_order[i]. Gathering the outputs costs an (M, N) copy per call; gathering the
        # blocks would copy a tenth of a 7B's weights out of the shared file pages.
        order = None if row_order is None else torch.as_tensor(np.asarray(row_order), dtype=torch.long)
        if order is not None and sorted(order.tolist()) != list(range(blocks.shape[0])):
            raise CheckpointError(f"row_order must be a permutation of the {blocks.shape[0]} rows")
        self.register_buffer("row_order", order, persistent=False)

    @classmethod
    def tiled_from(cls, rows: torch.Tensor, ggml_type: int, in_features: int,
                   row_order: np.ndarray | torch.Tensor | None = None) -> GGUFBlockLinear:
        """The layer on a tiled copy of the file's `rows` (`ggml.tile`): the same products, bit
        for bit, with a decode step's weights read as one stream per 16 rows."""
        return cls(ggml.tile(rows, int(ggml_type), in_features), ggml_type, in_features, row_order, tiled=True)

    @property
    def tiled(self) -> bool:
        return bool(self.kernel_type & ggml.TILED)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = ggml.linear(x, self.blocks, self.kernel_type)
        return y if self.row_order is None else y.index_select(-1, self.row_order)

    def dequantize(self) -> torch.Tensor:
        w = ggml.dequantize(self.blocks, self.kernel_type, self.in_features)
        return w if self.row_order is None else w.index_select(0, self.row_order)

    def _input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(grad.shape[0], self.in_features, dtype=grad.dtype, device=grad.device)
        for start in range(0, self.out_features, _GRAD_ROWS):
            end = min(self.out_features, start + _GRAD_ROWS)
            rows = torch.arange(start, end) if self.row_order is None else self.row_order[start:end]
            w = ggml.dequantize(self.blocks, self.kernel_type, self.in_features, rows=rows).to(grad.dtype)
            out += dense_linear(grad[:, start:end], w.T)
        return out

    def weight_bytes(self) -> int:
        return self.blocks.shape[0] * self.blocks.shape[1]  # the order, if any, is not weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, ggml_type={self.ggml_type.name}, kernel=native"
                + (", layout=tiled" if self.tiled else ""))

    # The blocks have no portable (safetensors) form: save_pretrained refuses GGUFLinears.
    def _portable_shapes(self) -> dict[str, tuple[int, ...]]:
        return {}

    def _portable_state(self) -> dict[str, torch.Tensor]:
        return {}

    def _load_portable(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise CheckpointError("GGUF block layers load from their .gguf file, not from a state dict")

    @classmethod
    def concat(cls, parts: Sequence[QuantizedLinear]) -> QuantizedLinear | None:
        return None  # the parts read the file's pages; a fused copy would double them

    def can_view_rows(self, start: int) -> bool:
        return False

    def _apply(self, fn: Any, recurse: bool = True) -> GGUFBlockLinear:
        """Dtype casts leave the blocks alone; the kernels run on the CPU only."""
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.detach()), requires_grad=False)
        target = fn(torch.empty(0)).device
        if target.type != "cpu":
            raise ConfigError(f"GGUF block layers compute on the CPU; cannot move them to {target}. Load the "
                              "file with quantize='none' (or without gguf_native) to run it elsewhere")
        return self


_WRITES = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
           "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__", "set_"}


class DecodedTable(torch.Tensor):
    """A GGUF block table decoded for reading (`GGUFBlockEmbedding.weight`). Writing into it would
    change this copy and leave the table, the file's pages, as it was: in-place operations, item
    assignment, `out=` into it and `.data` writes raise instead. Everything computed from it is a
    plain tensor."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else None
        if isinstance(target, DecodedTable) and (name in _WRITES or (name.endswith("_") and not name.endswith("__"))) \
                or any(isinstance(t, DecodedTable) for t in _as_tuple(kwargs.get("out"))):
            raise ConfigError("a GGUF block embedding's weight is a decoded copy of the file's blocks; writing into "
                              "it would change nothing. Load the model with quantize='none' (or without "
                              "gguf_native) to edit the embedding table")
        if name == "__get__" and getattr(func, "__self__", None) is not None and \
                getattr(func.__self__, "__name__", "") == "data":  # `.data`: the same read-only table
            return target
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _as_tuple(value: Any) -> tuple:
    return value if isinstance(value, (tuple, list)) else (value,)


class GGUFBlockEmbedding(nn.Module):
    """nn.Embedding's lookup on a GGUF table's blocks: only the rows asked for are decoded.

    The table stays the file's pages (the tied head multiplies with the same bytes), instead of
    a float copy that would be the largest tensor of a small model and half a gigabyte at 7B.
    `weight` decodes the whole table, for code that reads it; the model itself never does.
    """

    def __init__(self, blocks: torch.Tensor, ggml_type: int, embedding_dim: int,
                 padding_idx: int | None = None, dtype: torch.dtype = torch.float32, tiled: bool = False) -> None:
        super().__init__()
        if int(ggml_type) not in ggml.SUPPORTED or blocks.dtype != torch.uint8 or blocks.dim() != 2 \
                or blocks.shape[1] != ggml.row_bytes(int(ggml_type), embedding_dim):
            raise CheckpointError(f"cannot look up {_name(int(ggml_type))} rows of width {embedding_dim} in "
                                  f"blocks of shape {tuple(blocks.shape)}")
        ggml.check_tiled(blocks, int(ggml_type) | (ggml.TILED if tiled else 0))
        self.ggml_type = Q(int(ggml_type))
        self.kernel_type = int(ggml_type) | (ggml.TILED if tiled else 0)  # a tied head's tiled table
        self.num_embeddings, self.embedding_dim = blocks.shape[0], embedding_dim
        self.padding_idx = padding_idx
        self.output_dtype = dtype
        self.register_buffer("blocks", blocks, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = ggml.dequantize(self.blocks, self.kernel_type, self.embedding_dim, rows=ids.reshape(-1))
        return out.to(self.output_dtype).view(*ids.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The whole (num_embeddings, embedding_dim) table, decoded: a fresh tensor each time, which
        refuses in-place writes (they would change a copy, not the table)."""
        decoded = ggml.dequantize(self.blocks, self.kernel_type, self.embedding_dim).to(self.output_dtype)
        return decoded.as_subclass(DecodedTable)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, ggml_type={self.ggml_type.name}, kernel=native"
                + (", layout=tiled" if self.kernel_type & ggml.TILED else ""))

    def _apply(self, fn: Any, recurse: bool = True) -> GGUFBlockEmbedding:
        probe = fn(torch.empty(0, dtype=self.output_dtype))
        if probe.device.type != "cpu":
            raise ConfigError(f"GGUF block tables stay on the CPU; cannot move them to {probe.device}")
        if probe.dtype.is_floating_point:
            self.output_dtype = probe.dtype
        return self
