"""MistralPreTrainedModel: loading, saving, placement and `generate` for every model class.

This is the one place where dtype and device are decided. A model is built on the `meta`
device (no memory), the checkpoint's mmapped tensors are validated against the model's own
parameter shapes and then *assigned* (no copy when dtypes agree), and only then is anything
moved. Peak memory while loading is therefore about one copy of the weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .attention import check_implementation
from .checkpoints.safetensors import iter_tensors, save_state_dict
from .config import MistralConfig
from .errors import CheckpointError, ConfigError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16,
           "float": torch.float32}
# Keys some checkpoints carry that hold no learned state.
_IGNORED_KEYS = ("rotary_emb.inv_freq",)
# Loader options of Transformers' from_pretrained that need nothing from us here.
_ACCEPTED_NOOP_OPTIONS = ("low_cpu_mem_usage", "trust_remote_code", "local_files_only", "revision",
                          "use_safetensors", "cache_dir", "force_download", "token", "offload_folder")
# torch.nn.init functions that modules' reset_parameters() call; skipped while building on meta.
_INITIALIZERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_",
                 "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def _empty_on_meta() -> Iterator[None]:
    """Build modules on `meta` without running their initializers.

    The checkpoint's tensors are assigned next, so initializing is wasted; worse, torch's meta
    `normal_` (nn.Embedding's init) runs a decomposition that imports torch._dynamo on first use:
    ~1.3 s and ~70 MB of RSS, more than a third of what loading a 200 MB checkpoint takes.
    Transformers' `no_init_weights` patches the same functions, with the same caveat: a module
    built in another thread meanwhile is not initialized either.
    """
    saved = {name: getattr(nn.init, name) for name in _INITIALIZERS}
    for name in saved:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first tensor, parameter or buffer (quantized linears hold only buffers)."""
    return next(itertools.chain(module.parameters(), module.buffers())).device


def resolve_dtype(dtype: Any) -> torch.dtype | None:
    """torch dtype from a dtype, 'bfloat16', 'torch.float16' or None ('auto' handled by callers)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in _DTYPES:
            return _DTYPES[name]
    raise ConfigError(f"unsupported dtype {dtype!r}; use torch.float32, torch.float16 or torch.bfloat16")


class MistralPreTrainedModel(nn.Module):
    """Base of every model class: config, weight init, from/save_pretrained, generate."""

    config_class = MistralConfig
    base_model_prefix = "model"

    def __init__(self, config: MistralConfig) -> None:
        super().__init__()
        if not isinstance(config, MistralConfig):
            raise ConfigError(f"expected a MistralConfig, got {type(config).__name__}")
        self.config = config
        self.attn_implementation = "sdpa"
        self.quantization_config: Any = None

    # ------------------------------------------------------------------ init and ties
    def post_init(self) -> None:
        """Initialize weights not yet initialized (as Transformers does), then tie embeddings."""
        for module in self.modules():
            if getattr(module, "_weights_initialized", False):
                continue
            self._init_weights(module)
            module._weights_initialized = True
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        weight = getattr(module, "weight", None)
        if weight is None or weight.is_meta:
            return
        with torch.no_grad():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()

    def tie_weights(self) -> None:
        """Share the embedding with a float lm_head; a quantized head holds its own codes."""
        head = getattr(self, "lm_head", None)
        if type(head) is nn.Linear and self.config.tie_word_embeddings:
            head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens if hasattr(self, "model") else self.embed_tokens  # type: ignore[return-value]

    def get_output_embeddings(self) -> nn.Module | None:
        return getattr(self, "lm_head", None)

    @property
    def device(self) -> torch.device:
        return module_device(self)

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.dtype.is_floating_point)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen: set[int] = set()
        total = 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and "embed_tokens" in name):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Greedy or sampled continuation; see mistral_lm.generation.generate."""
        from .generation import generate

        return generate(self, *args, **kwargs)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_config(cls, config: MistralConfig, *, torch_dtype: Any = None, attn_implementation: str | None = None):
        dtype = resolve_dtype(torch_dtype) or torch.float32
        model = cls(config).to(dtype)
        model.attn_implementation = check_implementation(attn_implementation, dtype)
        return model

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        config: MistralConfig | None = None,
        torch_dtype: Any = None,
        dtype: Any = None,
        device_map: Any = None,
        attn_implementation: str | None = None,
        use_flash_attention_2: bool = False,
        quantization_config: Any = None,
        gguf_file: str | None = None,
        gguf_native: bool = False,
        fuse_projections: bool = True,
        progress: bool | None = None,
        **kwargs: Any,
    ):
        """Load an HF folder (safetensors, sharded or not; or pytorch_model.bin) or a .gguf file.

        `torch_dtype`/`dtype`: None -> float32, "auto" -> the checkpoint's dtype.
        `device_map`: None/"cpu", a device, "auto" (GPUs by free memory, then CPU) or a dict of
        module-name prefixes to devices. Other keywords override config fields.
        `gguf_native=True` (GGUF only): keep the file's Q4_0/Q4_1/Q4_K/Q8_0 weights in their
        blocks and compute on them (`GGUFLinear`), instead of dequantizing to `torch_dtype` as
        Transformers does; other storage types are dequantized.
        Quantized models (either way) default to the quantization's compute dtype (bfloat16)
        for everything else, as Transformers defaults bitsandbytes models to float16.
        `fuse_projections`: q/k/v and gate/up run as one matmul each (fusion.py; the state dict
        keeps Transformers' names). Pass False to keep the separate `q_proj`... modules.
        """
        for name in _ACCEPTED_NOOP_OPTIONS:
            kwargs.pop(name, None)
        unknown = [k for k in kwargs if k not in MistralConfig().to_dict()]
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected keyword arguments {unknown}")
        path = Path(pretrained_model_name_or_path)
        if gguf_file is not None:
            path = path / gguf_file
        if not path.exists():
            raise CheckpointError(
                f"{path} does not exist (this library never downloads: pass a local folder or .gguf file)"
            )
        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise ConfigError("pass only one of torch_dtype and dtype")
        wanted = torch_dtype if torch_dtype is not None else dtype
        if isinstance(quantization_config, dict):
            from .quantization import BitsAndBytesConfig

            quantization_config = BitsAndBytesConfig.from_dict(quantization_config)
        if wanted is None and quantization_config is not None:
            wanted = quantization_config.compute_dtype
        elif wanted is None and gguf_native:
            wanted = torch.bfloat16  # GGUFLinear's default compute dtype
        if use_flash_attention_2:
            attn_implementation = "flash_attention_2"
        if gguf_native and (path.suffix != ".gguf" or quantization_config is not None):
            raise ConfigError("gguf_native=True applies to a .gguf file loaded without a quantization_config")
        if path.suffix == ".gguf":
            model = cls._from_gguf(path, wanted, kwargs, gguf_native)
        else:
            model = cls._from_folder(path, config, wanted, kwargs, progress)
        model.attn_implementation = check_implementation(attn_implementation, model.dtype)
        fuse = fuse_projections and _single_device(device_map)  # layers split over devices stay unfused
        if fuse:
            from .fusion import fuse_projections as fuse_layers
        if quantization_config is not None:
            from .quantization import quantize_model

            if fuse:  # fused float first: one quantization per group instead of a re-pack after
                fuse_layers(model, skip=quantization_config.skip_modules)
            model = quantize_model(model, quantization_config)
        place_model(model, device_map)
        if fuse:
            fuse_layers(model, float_linears=path.suffix == ".gguf")  # GGUF floats are fresh memory, not a map
        _release_freed_memory()
        return model.eval()

    @classmethod
    def _from_folder(cls, folder: Path, config: MistralConfig | None, wanted: Any, overrides: dict, progress: bool | None):
        config = config or MistralConfig.from_pretrained(folder, **overrides)
        target = None if wanted == "auto" else (resolve_dtype(wanted) or torch.float32)
        tensors = tqdm(iter_tensors(folder, target), desc=f"Loading {folder.name}", unit="tensor", leave=False,
                       disable=True if progress is False else None)  # None: shown on a terminal only
        return cls._assemble(config, tensors, target, source=str(folder))

    @classmethod
    def _from_gguf(cls, path: Path, wanted: Any, overrides: dict, native: bool = False):
        from .checkpoints.gguf import load_gguf

        target = resolve_dtype(None if wanted == "auto" else wanted) or torch.float32
        checkpoint = load_gguf(path, dequantize=not native, dtype=target)
        for key, value in overrides.items():
            setattr(checkpoint.config, key, value)
        return cls._assemble(checkpoint.config, checkpoint.tensors.items(), target, source=str(path))

    @classmethod
    def _assemble(cls, config: MistralConfig, named_tensors: Iterable[tuple[str, Any]],
                  dtype: torch.dtype | None, source: str):
        """Build on meta, map checkpoint names onto ours, validate and assign; dtype None = the checkpoint's.

        Tensors still in GGUF blocks (`GGUFQuantizedTensor`) become `GGUFLinear` modules where
        the kernel has a form for them and are dequantized everywhere else (the embedding)."""
        with _empty_on_meta():
            model = cls(config)
        expected = _expected_tensors(model)
        tensors: dict[str, torch.Tensor] = {}
        blocks: dict[str, Any] = {}
        for name, tensor in named_tensors:
            key = _to_model_key(name, expected, cls)
            if key is None:
                continue
            if isinstance(tensor, torch.Tensor):
                tensors[key] = tensor
            else:
                blocks[key] = tensor
        if blocks:
            native = _install_gguf_linears(model, blocks, tensors, dtype or torch.float32)
            expected = {k: v for k, v in expected.items() if k.rsplit(".", 1)[0] not in native}
        if dtype is None:  # "auto": the checkpoint's own floating dtype
            dtype = next((t.dtype for t in tensors.values() if t.dtype.is_floating_point), torch.float32)
        _load_into(model, tensors, expected, dtype, source=source)
        return model

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self, save_directory: str | os.PathLike, *, max_shard_size: int | str = "5GB",
        safe_serialization: bool = True, state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write config.json and safetensors weights in the Transformers layout."""
        if not safe_serialization:
            raise CheckpointError("only safetensors output is written (safe_serialization=True)")
        from .quant.gguf import GGUFLinear

        if any(isinstance(m, GGUFLinear) for m in self.modules()):
            raise CheckpointError(
                "this model computes on GGUF blocks (gguf_native=True), which have no safetensors form; "
                "load the file without gguf_native to save it (or run `mistral-lm convert`)"
            )
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        state = dict(state_dict if state_dict is not None else self.state_dict())
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        self.config.architectures = [type(self).__name__]
        self.config.torch_dtype = self.dtype
        if self.quantization_config is not None:
            self.config.extra["quantization_config"] = self.quantization_config.to_dict()
        self.config.save_pretrained(folder)
        save_state_dict(state, folder, max_shard_size)


def _expected_tensors(model: nn.Module) -> dict[str, torch.Size]:
    """Names and shapes the model needs; a tied lm_head needs no tensor of its own."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.shape for k, v in state.items()}


