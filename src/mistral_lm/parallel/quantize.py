"""Weight-only quantization of a sharded model: each rank quantizes its own float slices.

Which formats give every rank exactly the codes of the single-process quantized model:
- column-parallel layers (q/k/v, gate/up: whole output rows): every format, as int8, int4 and
  NF4 all quantize row by row.
- row-parallel layers (o_proj, down_proj: a slice of each row's columns):
  int4 / NF4: groups of `group_size` columns; a rank's slice starts at r * K/N, a multiple of
  the group size whenever K/N is (checked), so its groups are the single-process groups.
  int8: one scale per row, the row's absolute maximum / 127. A slice's own maximum would give a
  finer scale than the single process's, so the ranks all-reduce (MAX) the row maxima first and
  quantize with the global scale: the same codes, for one (N_out,) all-reduce per layer at load.
The dequantized weights are then identical; outputs differ from the single process only by the
order of the final sum (the all-reduce).

GGUF blocks (llama.cpp's Q4_0, Q4_1, Q8_0: 32 columns per block; Q4_K: 256) are stored row by
row, so `shard_gguf_blocks` slices them as they are: whole rows for column-parallel layers, and
for row-parallel layers whole blocks of each row (a rank's columns must start and end on a block
boundary: Mistral-7B's 4096/N and 14336/N do for N = 2, 4, 8 even with 256-column K-quant
blocks). The blocks are not re-quantized, so GGUFLinear over a slice computes exactly the
slice's share. A loader reading a rank's blocks straight from the .gguf is not written yet.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from types import SimpleNamespace
from typing import Any

from ..errors import ConfigError
from ..quantization import BitsAndBytesConfig, quantize_model
from ..quantization.functional import quantize_int8
from ..quantization.modules import Int8Linear
from .plan import ROW_PARALLEL_MODULES, Split


def quantize_sharded(model: nn.Module, config: BitsAndBytesConfig) -> nn.Module:
    """`quantize_model` on a sharded model, with the global int8 scales of row-parallel layers."""
    skip = config.skip_modules
    record = getattr(model, "tensor_parallel", None)
    if record is None:
        raise ConfigError("quantize_sharded takes a model sharded by shard_model; use quantize_model otherwise")
    plan = record.plan
    if plan.vocab_rows is not None and not any(s == "lm_head" or s.endswith("lm_head") for s in skip):
        raise ConfigError("vocab_parallel shards lm_head through a hook on the float module; keep 'lm_head' "
                          "in llm_int8_skip_modules (the default) or use vocab_parallel=False")
    row_parallel = [(name, m) for name, m in model.named_modules()
                    if isinstance(m, nn.Linear) and name.endswith(ROW_PARALLEL_MODULES)
                    and not any(name == s or name.endswith("." + s) for s in skip)]
    if config.load_in_4bit:
        for name, linear in row_parallel:
            if linear.in_features % config.group_size:
                raise ConfigError(f"{name}: this rank's {linear.in_features} input columns are not a multiple of "
                                  f"group_size {config.group_size}, so 4-bit groups would straddle ranks; "
                                  "choose a group_size that divides them or a smaller tp_size")
    elif config.load_in_8bit and dist.is_initialized() and dist.get_world_size() > 1:
        for name, linear in row_parallel:
            model.set_submodule(name, _int8_global_scale(linear, config.compute_dtype))
    return quantize_model(model, config)


@torch.no_grad()
def _int8_global_scale(linear: nn.Linear, compute_dtype: torch.dtype) -> Int8Linear:
    """Int8 codes of this rank's columns under each row's maximum over all ranks.

    quantize_int8 takes the row maximum of what it is given, so the global maximum rides along as
    one extra column (its code, 127, is dropped): the numerics stay quantize_int8's own."""
    weight = linear.weight.detach().float()
    row_max = weight.abs().amax(dim=1)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
    codes, scale = quantize_int8(torch.cat([weight, row_max[:, None]], dim=1), compute_dtype)
    module = Int8Linear(linear.in_features, linear.out_features, False, compute_dtype, weight.device)
    module.load_state_dict({"weight": codes[:, :-1], "weight_scale": scale})
    return module


def shard_gguf_blocks(tensor: Any, split: Split) -> SimpleNamespace:
    """This rank's part of a GGUF quantized tensor (`ggml_type`, `shape` (out, in), `data`: one
    row of blocks per output row, as `gguf` reads them), still as blocks, for
    `GGUFLinear.from_quantized`. Column slices must cover whole blocks (ConfigError otherwise)."""
    from ..checkpoints.gguf_spec import GGML_QUANT_SIZES, GGMLQuantizationType

    rows, columns = (int(v) for v in tensor.shape)
    data = tensor.data
    if split.dim is None:
        return SimpleNamespace(ggml_type=tensor.ggml_type, shape=(rows, columns), data=data)
    if split.dim == 0:
        return SimpleNamespace(ggml_type=tensor.ggml_type, shape=(split.stop - split.start, columns),
                               data=data[split.start:split.stop])
    kind = GGMLQuantizationType(int(tensor.ggml_type))
    block, type_size = GGML_QUANT_SIZES[kind]
    if split.start % block or split.stop % block:
        raise ConfigError(f"columns {split.start}-{split.stop} of a {kind.name} "
                          f"tensor split its {block}-column blocks; choose a tp_size whose column share is a "
                          f"multiple of {block}")
    return SimpleNamespace(ggml_type=tensor.ggml_type, shape=(rows, split.stop - split.start),
                           data=data[:, split.start // block * type_size: split.stop // block * type_size])
