"""Weight-only quantized Linears and `quantize_model`, the module swap.

Every module casts its input to `compute_dtype`, runs its matmul, casts back to the input's
dtype and adds the bias. Codes live in non-persistent buffers in whatever layout the kernel
wants; the state dict carries a *portable* form instead (`portable_names`), because torch's
packed int4 layout depends on the device and even on the CPU's vector width. So
``quantize_model(fresh_model, config).load_state_dict(saved)`` restores a quantized model on
any machine, including one built on the meta device.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError, InputError
from .config import GROUP_SIZES, BitsAndBytesConfig
from .functional import (CODEBOOKS, dequantize_4bit_codebook, dequantize_int4, dequantize_int8,
                         pack_nibbles, quantize_4bit_codebook, quantize_int4, quantize_int8,
                         unpack_nibbles)
from ..matvec import dense_linear, gemm_rhs
from ..native import dense as native_dense
from ..native import nf4 as native_nf4
from .kernels import (INT4_ROW_ALIGN, dequantize_int4_t, fast_unpack_available, int4_dense_weight,
                      int4_kernel_rows, int4_mm, int8_kernel_rows, int8_mm, pack_int4, unpack_int4)


_CHUNK_ROWS = 2048  # output rows per expanded slice (a multiple of 64, the int4 block height)


def _by_row_chunks(m: int, n: int, x: torch.Tensor, rows_fn: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """(M, N) output assembled from `rows_fn(start, end)` -> (M, end - start) slices.

    Expanding a 4-bit weight writes 2-4 bytes per weight, so a large head would allocate its
    whole float copy per call; slices stay in cache (bench/RESULTS.md)."""
    if n <= _CHUNK_ROWS:
        return rows_fn(0, n)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    for start in range(0, n, _CHUNK_ROWS):
        end = min(n, start + _CHUNK_ROWS)
        out[:, start:end] = rows_fn(start, end)
    return out


class _MatmulWithInputGrad(torch.autograd.Function):
    """`module._matmul(x)` with a gradient for x (LoRA below a frozen quantized layer needs it):
    the int4 kernels have no derivative, so backward multiplies by the dequantized weight, as
    bitsandbytes' layers do. The weight itself gets none: quantized codes are not trained."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
        ctx.module = module
        return module._matmul(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.module._input_grad(grad), None


class QuantizedLinear(nn.Module):
    """Base class: cast to `compute_dtype`, `_matmul`, cast back, add the bias.

    Subclasses define `portable_names` / `_portable_shapes` / `_portable_state` /
    `_load_portable` (the state-dict form), `_matmul` and `dequantize`.
    """

    portable_names: tuple[str, ...] = ()  # the state-dict entries
    _buffer_names: tuple[str, ...] = ()   # the in-memory (kernel-layout) buffers

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise InputError(f"{type(self).__name__} expects inputs with last dimension "
                             f"{self.in_features}, got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.in_features).to(self.compute_dtype)     # (M, K)
        product = _MatmulWithInputGrad.apply(flat, self) if flat.requires_grad else self._matmul(flat)
        y = product.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) in compute_dtype -> (M, N) in compute_dtype."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The float32 (N, K) weight this module multiplies by."""
        raise NotImplementedError

    def _input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """(M, N) gradient of the output -> (M, K) gradient of the input, in grad's dtype."""
        return dense_linear(grad, self.dequantize().to(grad.dtype).T)

    def weight_bytes(self) -> int:
        """Bytes held for the weight: codes, scales and zeros, padding included; not the bias."""
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}")

    # ---------------------------------------------------------------- portable state
    def _portable_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _portable_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load_portable(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _init_storage(self, device: torch.device | str | None, dtypes: dict[str, torch.dtype]) -> None:
        """Register the in-memory buffers and fill them with zero codes of the right shapes, for
        `from_linear` or a state-dict load to replace."""
        for name in self._buffer_names:
            self.register_buffer(name, None, persistent=False)
        self._load_portable({name: torch.zeros(shape, dtype=dtypes[name], device=device)
                             for name, shape in self._portable_shapes().items()})

    def _device(self) -> torch.device:
        return next(self.buffers(recurse=False)).device

    @classmethod
    def concat(cls, parts: Sequence[QuantizedLinear]) -> QuantizedLinear | None:
        """One module computing cat([p(x) for p in parts], -1), or None if the parts differ in
        class or settings. Every format stores codes, scales and zeros row by row, so the
        result is the parts' portable states stacked along rows (fusion.py's q/k/v, gate/up)."""
        first = parts[0]
        if any(type(p) is not type(first) or p._settings() != first._settings() for p in parts):
            return None
        fused = first._resized(sum(p.out_features for p in parts))
        if not _stacked_in_place(fused, parts):
            states = [p._portable_state() for p in parts]
            fused._load_portable({name: torch.cat([s[name] for s in states]) for name in states[0]})
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)  # type: ignore[union-attr]
        return fused

    @classmethod
    def stacked_rows(cls, fused: QuantizedLinear, sizes: Sequence[int]) -> list[QuantizedLinear] | None:
        """Modules for consecutive row ranges of `fused` (of `sizes` rows) whose buffers are views
        of its own, or None where this format's buffers are not its portable state (a layout
        that packs several rows together). A loader quantizes a fusable group (q/k/v, gate/up)
        at once this way: each format's rows are quantized independently (see `concat`), and
        fusing the parts later finds them stacked already, with nothing to copy."""
        if not cls.buffers_are_portable() or sum(sizes) != fused.out_features:
            return None
        state, parts, start = fused._portable_state(), [], 0
        for rows in sizes:
            part = fused._resized(rows)
            part._load_portable({name: tensor[start:start + rows] for name, tensor in state.items()})
            parts.append(part)
            start += rows
        return parts

    @classmethod
    def buffers_are_portable(cls) -> bool:
        """Whether the in-memory buffers are the portable state itself, row for row (not a
        layout that packs several rows together): row ranges of them are then modules too."""
        return cls.portable_names == cls._buffer_names

    def _resized(self, out_features: int) -> QuantizedLinear:
        """A shallow copy with dicts of its own and `out_features` rows, for buffers to be set."""
        twin = copy.copy(self)
        twin._parameters, twin._buffers, twin._modules = dict(self._parameters), dict(self._buffers), {}
        twin.out_features = out_features
        return twin

    @property
    def qweight(self) -> torch.Tensor:
        """The codes' main buffer (GPTQ's name for it): where libraries such as peft read a
        quantized layer's device from, and what fusion.py makes a view of."""
        return getattr(self, self._buffer_names[0])

    def can_view_rows(self, start: int) -> bool:
        """Whether this module's storage can be rows start.. of a fused module's (`view_rows`)."""
        return False

    def view_rows(self, fused: QuantizedLinear, start: int) -> None:
        """Make this module's buffers views of rows start..start+out_features of `fused`'s, which
        stacks this module's rows there (fusion.py: the parts stay, the memory is held once)."""
        raise NotImplementedError

    def _settings(self) -> dict[str, Any]:
        """Public attributes that must agree for modules to be stacked (not their sizes)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("out_features", "training")}

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, tensor in self._portable_state().items():
            destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        keys = {name: prefix + name for name in self.portable_names}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in keys.values()]
        absent = [key for key in keys.values() if key not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        state = {name: state_dict[key] for name, key in keys.items()}
        wrong = [f"{keys[name]}: expected shape {shape}, got {tuple(state[name].shape)}"
                 for name, shape in self._portable_shapes().items() if tuple(state[name].shape) != shape]
        if wrong:
            error_msgs.append("; ".join(wrong))
            return
        self._load_portable(state)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedLinear:
        """`.to(dtype)` / `.half()` leave codes and scales alone: the compute dtype belongs to the
        quantization, not to the surrounding model. A device move re-packs through the portable
        form, since packed layouts differ between devices. The bias follows `fn` as usual."""
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.detach()), requires_grad=False)
        source = self._device()
        target = fn(torch.empty(0, device=source)).device
        if target != source:
            state = self._portable_state()
            if source.type == "meta":  # to_empty(): nothing to copy, only storage to make
                self._load_portable({k: torch.zeros_like(v, device=target) for k, v in state.items()})
            else:
                self._load_portable({k: v.to(target) for k, v in state.items()})
        return self


class Int8Linear(QuantizedLinear):
    """Symmetric per-output-channel int8 weight: w = weight[n, k] * weight_scale[n].

    Decode (bfloat16, up to `native_max_rows` rows, CPU, no autograd) runs the native kernel
    (`native.dense.linear_int8`): it is batch-invariant, a row's output bits depend only on that
    row and the weight, so the fused decode step, which calls the same C kernel on row slices of
    the weight, reproduces this module bit for bit; it also streams the weights 1.4-2.5x faster
    than torch's kernel there and takes any K. Other small M runs torch's `_weight_int8pack_mm` (bfloat16, K % 16 ==
    0); otherwise, and from INT8_DENSE_MIN_ROWS rows on, the weight is expanded into the compute
    dtype for F.linear. 1 byte/param + 2 or 4 bytes per output row.
    """

    portable_names = _buffer_names = ("weight", "weight_scale")
    native_max_rows = 8  # decode batches; the fused step's bound too

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype, device)
        self._init_storage(device, {"weight": torch.int8, "weight_scale": compute_dtype})

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        """Quantize an nn.Linear (scales rounded to `compute_dtype` before codes are chosen)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype,
                     "meta")  # storage comes from _load_portable, on the weight's device
        codes = native_dense.quantize_int8(linear.weight.detach(), compute_dtype)  # bit-equal, faster
        weight, scale = codes if codes is not None else quantize_int8(linear.weight.detach(), compute_dtype)
        module._load_portable({"weight": weight, "weight_scale": scale})
        _copy_bias(module, linear)
        return module

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._native(x):
            return native_dense.linear_int8(x, self.weight, self.weight_scale)  # ``mistral_lm::int8_linear`` compiled
        if x.shape[0] < self._kernel_rows and x.dtype == torch.bfloat16:
            return int8_mm(x, self.weight, self.weight_scale)
        return dense_linear(x, self.weight.to(x.dtype) * self.weight_scale[:, None])

    def _native(self, x: torch.Tensor) -> bool:
        """Decode-sized bfloat16 on the CPU with no autograd through it (the kernel has no backward)."""
        return (x.shape[0] <= self.native_max_rows and x.dtype == torch.bfloat16 and x.device.type == "cpu"
                and self.weight_scale.dtype == torch.bfloat16 and native_dense.available()
                and not (torch.is_grad_enabled() and x.requires_grad))

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scale)

    def _portable_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.out_features, self.in_features), "weight_scale": (self.out_features,)}

    def _portable_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "weight_scale": self.weight_scale}

    def can_view_rows(self, start: int) -> bool:
        return True

    def view_rows(self, fused: QuantizedLinear, start: int) -> None:
        end = start + self.out_features
        self.weight, self.weight_scale = fused.weight[start:end], fused.weight_scale[start:end]

    def _load_portable(self, state: dict[str, torch.Tensor]) -> None:
        self.weight = state["weight"].to(torch.int8).contiguous()
        self.weight_scale = state["weight_scale"].to(self.compute_dtype).contiguous()
        self._kernel_rows = int8_kernel_rows(self.weight.device, self.in_features)