def _install_gguf_linears(model: nn.Module, blocks: dict[str, Any], tensors: dict[str, torch.Tensor],
                          dtype: torch.dtype) -> set[str]:
    """Swap each Linear whose weight came as GGUF blocks for a GGUFLinear on those blocks; put
    the rest (embeddings, unsupported types) into `tensors` dequantized. Returns the swapped
    module names. A tied lm_head computes on the embedding's blocks: the same numbers as the
    float tie, at the quantized size."""
    from .quant.gguf import GGUFLinear

    head = getattr(model, "lm_head", None)
    tied = head is not None and model.config.tie_word_embeddings and "lm_head.weight" not in blocks
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


def _to_model_key(name: str, expected: dict[str, torch.Size], cls: type) -> str | None:
    """Map a checkpoint key onto the model's names (base <-> head prefixes); None to skip it."""
    if name in expected:
        return name
    if name.endswith(_IGNORED_KEYS):
        return None
    if name.startswith("model.") and name[len("model."):] in expected:
        return name[len("model."):]  # a causal-LM checkpoint loaded into MistralModel
    if "model." + name in expected:
        return "model." + name  # a base-model checkpoint loaded under a head
    if name in ("lm_head.weight", "score.weight") and name not in expected:
        return None  # the other head: a causal-LM checkpoint fine-tuned for classification, or back
    raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint: {cls.__name__} has no such parameter")


