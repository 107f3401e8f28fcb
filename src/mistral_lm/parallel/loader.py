"""Load rank r's shard of an HF safetensors folder, reading only its slices.

The one module of this package that imports loading.py and modeling.py: the others must stay
importable from loading.py, which is where this straight line belongs once `from_pretrained`
takes `tp_plan` (then this file shrinks to nothing).

    from_pretrained(path, tp_plan="auto")         under torchrun --nproc-per-node N
      init_distributed                            process.py: torchrun's environment, timeouts
      check_same_everywhere(fingerprint)          every rank sees the same checkpoint and options
      plan_tensor_parallel(config, N, rank)       plan.py: refused before any tensor is read
      build_on_meta -> shard_model                the rank's modules, without memory
      read_shard | gguf_shard                     reader.py: get_slice of the rank's rows or columns;
                                                  GGUF blocks cut in the memory map
      load_state_dict(assign=True), tie           the rank's tensors become the parameters
      quantize (after sharding), place, fuse, matvec swap
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attention import check_implementation
from ..checkpoints.gguf import load_gguf
from ..checkpoints.hf_folder import weight_files
from ..checkpoints.mistral_format import is_mistral_folder
from ..config import MistralConfig
from ..dtypes import resolve_dtype
from ..errors import CheckpointError, ConfigError
from ..fusion import fuse_projections as fuse_all
from ..loading import build_on_meta, keep_freed_memory, kv_cache_dtype_for
from ..matvec import install_matvec
from ..modeling import MistralForCausalLM
from ..quantization import BitsAndBytesConfig
from ..quantization.gguf_install import install_gguf_linears
from .apply import shard_model
from .plan import plan_tensor_parallel
from .process import DEFAULT_TIMEOUT_S, check_same_everywhere, checkpoint_fingerprint, init_distributed
from .quantize import quantize_sharded
from .reader import cast, gguf_shard, read_shard


def from_pretrained(
    path: str | os.PathLike,
    *,
    tp_plan: str = "auto",
    tp_size: int | None = None,
    cls: type = MistralForCausalLM,
    torch_dtype: Any = None,
    attn_implementation: str | None = None,
    quantization_config: BitsAndBytesConfig | dict | None = None,
    fuse_projections: bool = True,
    vocab_parallel: bool = False,
    gguf_native: bool = False,
    kv_cache_dtype: Any = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> nn.Module:
    """This rank's shard of the model in the HF safetensors folder or .gguf file `path`, under torchrun.

    `tp_plan`: "auto" (the only plan: plan.py). `tp_size`: the number of ranks, None = the
    process group's size (it must equal it). `torch_dtype`: None -> float32, "auto" -> the
    file's. `quantization_config`: weights are quantized after sharding, each rank its own
    slices (parallel/quantize.py says which formats equal the single-process codes).
    `vocab_parallel`: split embed_tokens and lm_head by vocabulary rows (plan.py) instead of
    replicating them. `gguf_native` (GGUF only): keep the rank's Q4_0/Q4_1/Q4_K/Q8_0 blocks and
    compute on them (GGUFLinear), as loading.py does; else its slices are dequantized to
    `torch_dtype`. `kv_cache_dtype`: as loading.from_pretrained (float16 for `gguf_native`).
    `timeout_s` bounds every collective (process.py). The model's `config`
    is the rank's (divided head counts); `model.tensor_parallel.full_config` is the checkpoint's.
    """
    if tp_plan != "auto":
        raise ConfigError(f"tp_plan must be 'auto', got {tp_plan!r}")
    source = Path(path)
    is_gguf = source.suffix == ".gguf"
    _check_source(source)
    context = init_distributed(timeout_s=timeout_s)
    if tp_size is not None and tp_size != context.world_size:
        raise ConfigError(f"tp_size={tp_size} but the process group has {context.world_size} ranks: launch "
                          f"torchrun with --nproc-per-node {tp_size} (times nodes), or pass tp_size=None")
    if isinstance(quantization_config, dict):
        quantization_config = BitsAndBytesConfig.from_dict(quantization_config)
    if gguf_native and (not is_gguf or quantization_config is not None):
        raise ConfigError("gguf_native=True applies to a .gguf file loaded without a quantization_config")
    files = [source] if is_gguf else weight_files(source)
    options = {"torch_dtype": torch_dtype, "quantization": quantization_config and quantization_config.to_dict(),
               "world_size": context.world_size, "vocab_parallel": vocab_parallel, "gguf_native": gguf_native}
    check_same_everywhere(checkpoint_fingerprint(source, files, options), str(source), "the checkpoint")
    dtype = None if torch_dtype == "auto" else resolve_dtype(torch_dtype) if torch_dtype is not None else torch.float32
    gguf = load_gguf(source, dequantize=False, dtype=dtype or torch.float32) if is_gguf else None  # blocks mapped
    config = gguf.config if gguf is not None else MistralConfig.from_pretrained(source)
    plan = plan_tensor_parallel(config, context.world_size, context.rank, vocab_parallel)  # before any tensor

    model = build_on_meta(cls, config)
    full_shapes = _expected(model)
    shard_model(model, plan)
    local_shapes = _expected(model)
    if gguf is not None:
        tensors, blocks = gguf_shard(gguf.tensors, plan)
        del gguf  # the maps of other ranks' blocks go with it
        if not gguf_native:
            tensors.update({key: qt.dequantize(dtype or torch.float32) for key, qt in blocks.items()})
            blocks = {}
        native = install_gguf_linears(model, blocks, tensors, dtype or torch.float32)  # no kernel cache: slices
        local_shapes = {k: v for k, v in local_shapes.items() if k.rsplit(".", 1)[0] not in native}
    else:
        tensors = read_shard(files, plan, full_shapes, dtype)
    _assign(model, tensors, local_shapes, str(source))
    model.requires_grad_(False)  # inference only: the all-reduce hooks sum in place (apply.py)
    model.attn_implementation = check_implementation(attn_implementation, model.dtype)
    model.kv_cache_dtype = kv_cache_dtype_for(kv_cache_dtype, gguf_native, model.dtype)
    if quantization_config is not None:
        quantize_sharded(model, quantization_config)
    if context.device.type != "cpu":
        model.to(context.device)
    if fuse_projections:
        fuse_all(model)
    keep_freed_memory()  # as loading.from_pretrained: each forward reuses the last one's freed activations
    return install_matvec(model).eval()


def _check_source(source: Path) -> None:
    if not source.exists():
        raise CheckpointError(f"{source} does not exist (this library never downloads: pass a local folder or "
                              ".gguf file)")
    if source.suffix == ".gguf":
        return
    if is_mistral_folder(source):
        raise CheckpointError(f"{source} is in Mistral's params.json layout: tensor-parallel loading reads HF "
                              "folders (config.json + model*.safetensors) and .gguf files; convert it first")
    if not (source / "config.json").is_file():
        raise CheckpointError(f"{source} has no config.json: tensor parallel loads an HF folder or a .gguf file")


def _expected(model: nn.Module) -> dict[str, torch.Size]:
    """Names and shapes the model needs; a tied lm_head needs no tensor of its own."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], shapes: dict[str, torch.Size], source: str) -> None:
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise CheckpointError(f"tensors missing from {source}: {missing[:10]}")
    wrong = [f"{k}: {tuple(t.shape)} vs {tuple(shapes[k])}" for k, t in tensors.items() if t.shape != shapes[k]]
    if wrong:  # the plan and the model disagree: a bug here, not in the file
        raise CheckpointError(f"rank slices do not fit the sharded model: {wrong[:5]}")
    floats = {t.dtype for t in tensors.values() if t.dtype.is_floating_point}
    if len(floats) > 1:  # "auto" over a file of mixed dtypes: the first float dtype wins, as loading.py does
        first = next(t.dtype for t in tensors.values() if t.dtype.is_floating_point)
        tensors = {k: cast(t, first) for k, t in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()  # type: ignore[operator]