class Int4Linear(QuantizedLinear):
    """Group-wise affine 4-bit weight: w = (q - 8) * scale[n, g] + zero[n, g], q in [0, 15].

    In memory: `packed`, torch's int4 layout for the current device (rows padded to a multiple
    of 64), and `scale_and_zero` (K / group_size, N, 2) in the compute dtype, the kernel's
    operand. 0.5 + 4 / group_size bytes/param with bfloat16 scales (0.5625 at group 64). Small
    M runs the int4 kernel; prefill (INT4_DENSE_MIN_ROWS rows on) expands the weight once.
    State dict: weight_packed (N, K/2) `pack_nibbles` bytes, weight_scale and weight_zero (N, G).
    """

    portable_names = ("weight_packed", "weight_scale", "weight_zero")
    _buffer_names = ("packed", "scale_and_zero")
    _planes = 1  # copies of x the kernel sees; GGUFLinear's Q8_0 splits a byte into 2 planes
    _strided = False  # scale_and_zero is a row view of a fused module's (view_rows)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 64,
                 compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype, device)
        if group_size not in GROUP_SIZES or in_features % group_size:
            raise ConfigError(f"group_size must be one of {GROUP_SIZES} and divide in_features "
                              f"({in_features}), got {group_size}")
        self.group_size = group_size
        self._init_storage(device, {"weight_packed": torch.uint8, "weight_scale": compute_dtype,
                                    "weight_zero": compute_dtype})

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64,
                    compute_dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
        """Quantize an nn.Linear with min/max groups (see `quantize_int4`)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                     compute_dtype, "meta")  # storage comes from _set_codes, on the weight's device
        q, scale, zero = quantize_int4(linear.weight.detach(), group_size, compute_dtype)
        module._set_codes(q, scale, zero)
        _copy_bias(module, linear)
        return module

    @property
    def _columns(self) -> int:
        return self.in_features * self._planes

    @property
    def _rows(self) -> int:
        return -(-self.out_features // INT4_ROW_ALIGN) * INT4_ROW_ALIGN

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.repeat(1, self._planes) if self._planes > 1 else x.contiguous()  # (M, planes*K)
        if x.shape[0] < self._kernel_rows and x.dtype == torch.bfloat16:
            scale_and_zero = self.scale_and_zero.contiguous() if self._strided else self.scale_and_zero
            y = int4_mm(wide, self.packed, self.group_size, scale_and_zero)
        else:  # packed rows start..end hold exactly output rows start..end (64-row blocks)
            y = _by_row_chunks(x.shape[0], self._rows, x, lambda start, end: dense_linear(wide, int4_dense_weight(
                self.packed[start:end], self.scale_and_zero[:, start:end], self.group_size, end - start,
                self._columns, x.dtype)))
        return y if self._rows == self.out_features else y[:, : self.out_features]

    def _input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """grad @ W a slice of rows at a time, expanded in grad's dtype as the dense forward does
        (a float32 copy of the whole weight per backward was half a QLoRA step)."""
        if not fast_unpack_available(self.packed.device):
            return super()._input_grad(grad)
        wide = torch.zeros(grad.shape[0], self._columns, dtype=grad.dtype, device=grad.device)
        for start in range(0, self.out_features, _CHUNK_ROWS):
            end = min(self._rows, start + _CHUNK_ROWS)  # packed rows come in whole 64-row blocks
            w_t = dequantize_int4_t(self.packed[start:end], self.scale_and_zero[:, start:end], self.group_size,
                                    end - start, self._columns, grad.dtype)        # (planes*K, rows)
            used = min(end, self.out_features) - start
            wide += dense_linear(grad[:, start:start + used], w_t[:, :used])
        # the kernel saw x repeated once per plane: the input's gradient sums the planes'
        return wide if self._planes == 1 else wide.reshape(-1, self._planes, self.in_features).sum(dim=1)

    def dequantize(self) -> torch.Tensor:
        w = dequantize_int4(*self._codes_scale_zero())
        if self._planes == 1:
            return w
        return w.reshape(self.out_features, self._planes, self.in_features).sum(dim=1)

    def _codes_scale_zero(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, planes*K) codes and the two (N, G) operands, without the padding rows."""
        q = unpack_int4(self.packed, self._rows, self._columns)[: self.out_features]
        scale, zero = self.scale_and_zero[:, : self.out_features].permute(2, 1, 0)
        return q, scale, zero

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"

    def _portable_shapes(self) -> dict[str, tuple[int, ...]]:
        groups = (self.out_features, self._columns // self.group_size)
        return {"weight_packed": (self.out_features, self._columns // 2), "weight_scale": groups,
                "weight_zero": groups}

    def _portable_state(self) -> dict[str, torch.Tensor]:
        q, scale, zero = self._codes_scale_zero()
        return {"weight_packed": pack_nibbles(q), "weight_scale": scale.contiguous(),
                "weight_zero": zero.contiguous()}

    def _load_portable(self, state: dict[str, torch.Tensor]) -> None:
        self._set_codes(unpack_nibbles(state["weight_packed"].to(torch.uint8)), state["weight_scale"],
                        state["weight_zero"])

    @classmethod
    def concat(cls, parts: Sequence[QuantizedLinear]) -> QuantizedLinear | None:
        """As `QuantizedLinear.concat`, but parts of whole 64-row blocks in the CPU layout are
        stacked as they are stored (packed rows start..end are output rows start..end): no round
        trip through the portable codes, which cost most of a fused 7B load."""
        first = parts[0]
        if not all(type(p) is type(first) and p._settings() == first._settings() and p.can_view_rows(0)
                   and p._device() == first._device() and p.bias is None for p in parts):
            return super().concat(parts)
        fused = first._resized(sum(p.out_features for p in parts))
        fused._set_packed(torch.cat([p.packed for p in parts]), torch.cat([p.scale_and_zero for p in parts], dim=1))
        return fused

    def can_view_rows(self, start: int) -> bool:
        """Whole 64-row blocks of a layout stored row block by row block (not CUDA's tiles)."""
        return (fast_unpack_available(self._device()) and start % INT4_ROW_ALIGN == 0
                and self.out_features % INT4_ROW_ALIGN == 0)

    def view_rows(self, fused: QuantizedLinear, start: int) -> None:
        end = start + self.out_features
        # scale_and_zero is (G, rows, 2): a strided view, made contiguous per call when used alone
        self.packed, self.scale_and_zero = fused.packed[start:end], fused.scale_and_zero[:, start:end]
        self._strided = True

    def _set_codes(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Fill the kernel buffers from (N, planes*K) codes and (N, G) scales and zeros."""
        self._set_packed(*self._pack_rows(q, scale, zero, self._rows - self.out_features))

    def _pack_rows(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel-layout (packed, scale_and_zero) of some output rows plus `pad` padding rows. Row
        ranges that start on a 64-row boundary pack independently, so large weights can be built
        a slice at a time and concatenated."""
        q = F.pad(q.to(torch.uint8), (0, 0, 0, pad), value=8)
        scale_zero = torch.stack([scale, zero], dim=-1)                                    # (n, G, 2)
        scale_zero = F.pad(scale_zero.to(self.compute_dtype), (0, 0, 0, 0, 0, pad))
        return pack_int4(q), scale_zero.transpose(0, 1)                                   # (G, n, 2)

    def _set_packed(self, packed: torch.Tensor, scale_and_zero: torch.Tensor) -> None:
        self.packed = packed
        self.scale_and_zero = scale_and_zero.contiguous()                                 # (G, rows, 2)
        self._strided = False
        self._kernel_rows = int4_kernel_rows(self.packed.device)


@functools.cache
def _pair_table(quant_type: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256,) integers whose bytes are the two codebook values of a packed byte, in `dtype`:
    one gather then decodes two weights, faster than indexing nibbles."""
    codebook = CODEBOOKS[quant_type].to(device)
    byte = torch.arange(256, device=device)
    pairs = torch.stack([codebook[byte >> 4], codebook[byte & 15]], dim=-1).to(dtype)  # (256, 2)
    return pairs.view(torch.int32 if dtype.itemsize == 2 else torch.int64).reshape(256)


class NF4Linear(QuantizedLinear):
    """bitsandbytes' 4-bit formats: w = codebook[q] * absmax[n, g] over blocks of `blocksize`.

    `quant_type` "nf4" (NormalFloat) or "fp4"; blocksize 64 and float32 absmax as bitsandbytes
    stores them (0.5625 bytes/param). On the CPU the native kernel (native/nf4.c) decodes the
    codes in registers and sums in float32, batch-invariant, below `native_max_rows` rows;
    above, and where it cannot be built, the torch path below. No torch kernel takes a
    codebook, so there the codes are decoded with a byte -> value-pair gather. For small M the
    absmax is applied after the matmul: the unscaled codes multiply a block-diagonal copy of x,
    giving each row's per-block partial sums, which are scaled and summed in float32; that
    skips writing a scaled (N, K) weight.
    """

    portable_names = _buffer_names = ("weight_packed", "weight_absmax")
    split_max_rows = 4  # absmax-after-matmul below this M, where it beats scaling the weight
    native_max_rows = 48  # the native kernel below this M, the torch path above (bench/RESULTS.md)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant_type: str = "nf4",
                 blocksize: int = 64, compute_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype, device)
        if quant_type not in CODEBOOKS:
            raise ConfigError(f"quant_type must be one of {tuple(CODEBOOKS)}, got {quant_type!r}")
        if blocksize not in GROUP_SIZES or in_features % blocksize:
            raise ConfigError(f"blocksize must be one of {GROUP_SIZES} and divide in_features "
                              f"({in_features}), got {blocksize}")
        self.quant_type = quant_type
        self.blocksize = blocksize
        self._init_storage(device, {"weight_packed": torch.uint8, "weight_absmax": torch.float32})

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    compute_dtype: torch.dtype = torch.bfloat16) -> NF4Linear:
        """Quantize an nn.Linear (see `quantize_4bit_codebook`)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_type, blocksize,
                     compute_dtype, "meta")  # storage comes from _load_portable, on the weight's device
        codes = native_nf4.quantize(linear.weight, CODEBOOKS[quant_type], blocksize)  # bit-equal, faster
        if codes is None:
            q, absmax = quantize_4bit_codebook(linear.weight.detach(), CODEBOOKS[quant_type], blocksize)
            codes = pack_nibbles(q), absmax
        module._load_portable({"weight_packed": codes[0], "weight_absmax": codes[1]})
        _copy_bias(module, linear)
        return module

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._native and x.shape[0] < self.native_max_rows:
            return native_nf4.mm(x, self.weight_packed, self.weight_absmax, CODEBOOKS[self.quant_type],
                                 self.blocksize)
        m, blocks = x.shape[0], self.in_features // self.blocksize
        table = _pair_table(self.quant_type, x.dtype, x.device)
        if m < self.split_max_rows:  # column (m, g) of `diag` holds x[m]'s block g, zeros elsewhere
            eye = torch.eye(blocks, dtype=x.dtype, device=x.device)
            diag = x.reshape(m, blocks, self.blocksize, 1) * eye[None, :, None, :]      # (M, G, B, G)
            diag = diag.permute(1, 2, 0, 3).reshape(self.in_features, m * blocks)        # (K, M*G)

        def rows(start: int, end: int) -> torch.Tensor:
            pairs = torch.index_select(table, 0, self.weight_packed[start:end].reshape(-1).int())
            codes = pairs.view(x.dtype).reshape(end - start, blocks, self.blocksize)  # unscaled, (n, G, B)
            absmax = self.weight_absmax[start:end]
            if m < self.split_max_rows:
                partial = (codes.reshape(end - start, -1) @ gemm_rhs(diag)).reshape(end - start, m, blocks)
                return (partial.float() * absmax[:, None, :]).sum(dim=-1).T.to(x.dtype)
            return dense_linear(x, codes.mul_(absmax.to(x.dtype)[..., None]).reshape(end - start, self.in_features))

        return _by_row_chunks(m, self.out_features, x, rows)

    def dequantize(self) -> torch.Tensor:
        return dequantize_4bit_codebook(unpack_nibbles(self.weight_packed), self.weight_absmax,
                                        CODEBOOKS[self.quant_type])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant_type={self.quant_type}, blocksize={self.blocksize}"

    def _portable_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight_packed": (self.out_features, self.in_features // 2),
                "weight_absmax": (self.out_features, self.in_features // self.blocksize)}

    def _portable_state(self) -> dict[str, torch.Tensor]:
        return {"weight_packed": self.weight_packed, "weight_absmax": self.weight_absmax}

    def can_view_rows(self, start: int) -> bool:
        return True

    def view_rows(self, fused: QuantizedLinear, start: int) -> None:
        end = start + self.out_features
        self.weight_packed, self.weight_absmax = fused.weight_packed[start:end], fused.weight_absmax[start:end]

    def _load_portable(self, state: dict[str, torch.Tensor]) -> None:
        self.weight_packed = state["weight_packed"].to(torch.uint8).contiguous()
        self.weight_absmax = state["weight_absmax"].float().contiguous()
        # decided here, not per call: torch.compile sees a constant, not the library loader
        self._native = self.weight_packed.device.type == "cpu" and native_nf4.available()


def _copy_bias(module: QuantizedLinear, linear: nn.Linear) -> None:
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)


def _is_skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantizes(name: str, module: nn.Module, config: BitsAndBytesConfig) -> bool:
    """Whether `quantize_model` replaces the module `name` under `config`."""
    return isinstance(module, nn.Linear) and not _is_skipped(name, config.skip_modules)


def stacked_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One tensor viewing `tensors` stacked along rows, where each already follows the previous
    one in one storage (contiguous, same dtype and row shape); else None. What `torch.cat` would
    return, without the copy: a loader that decoded or quantized a fusable group at once leaves
    its parts so."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (t.device != first.device or t.device.type == "meta" or t.dtype != first.dtype or t.dim() == 0
                or not t.is_contiguous() or t.shape[1:] != first.shape[1:] or t.storage_offset() != offset
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
        offset += t.numel()
    return first.as_strided((sum(t.shape[0] for t in tensors), *first.shape[1:]), first.stride())


def _stacked_in_place(fused: QuantizedLinear, parts: Sequence[QuantizedLinear]) -> bool:
    """Give `fused` buffers spanning the parts' own where each part's buffers already follow the
    previous part's rows in one storage (a loader quantized the group at once); whether it did.
    Checked against `view_rows`: each part must be exactly the rows fusing would view."""
    if not type(fused).buffers_are_portable():
        return False
    spans = {}
    for name in type(fused)._buffer_names:
        span = stacked_view([getattr(p, name) for p in parts])
        if span is None:
            return False
        spans[name] = span
    fused._load_portable(spans)
    start = 0
    for part in parts:
        probe = part._resized(part.out_features)
        probe.view_rows(fused, start)
        start += part.out_features
        if any(getattr(probe, n).data_ptr() != getattr(part, n).data_ptr()
               or getattr(probe, n).shape != getattr(part, n).shape for n in type(fused)._buffer_names):
            return False
    return all(getattr(fused, n).data_ptr() == spans[n].data_ptr() for n in spans)  # _load_portable kept them


def quantize_linear(linear: nn.Linear, config: BitsAndBytesConfig, name: str = "linear") -> QuantizedLinear:
    """The quantized twin of one nn.Linear under `config`; empty (for a later load) if on meta."""
    group = config.group_size
    if config.load_in_4bit and linear.in_features % group:
        raise ConfigError(
            f"{name}: in_features {linear.in_features} is not a multiple of group_size {group}; "
            f"choose a group_size in {GROUP_SIZES} that divides it, or add {name!r} to llm_int8_skip_modules"
        )
    dtype = config.compute_dtype
    if linear.weight.is_meta:
        args = (linear.in_features, linear.out_features, linear.bias is not None)
        if config.load_in_8bit:
            return Int8Linear(*args, dtype, "meta")
        if config.bnb_4bit_quant_type == "int4":
            return Int4Linear(*args, group, dtype, "meta")
        return NF4Linear(*args, config.bnb_4bit_quant_type, group, dtype, "meta")
    if config.load_in_8bit:
        return Int8Linear.from_linear(linear, dtype)
    if config.bnb_4bit_quant_type == "int4":
        return Int4Linear.from_linear(linear, group, dtype)
    return NF4Linear.from_linear(linear, config.bnb_4bit_quant_type, group, dtype)


def quantize_model(model: nn.Module, config: BitsAndBytesConfig | dict[str, Any]) -> nn.Module:
    """Replace every nn.Linear except `config.skip_modules` (name suffixes) in place; return `model`.

    A model built on the meta device gets empty quantized modules, to be filled by
    `load_state_dict` from a quantized checkpoint. Sets `model.quantization_config` if the
    model has that attribute, so `save_pretrained` can record it.

    >>> toy = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    >>> type(quantize_model(toy, BitsAndBytesConfig(load_in_8bit=True))[0]).__name__
    'Int8Linear'
    """
    if isinstance(config, dict):
        config = BitsAndBytesConfig.from_dict(config)
    if not (config.load_in_8bit or config.load_in_4bit):
        raise ConfigError("quantize_model needs load_in_8bit=True or load_in_4bit=True in the config")
    if isinstance(model, nn.Linear):
        return quantize_linear(model, config)
    targets = [(name, m) for name, m in model.named_modules() if quantizes(name, m, config)]
    for name, linear in targets:
        model.set_submodule(name, quantize_linear(linear, config, name))
    if hasattr(model, "quantization_config"):
        model.quantization_config = config
    return model


def load_quantized_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor],
                              config: BitsAndBytesConfig | dict[str, Any], strict: bool = True) -> nn.Module:
    """Swap `model`'s Linears and load a saved quantized state dict into them: the inverse of
    ``quantize_model(m, config).state_dict()``. Build `model` on the meta device, so no float
    weights are quantized only to be overwritten."""
    model = quantize_model(model, config)
    try:
        model.load_state_dict(state_dict, strict=strict, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"quantized state dict does not match the model: {exc}") from exc
    return model