def _load_into(model: nn.Module, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size],
               dtype: torch.dtype, source: str) -> None:
    for key, tensor in tensors.items():
        if tensor.shape != expected[key]:
            raise CheckpointError(
                f"tensor {key!r} in {source} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key])}"
            )
        if tensor.dtype != dtype and tensor.dtype.is_floating_point:
            tensors[key] = tensor.to(dtype)
    missing = [k for k in expected if k not in tensors]
    fresh = [k for k in missing if k == "score.weight"]  # a new classification head starts random
    if len(missing) > len(fresh):
        raise CheckpointError(f"tensors missing from {source}: {[k for k in missing if k not in fresh][:10]}")
    if fresh:
        warnings.warn(f"{fresh} not in {source}; initialized at random: train before use", stacklevel=3)
        config = model.config
        for key in fresh:
            tensors[key] = torch.empty(expected[key], dtype=dtype).normal_(0.0, config.initializer_range)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()


# ------------------------------------------------------------------ placement
def _release_freed_memory() -> None:
    """Hand the loader's freed temporaries back to the OS (glibc only; a no-op elsewhere).

    Decoding and re-packing quantized blocks leaves the heap fragmented: after loading
    SmolLM2 on its GGUF blocks, RSS stood at 617 MB for 158 MB of weights, and malloc_trim
    returned 124 MB of it. Freed memory is not leaked either way; this only makes RSS honest."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _single_device(device_map: Any) -> bool:
    if isinstance(device_map, dict):
        return len({str(v) for v in device_map.values()}) == 1
    return device_map not in ("auto", "balanced", "sequential")


def place_model(model: nn.Module, device_map: Any) -> None:
    """Move the model per `device_map`; layers on different devices hand activations along."""
    if device_map is None or isinstance(device_map, (torch.device, int)) or (
        isinstance(device_map, str) and device_map not in ("auto", "balanced", "sequential")
    ):
        device = torch.device("cpu" if device_map is None else device_map)
        model.to(device)
        return
    if isinstance(device_map, str):
        device_map = auto_device_map(model)
    if not isinstance(device_map, dict):
        raise ConfigError(f"device_map must be 'auto', a device or a dict, got {type(device_map).__name__}")
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if not own:
            continue
        device = _device_for(name, device_map)
        # the module's own _apply: quantized linears re-pack for the target device there
        module._apply(lambda t, d=device: t.to(d), recurse=False)
    model.tie_weights()


def _device_for(name: str, device_map: dict[str, Any]) -> torch.device:
    best = None
    for prefix in device_map:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    if best is None:
        raise ConfigError(f"device_map has no entry for module {name!r}")
    value = device_map[best]
    return torch.device(f"cuda:{value}" if isinstance(value, int) else value)


def auto_device_map(model: nn.Module) -> dict[str, str]:
    """Fill GPUs (most free memory first) layer by layer, then the CPU."""
    if not torch.cuda.is_available():
        return {"": "cpu"}
    free = sorted(((torch.cuda.mem_get_info(i)[0] * 0.9, f"cuda:{i}") for i in range(torch.cuda.device_count())),
                  reverse=True)
    blocks = [(n, m) for n, m in model.named_modules() if n.count(".") <= 2 and (
        n.endswith(("embed_tokens", "norm", "lm_head", "score")) or n.rsplit(".", 1)[-1].isdigit())]
    device_map: dict[str, str] = {}
    for name, module in blocks:
        size = sum(p.numel() * p.element_size() for p in module.parameters())
        while free and free[0][0] < size:
            free.pop(0)
        device = free[0][1] if free else "cpu"
        if free:
            free[0] = (free[0][0] - size, device)
        device_map[name] = device
    return device_map
