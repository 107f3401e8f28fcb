"""Load rank r's shard of an HF safetensors folder, reading only its slices.

    from_pretrained(path, tp_plan="auto")         under torchrun --nproc-per-node N
      init_distributed                            process.py: torchrun's environment, timeouts
      check_same_everywhere(fingerprint)          every rank sees the same checkpoint and options
      plan_tensor_parallel(config, N, rank)       plan.py: refused before any tensor is read
      build_on_meta -> shard_model                the rank's modules, without memory
      read_shard                                  safe_open(...).get_slice(...) of the rank's rows or
                                                  columns; replicated tensors mmapped whole
      load_state_dict(assign=True), tie           the rank's tensors become the parameters
      quantize (after sharding), place, fuse, matvec swap

A rank never holds another rank's slices: a column-parallel slice is contiguous rows of the
file, a row-parallel one is a strided read of the rank's columns into a fresh tensor.
"""

from __future__ import annotations

import os
from collections.abc import Container
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..attention import check_implementation
from ..checkpoints.hf_folder import model_key, skippable, weight_files
from ..checkpoints.mistral_format import is_mistral_folder
from ..config import MistralConfig
from ..dtypes import resolve_dtype
from ..errors import CheckpointError, ConfigError
from ..fusion import fuse_projections as fuse_all
from ..loading import build_on_meta
from ..matvec import install_matvec
from ..modeling import MistralForCausalLM
from ..quantization import BitsAndBytesConfig
from .apply import shard_model
from .plan import TensorParallelPlan, plan_tensor_parallel
from .process import DEFAULT_TIMEOUT_S, check_same_everywhere, checkpoint_fingerprint, init_distributed
from .quantize import quantize_sharded


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
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> nn.Module:
    """This rank's shard of the model in the HF safetensors folder `path`, under torchrun.

    `tp_plan`: "auto" (the only plan: plan.py). `tp_size`: the number of ranks, None = the
    process group's size (it must equal it). `torch_dtype`: None -> float32, "auto" -> the
    file's. `quantization_config`: weights are quantized after sharding, each rank its own
    slices (parallel/quantize.py says which formats equal the single-process codes).
    `vocab_parallel`: split embed_tokens and lm_head by vocabulary rows (plan.py) instead of
    replicating them. `timeout_s` bounds every collective (process.py). The model's `config`
    is the rank's (divided head counts); `model.tensor_parallel.full_config` is the checkpoint's.
    """
    if tp_plan != "auto":
        raise ConfigError(f"tp_plan must be 'auto', got {tp_plan!r}")
    folder = Path(path)
    _check_folder(folder)
    context = init_distributed(timeout_s=timeout_s)
    if tp_size is not None and tp_size != context.world_size:
        raise ConfigError(f"tp_size={tp_size} but the process group has {context.world_size} ranks: launch "
                          f"torchrun with --nproc-per-node {tp_size} (times nodes), or pass tp_size=None")
    if isinstance(quantization_config, dict):
        quantization_config = BitsAndBytesConfig.from_dict(quantization_config)
    files = weight_files(folder)
    options = {"torch_dtype": torch_dtype, "quantization": quantization_config and quantization_config.to_dict(),
               "world_size": context.world_size, "vocab_parallel": vocab_parallel}
    check_same_everywhere(checkpoint_fingerprint(folder, files, options), str(folder), "the checkpoint")
    config = MistralConfig.from_pretrained(folder)
    plan = plan_tensor_parallel(config, context.world_size, context.rank, vocab_parallel)  # before any tensor
    dtype = None if torch_dtype == "auto" else resolve_dtype(torch_dtype) if torch_dtype is not None else torch.float32

    model = build_on_meta(cls, config)
    full_shapes = _expected(model)
    shard_model(model, plan)
    local_shapes = _expected(model)
    tensors = read_shard(files, plan, full_shapes, dtype)
    _assign(model, tensors, local_shapes, str(folder))
    model.requires_grad_(False)  # inference only: the all-reduce hooks sum in place (apply.py)
    model.attn_implementation = check_implementation(attn_implementation, model.dtype)
    if quantization_config is not None:
        quantize_sharded(model, quantization_config)
    if context.device.type != "cpu":
        model.to(context.device)
    if fuse_projections:
        fuse_all(model)
    return install_matvec(model).eval()


def _check_folder(folder: Path) -> None:
    if folder.suffix == ".gguf":
        raise CheckpointError(f"{folder}: tensor-parallel loading reads HF safetensors folders; a GGUF file is "
                              "not supported yet (convert it with `mistral-lm convert`)")
    if is_mistral_folder(folder):
        raise CheckpointError(f"{folder} is in Mistral's params.json layout: tensor-parallel loading reads HF "
                              "folders (config.json + model*.safetensors); convert it first")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json: tensor parallel loads an HF folder")


def _expected(model: nn.Module) -> dict[str, torch.Size]:
    """Names and shapes the model needs; a tied lm_head needs no tensor of its own."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def read_shard(files: list[Path], plan: TensorParallelPlan, full_shapes: dict[str, torch.Size],
               dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The rank's tensors under the model's names: slices read with `get_slice`, replicated
    tensors mmapped whole, floats converted to `dtype` (None: as stored). A tensor whose full
    shape differs from the model's is a CheckpointError naming it, before any slice is read."""
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix != ".safetensors":
            raise CheckpointError(f"{file}: tensor-parallel loading reads slices of safetensors files; "
                                  "save the checkpoint as safetensors first")
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    key = _model_key(name, full_shapes, file)
                    if key is not None:
                        tensors[key] = _cast(_read(handle, name, key, plan, full_shapes[key], file), dtype)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file} is not a valid safetensors file: {exc}") from exc
    return tensors


def _model_key(name: str, expected: Container[str], file: Path) -> str | None:
    key = model_key(name, expected)
    if key is None and not skippable(name, expected):
        raise CheckpointError(f"unexpected tensor {name!r} in {file}: the model has no such parameter")
    return key


def _read(handle: Any, name: str, key: str, plan: TensorParallelPlan, shape: torch.Size, file: Path) -> torch.Tensor:
    piece = handle.get_slice(name)
    stored = tuple(piece.get_shape())
    if stored != tuple(shape):
        raise CheckpointError(f"tensor {name!r} in {file} has shape {stored}, the model expects {tuple(shape)}")
    split = plan.split(key)
    if split.dim is None:
        return handle.get_tensor(name)
    if split.dim == 0:
        return piece[split.start:split.stop]
    return piece[:, split.start:split.stop]


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.dtype.is_floating_point or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


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
        tensors = {k: _cast(t, first) for k, t in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()  # type: ignore[operator]
