"""`from_pretrained` as a straight line of named steps; the one place where dtype and device are decided.

    options    = LoadOptions.parse(...)             keywords checked, dtype policy applied
    assemble(cls, options):
      checkpoint = read_checkpoint(options)         config + tensors (an HF folder, Mistral's params.json
                                                    + consolidated*.safetensors, or a .gguf file)
      model      = build_on_meta(cls, config)       modules without memory or initialization
      tensors, blocks = match_names(...)            checkpoint names -> the model's; floats | GGUF blocks;
                                                    with a quantization config, each Linear's weight is
                                                    quantized as it is read (QuantizeAsRead)
      install_gguf_linears(model, blocks, ...)     blocks -> GGUFBlockLinear / GGUFBlockEmbedding on the
                                                    file's pages (native kernels), else GGUFLinear through
                                                    the kernel cache next to the .gguf; the rest dequantized
                                                    (quantization/gguf_install.py)
      assign(model, tensors, ...)                   validated, assigned, embeddings tied
    before_placement(options)                       quantize
    place_model(model, device_map)                  placement.py
    after_placement(options, fresh_floats)          fuse on the target device, then the matvec swap
    release_freed_memory()                          the loader's temporaries back to the OS
    keep_freed_memory()                             from then on, a forward's freed activations stay for the next

Assigning is `load_state_dict(assign=True)` on mmapped tensors (no copy when dtypes agree), so
peak memory while loading is about one copy of the weights. Each transform is a function of its
own package (fusion.py, quantization/, matvec.py); this module only decides their order.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .attention import check_implementation
from .checkpoints.hf_folder import model_key, skippable
from .checkpoints.mistral_format import config_from_params, is_mistral_folder, read_params, to_hf_tensors
from .checkpoints.mistral_format import weight_files as mistral_weight_files
from .checkpoints.safetensors import LazyTensor, iter_safetensors_file, iter_tensors, release_file_pages
from .config import MistralConfig
from .dtypes import resolve_dtype
from .errors import CheckpointError, ConfigError
from .fusion import FUSIONS, fuse_projections
from .matvec import install_matvec
from .placement import place_model, single_device
from .quantization import BitsAndBytesConfig, quantize_linear, quantize_model
from .quantization.modules import QuantizedLinear, quantizes
from .quantization.gguf_install import install_gguf_linears

# Loader options of Transformers' from_pretrained that need nothing from us here.
_ACCEPTED_NOOP_OPTIONS = ("low_cpu_mem_usage", "trust_remote_code", "local_files_only", "revision",
                          "use_safetensors", "cache_dir", "force_download", "token", "offload_folder")
# torch.nn.init functions that modules' reset_parameters() call; skipped while building on meta.
_INITIALIZERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_",
                 "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")

Transform = Callable[[nn.Module], Any]


def from_pretrained(
    cls: type,
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
    kv_cache_dtype: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Load an HF folder (safetensors, sharded or not; or pytorch_model.bin), a folder in Mistral's
    own layout (params.json + consolidated*.safetensors, no config.json) or a .gguf file.

    `torch_dtype`/`dtype`: None -> float32, "auto" -> the checkpoint's dtype.
    `device_map`: None/"cpu", a device, "auto" (GPUs by free memory, then CPU) or a dict of
    module-name prefixes to devices. Other keywords override config fields.
    `gguf_native=True` (GGUF only): keep the file's quantized weights in their blocks and
    compute on them, instead of dequantizing to `torch_dtype` as Transformers does. With the
    native kernels (native/ggml.c: Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) the modules read the file's
    own pages and the model runs in float32, as llama.cpp does; where they cannot be built,
    `GGUFLinear` (torch's int4 kernel, Q4_0/Q4_1/Q4_K/Q8_0) runs in bfloat16. Other storage
    types are dequantized.
    bitsandbytes-style quantized models default to the quantization's compute dtype (bfloat16)
    for everything else, as Transformers defaults bitsandbytes models to float16.
    `fuse_projections`: q/k/v and gate/up run as one matmul each (fusion.py; the state dict
    keeps Transformers' names). Pass False to keep the separate `q_proj`... modules.
    Float Linears come back as `MatvecLinear` (matvec.py): same parameters and state dict.
    `kv_cache_dtype` (ours): the dtype of the KV cache `make_cache` and `generate()` allocate.
    None: float16 for `gguf_native` models on the native kernels (float32), as llama.cpp's default
    cache; else the model's own dtype, so a float model's logits stay those of Transformers.
    """
    options = LoadOptions.parse(
        pretrained_model_name_or_path, config=config, torch_dtype=torch_dtype, dtype=dtype, device_map=device_map,
        attn_implementation=attn_implementation, use_flash_attention_2=use_flash_attention_2,
        quantization_config=quantization_config, gguf_file=gguf_file, gguf_native=gguf_native,
        fuse_projections=fuse_projections, progress=progress, overrides=kwargs,
    )
    model, fresh_floats = assemble(cls, options)
    model.attn_implementation = check_implementation(options.attn_implementation, model.dtype)
    model.kv_cache_dtype = kv_cache_dtype_for(kv_cache_dtype, options.gguf_native, model.dtype)
    for transform in before_placement(options):
        model = transform(model)
    place_model(model, options.device_map)
    for transform in after_placement(options, fresh_floats):
        model = transform(model)
    release_freed_memory()
    keep_freed_memory()
    return model.eval()


def kv_cache_dtype_for(requested: Any, gguf_native: bool, activations: torch.dtype) -> torch.dtype | None:
    """The KV cache's dtype policy, shared by every loader: what was asked for; else float16 for
    a model on GGUF blocks computing in float32 (the native kernels), as llama.cpp's default; else
    None, the model's own dtype (one already in 16 bits, as torch's int4 path where the kernels
    cannot be built, would only round its keys twice)."""
    if requested is not None:
        return resolve_dtype(requested, "kv_cache_dtype")
    return torch.float16 if gguf_native and activations == torch.float32 else None


def assemble(cls: type, options: LoadOptions) -> tuple[nn.Module, bool]:
    """The checkpoint read and assigned into a model built on meta; (model, whether its floats
    are fresh memory). The checkpoint's own references die on return, before the transforms:
    a quantized load otherwise keeps the float weights it replaced alive until the end."""
    checkpoint = read_checkpoint(options)
    model = build_on_meta(cls, checkpoint.config)
    if options.prequantized:
        checkpoint = _prequantized(model, checkpoint, options.quantization_config)
    expected = expected_tensors(model)  # names and shapes of the float model, before any swap
    early = QuantizeAsRead(model, options.quantization_config, checkpoint, expected)
    tensors, blocks = match_names(checkpoint, expected, cls, early, DecodeInGroups(model, expected))
    early.finish()
    native = install_gguf_linears(model, blocks, tensors, checkpoint.dtype or torch.float32,
                                  source=options.path if options.is_gguf else None)
    assign(model, tensors, {k: v for k, v in expected.items()
                            if k.rsplit(".", 1)[0] not in native and k not in early.done}, checkpoint)
    return model, checkpoint.fresh_floats


def _prequantized(model: nn.Module, checkpoint: Checkpoint, config: BitsAndBytesConfig) -> Checkpoint:
    """Empty quantized modules for a checkpoint that holds its Linears' codes (they load into
    them), in place in `model`. A head tied to the embedding stays a Linear, quantized after
    `assign` from the embedding as when the model was first loaded (its saved scales, without
    its codes, are dropped)."""
    head = getattr(model, "lm_head", None)
    quantize_model(model, config)
    if head is None or not getattr(model.config, "tie_word_embeddings", False):
        return checkpoint
    model.lm_head = head
    tensors = ((name, tensor) for name, tensor in checkpoint.tensors if not name.startswith("lm_head."))
    return dataclasses.replace(checkpoint, tensors=tensors)


# Freed float weights and quantization temporaries the heap may keep while a load quantizes:
# past it they go back to the OS. glibc's fragmented heap otherwise grew with every Linear (a
# 4x peak); trimming after every Linear cost the page faults of fresh temporaries.
KEEP_WHILE_QUANTIZING_BYTES = 32 << 20


class QuantizeAsRead:
    """Quantizes each Linear a quantization config replaces as soon as its weight is read, so a
    load holds the quantized model and one float weight rather than the whole float model too
    (a GGUF loaded with load_in_8bit peaked at the bfloat16 model plus the int8 one: 2.8x the
    weights it kept; 3.0x, and 5.0x on a CI machine, with the C kernels off). The codes are
    those `quantize_model` would choose after `assign`: the same weight, in the same dtype.
    Linears with a bias, a tied head or a new classification head are left to `quantize_model`,
    which runs after `assign` as before.

    A GGUF's weights are decoded into buffers reused from one Linear to the next, and the parts
    of a fusable group (q/k/v, gate/up: fusion.py), a folder's too, into one buffer, quantized at
    once when the group is complete: the parts are then row views of one module's buffers, which fusing later
    takes as they are instead of copying them (bench/RESULTS.md, "Quantized loads without page
    faults or copies")."""

    OPEN_GROUPS = 2  # groups decoded at once: a layer's attention and MLP, in any file order

    def __init__(self, model: nn.Module, config: BitsAndBytesConfig | None, checkpoint: Checkpoint,
                 expected: dict[str, torch.Size]) -> None:
        self.model, self.config, self.expected, self.source = model, config, expected, checkpoint.source
        self.dtype = checkpoint.dtype  # None ("auto"): the dtype `assign` settles on is not known yet
        self.done: set[str] = set()
        self.spares: list[torch.Tensor] = []  # byte buffers decoded weights are written into, for reuse
        self.groups: dict[str, _Group] = {}  # parent module name -> its group being decoded
        self.alone: set[str] = set()  # parents whose parts are quantized one by one

    def __call__(self, key: str, tensor: Any) -> bool:
        """Quantize `tensor` (a tensor, or a LazyTensor decoded now) into the model if it is a
        replaced Linear's weight; whether it took it."""
        if self.config is None or self.dtype is None or not isinstance(tensor, (torch.Tensor, LazyTensor)):
            return False
        name, _, leaf = key.rpartition(".")
        if leaf != "weight" or key not in self.expected:
            return False
        module = self.model.get_submodule(name)
        if not quantizes(name, module, self.config) or module.bias is not None:
            return False
        if tuple(tensor.shape) != tuple(self.expected[key]):
            raise CheckpointError(f"tensor {key!r} in {self.source} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(self.expected[key])}")
        self.done.add(key)
        group = self._group_of(name)
        if group is None:
            if isinstance(tensor, LazyTensor):
                buffer = self._take(tensor.shape, tensor.dtype)
                self._give_back(buffer, [self._quantize_into(name, module, tensor.load(out=buffer))])
            else:
                self._quantize_into(name, module, tensor)
                release_file_pages(tensor)
            return True
        part = name.rpartition(".")[2]
        if isinstance(tensor, LazyTensor):
            tensor.load(out=group.rows(part))
        else:  # a folder's mapped weight: one copy into the group's rows, not the quantized parts' later
            group.rows(part).copy_(tensor)
            release_file_pages(tensor)
        group.arrived.add(part)
        if group.complete:
            self._quantize_group(self.groups.pop(group.parent))
        return True

    def finish(self) -> None:
        """Quantize the parts of groups a checkpoint left incomplete one by one (the missing
        ones are `assign`'s to report)."""
        for group in self.groups.values():
            for part in group.arrived:
                name = f"{group.parent}.{part}"
                self._quantize_into(name, self.model.get_submodule(name), group.rows(part))
        self.groups.clear()
        self.spares.clear()

    def _quantize_into(self, name: str, linear: nn.Module, weight: torch.Tensor) -> nn.Module:
        linear.weight = nn.Parameter(weight.to(self.dtype), requires_grad=False)
        quantized = quantize_linear(linear, self.config, name)
        self.model.set_submodule(name, quantized)
        release_freed_memory(above=KEEP_WHILE_QUANTIZING_BYTES)  # the float weight and its temporaries
        return quantized

    def _group_of(self, name: str) -> _Group | None:
        """The open group Linear `name` is decoded into, opened on its first part; None where the
        Linear is quantized alone (not a fusable part, a part skipped or with a bias, a format
        without row views, or too many groups open)."""
        return _group_of(name, self.model, self.expected, self.groups, self.alone, lambda part, linear: (
            linear.bias is None and quantizes(part, linear, self.config)), self._open)

    def _open(self, linears: list[nn.Linear], name: str) -> torch.Tensor | None:
        """The buffer a new group's rows are decoded into, or None to quantize its parts alone."""
        if len(self.groups) >= self.OPEN_GROUPS or not self._stacks(linears[0], name):
            return None
        return self._take((sum(m.out_features for m in linears), linears[0].in_features), self.dtype)

    def _stacks(self, linear: nn.Linear, name: str) -> bool:
        """Whether this config's format gives row views of a group quantized at once (the
        quantized class of an empty twin, built on meta, tells)."""
        twin = quantize_linear(nn.Linear(linear.in_features, 64, bias=False, device="meta"), self.config, name)
        return isinstance(twin, QuantizedLinear) and type(twin).buffers_are_portable()

    def _quantize_group(self, group: _Group) -> None:
        """The whole group quantized as one Linear, its parts made row views of the result (or,
        for a format that packs rows together, each part quantized from its rows)."""
        whole = nn.Linear(group.buffer.shape[1], group.buffer.shape[0], bias=False, device="meta")
        whole.weight = nn.Parameter(group.buffer, requires_grad=False)
        fused = quantize_linear(whole, self.config, group.parent)
        parts = type(fused).stacked_rows(fused, group.sizes) if isinstance(fused, QuantizedLinear) else None
        if parts is None or any(_holds(p, group.buffer) for p in parts):
            parts = [self._quantize_into(f"{group.parent}.{part}", self.model.get_submodule(f"{group.parent}.{part}"),
                                         group.rows(part)) for part in group.parts]
        else:
            for part, module in zip(group.parts, parts):
                self.model.set_submodule(f"{group.parent}.{part}", module)
            del fused
            release_freed_memory(above=KEEP_WHILE_QUANTIZING_BYTES)
        self._give_back(group.buffer, parts)

    def _take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A buffer for weights that live only until they are quantized: the same bytes serve
        Linear after Linear (fresh ones cost a page fault per 4 KiB written)."""
        need = math.prod(shape) * dtype.itemsize
        fits = [b for b in self.spares if b.numel() >= need]
        if fits:
            spare = min(fits, key=torch.Tensor.numel)
        else:
            if self.spares and len(self.spares) >= self.OPEN_GROUPS:  # the smallest goes before a larger one is made
                drop = min(self.spares, key=torch.Tensor.numel)
                self.spares = [b for b in self.spares if b is not drop]
            spare = torch.empty(need, dtype=torch.uint8)
        self.spares = [b for b in self.spares if b is not spare]
        return spare[:need].view(dtype).view(shape)

    def _give_back(self, buffer: torch.Tensor, made: list[nn.Module]) -> None:
        """Keep `buffer`'s bytes for the next weight, unless a module `made` from them kept them."""
        if not any(_holds(m, buffer) for m in made):
            whole = torch.empty(0, dtype=torch.uint8).set_(buffer.untyped_storage())
            self.spares.append(whole)


class DecodeInGroups:
    """Decodes a GGUF's float weights as `match_names` reaches them, the parts of a fusable group
    (q/k/v, gate/up: fusion.py) into rows of one buffer, so that fusing them later takes those
    rows as they are instead of copying every part into a new buffer."""

    def __init__(self, model: nn.Module, expected: dict[str, torch.Size]) -> None:
        self.model, self.expected = model, expected
        self.groups: dict[str, _Group] = {}
        self.alone: set[str] = set()

    def __call__(self, key: str, lazy: LazyTensor) -> torch.Tensor:
        name, _, leaf = key.rpartition(".")
        group = self._group_of(name, lazy.dtype) if leaf == "weight" else None
        rows = None if group is None else group.rows(name.rpartition(".")[2])
        if rows is None or tuple(lazy.shape) != tuple(rows.shape):
            return lazy.load()  # a wrong shape is `assign`'s to report
        return lazy.load(out=rows)

    def _group_of(self, name: str, dtype: torch.dtype) -> _Group | None:
        return _group_of(name, self.model, self.expected, self.groups, self.alone, lambda part, linear: True,
                         lambda linears, name: torch.empty(sum(m.out_features for m in linears),
                                                           linears[0].in_features, dtype=dtype))


def _group_of(name: str, model: nn.Module, expected: dict[str, torch.Size], groups: dict[str, _Group],
              alone: set[str], accepts: Callable[[str, nn.Linear], bool],
              open_buffer: Callable[[list[nn.Linear], str], torch.Tensor | None]) -> _Group | None:
    """The group (in `groups`, by parent module name) whose buffer Linear `name`'s weight is
    decoded into: opened on its first part where every part of its fusable group (fusion.py
    FUSIONS) is an nn.Linear of one in_features, in the checkpoint, that `accepts`, and
    `open_buffer` gives a buffer; else None, and the parent joins `alone`."""
    parent, _, part = name.rpartition(".")
    attribute = parent.rpartition(".")[2]
    if parent in alone or attribute not in FUSIONS or part not in FUSIONS[attribute][1]:
        return None
    if parent in groups:
        return groups[parent]
    parts = FUSIONS[attribute][1]
    linears = [model.get_submodule(parent)._modules.get(p) for p in parts]
    buffer = None
    if all(isinstance(m, nn.Linear) and m.in_features == linears[0].in_features
           and f"{parent}.{p}.weight" in expected and accepts(f"{parent}.{p}", m) for p, m in zip(parts, linears)):
        buffer = open_buffer(linears, name)  # type: ignore[arg-type]
    if buffer is None:
        alone.add(parent)
        return None
    groups[parent] = _Group(parent, parts, [m.out_features for m in linears], buffer, set())  # type: ignore[union-attr]
    return groups[parent]


@dataclass
class _Group:
    """A fusable group's parts being decoded into one (rows, in_features) buffer."""

    parent: str
    parts: tuple[str, ...]
    sizes: list[int]
    buffer: torch.Tensor
    arrived: set[str]

    def rows(self, part: str) -> torch.Tensor:
        i = self.parts.index(part)
        start = sum(self.sizes[:i])
        return self.buffer[start:start + self.sizes[i]]

    @property
    def complete(self) -> bool:
        return len(self.arrived) == len(self.parts)


def _holds(module: nn.Module, buffer: torch.Tensor) -> bool:
    """Whether any tensor of `module` lies in `buffer`'s storage."""
    storage = buffer.untyped_storage().data_ptr()
    tensors = [*module.parameters(), *module.buffers(),
               *(v for m in module.modules() for v in vars(m).values() if isinstance(v, torch.Tensor))]
    return any(t.untyped_storage().data_ptr() == storage for t in tensors if t.device.type == "cpu")


def from_config(cls: type, config: MistralConfig, *, torch_dtype: Any = None,
                attn_implementation: str | None = None) -> nn.Module:
    """A randomly initialized model in `torch_dtype` (default float32), with the matvec swap."""
    target = torch.float32 if torch_dtype is None else resolve_dtype(torch_dtype)
    model = cls(config).to(target)
    model.attn_implementation = check_implementation(attn_implementation, target)
    return install_matvec(model)


# ------------------------------------------------------------------ options
@dataclass(frozen=True)
class LoadOptions:
    """What `from_pretrained` was asked for, checked; `dtype` is a torch dtype, "auto" or None
    (None: float32, or the quantization's compute dtype when that applies)."""

    path: Path
    config: MistralConfig | None
    dtype: Any
    device_map: Any
    attn_implementation: str | None
    quantization_config: BitsAndBytesConfig | None
    prequantized: bool
    gguf_native: bool
    fuse: bool
    progress: bool | None
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"

    @classmethod
    def parse(cls, name_or_path: str | os.PathLike, *, config: MistralConfig | None, torch_dtype: Any, dtype: Any,
              device_map: Any, attn_implementation: str | None, use_flash_attention_2: bool, quantization_config: Any,
              gguf_file: str | None, gguf_native: bool, fuse_projections: bool, progress: bool | None,
              overrides: dict[str, Any]) -> LoadOptions:
        overrides = {k: v for k, v in overrides.items() if k not in _ACCEPTED_NOOP_OPTIONS}
        unknown = [k for k in overrides if k not in MistralConfig().to_dict()]
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected keyword arguments {unknown}")
        path = Path(name_or_path) if gguf_file is None else Path(name_or_path) / gguf_file
        if not path.exists():
            raise CheckpointError(
                f"{path} does not exist (this library never downloads: pass a local folder or .gguf file)"
            )
        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise ConfigError("pass only one of torch_dtype and dtype")
        if isinstance(quantization_config, dict):
            quantization_config = BitsAndBytesConfig.from_dict(quantization_config)
        saved = _saved_quantization(path)
        if saved is not None:
            if quantization_config is not None and quantization_config.to_dict() != saved.to_dict():
                warnings.warn(f"{path} holds a model quantized with its own quantization_config; the one passed "
                              "is ignored, as Transformers ignores it", stacklevel=3)
            quantization_config = saved
        if gguf_native and (path.suffix != ".gguf" or quantization_config is not None):
            raise ConfigError("gguf_native=True applies to a .gguf file loaded without a quantization_config")
        return cls(
            path=path, config=config, dtype=_wanted_dtype(torch_dtype if torch_dtype is not None else dtype,
                                                          quantization_config, gguf_native),
            device_map=device_map, attn_implementation="flash_attention_2" if use_flash_attention_2 else attn_implementation,
            quantization_config=quantization_config, prequantized=saved is not None, gguf_native=gguf_native,
            fuse=fuse_projections and single_device(device_map),  # layers split over devices stay unfused
            progress=progress, overrides=overrides,
        )


def _saved_quantization(path: Path) -> BitsAndBytesConfig | None:
    """The quantization_config a folder's config.json records: its weights are stored quantized
    (`save_pretrained` of a quantized model, ours or Transformers' bitsandbytes one)."""
    file = path / "config.json"
    if path.suffix == ".gguf" or not file.is_file():
        return None
    try:
        saved = json.loads(file.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # read_checkpoint reports a broken config.json
    return None if saved is None else BitsAndBytesConfig.from_dict(saved)


def _wanted_dtype(wanted: Any, quantization_config: BitsAndBytesConfig | None, gguf_native: bool) -> Any:
    """The dtype policy: what was asked for; else a quantized model's compute dtype."""
    if wanted is None and quantization_config is not None:
        return quantization_config.compute_dtype
    if wanted is None and gguf_native:
        from .native import ggml

        # the native block kernels take float32 activations, as llama.cpp keeps them; torch's
        # int4 kernel (GGUFLinear, where they cannot be built) is fast in bfloat16 only
        return torch.float32 if ggml.available() else torch.bfloat16
    return wanted


# ------------------------------------------------------------------ read
@dataclass
class Checkpoint:
    """A checkpoint read but not yet assigned.

    `tensors` yields (checkpoint name, tensor, GGUFQuantizedTensor or a GGUF's LazyTensor), lazily.
    `dtype`: what floats are assigned in; None = the checkpoint's own floating dtype.
    `fresh_floats`: float tensors own their memory (decoded from GGUF) rather than map the file,
    so fusing them (a copy) frees the parts instead of holding the weights twice."""

    config: MistralConfig
    tensors: Iterable[tuple[str, Any]]
    dtype: torch.dtype | None
    source: str
    fresh_floats: bool


def read_checkpoint(options: LoadOptions) -> Checkpoint:
    return _read_gguf(options) if options.is_gguf else _read_folder(options)


def _read_folder(options: LoadOptions) -> Checkpoint:
    folder = options.path
    if is_mistral_folder(folder):
        return _read_mistral_folder(options)
    config = options.config or MistralConfig.from_pretrained(folder, **options.overrides)
    target = _folder_dtype(options)
    tensors = tqdm(iter_tensors(folder, target), desc=f"Loading {folder.name}", unit="tensor", leave=False,
                   disable=True if options.progress is False else None)  # None: shown on a terminal only
    return Checkpoint(config, tensors, target, str(folder), fresh_floats=False)


def _folder_dtype(options: LoadOptions) -> torch.dtype | None:
    """What a folder's floats are read as: None ("auto") keeps the file's dtype; default float32."""
    if options.dtype == "auto":
        return None
    return resolve_dtype(options.dtype) if options.dtype is not None else torch.float32


def _read_mistral_folder(options: LoadOptions) -> Checkpoint:
    """params.json + consolidated*.safetensors: names mapped, Q/K rows permuted as they stream."""
    folder = options.path
    config = options.config or config_from_params(read_params(folder), **options.overrides)
    target = _folder_dtype(options)
    raw = (item for file in mistral_weight_files(folder) for item in iter_safetensors_file(file, target))
    tensors = tqdm(to_hf_tensors(raw, config, str(folder)), desc=f"Loading {folder.name}", unit="tensor",
                   leave=False, disable=True if options.progress is False else None)
    return Checkpoint(config, tensors, target, str(folder), fresh_floats=False)


def _read_gguf(options: LoadOptions) -> Checkpoint:
    """Blocks kept mapped (`gguf_native`), or every tensor decoded as `match_names` walks them."""
    from .checkpoints.gguf import lazy_float_tensors, load_gguf

    wanted = None if options.dtype == "auto" else options.dtype  # "auto": GGUF floats come as float32
    target = torch.float32 if wanted is None else resolve_dtype(wanted)
    if options.gguf_native:
        checkpoint = load_gguf(options.path, dequantize=False, dtype=target)
        config, tensors = checkpoint.config, checkpoint.tensors.items()
    else:
        config, lazy = lazy_float_tensors(options.path, target)
        tensors = ((t.name, t) for t in lazy)  # decoded as `match_names` reaches them
    for key, value in options.overrides.items():
        setattr(config, key, value)
    return Checkpoint(config, tensors, target, str(options.path), fresh_floats=True)


# ------------------------------------------------------------------ build and assign
def build_on_meta(cls: type, config: MistralConfig) -> nn.Module:
    with _empty_on_meta():
        return cls(config)


@contextlib.contextmanager
def _empty_on_meta() -> Iterator[None]:
    """Build modules on `meta` without running their initializers.

    The checkpoint's tensors are assigned next, so initializing is wasted; worse, torch's meta
    `normal_` (nn.Embedding's init) imports torch._dynamo on first use, which costs a sizeable
    share of a small model's load time and memory. Transformers' `no_init_weights` patches the
    same functions, with the same caveat: a module built in another thread meanwhile is not
    initialized either.
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


def expected_tensors(model: nn.Module) -> dict[str, torch.Size]:
    """Names and shapes the model needs; a tied lm_head needs no tensor of its own."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.shape for k, v in state.items()}


def match_names(checkpoint: Checkpoint, expected: dict[str, torch.Size], cls: type,
                consume: Callable[[str, Any], bool] = lambda key, tensor: False,
                decode: Callable[[str, LazyTensor], torch.Tensor] = lambda key, lazy: lazy.load(),
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint's entries under the model's names, split into float tensors and GGUF
    blocks; entries with no learned state or for the other head are dropped, and so are those
    `consume(key, tensor)` took (installed in the model as they were read). The others that are
    still to be decoded (a GGUF's LazyTensors) are made by `decode(key, lazy)`."""
    tensors: dict[str, torch.Tensor] = {}
    blocks: dict[str, Any] = {}
    for name, tensor in checkpoint.tensors:
        key = _to_model_key(name, expected, cls)
        if key is None or consume(key, tensor):
            continue
        if isinstance(tensor, LazyTensor):
            tensor = decode(key, tensor)
        (tensors if isinstance(tensor, torch.Tensor) else blocks)[key] = tensor
    return tensors, blocks


def _to_model_key(name: str, expected: dict[str, torch.Size], cls: type) -> str | None:
    """Map a checkpoint key onto the model's names (base <-> head prefixes); None to skip it."""
    key = model_key(name, expected)
    if key is not None or skippable(name, expected):
        return key
    raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint: {cls.__name__} has no such parameter")


def assign(model: nn.Module, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size],
           checkpoint: Checkpoint) -> None:
    """Validate shapes, convert dtypes, start a missing classification head at random, then
    `load_state_dict(assign=True)` and tie the embeddings."""
    dtype = checkpoint.dtype or next(  # "auto": the checkpoint's own floating dtype
        (t.dtype for t in tensors.values() if t.dtype.is_floating_point), torch.float32)
    source = checkpoint.source
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
        warnings.warn(f"{fresh} not in {source}; initialized at random: train before use", stacklevel=4)
        config = model.config
        for key in fresh:
            tensors[key] = torch.empty(expected[key], dtype=dtype).normal_(0.0, config.initializer_range)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()  # type: ignore[operator]


# ------------------------------------------------------------------ transforms, in order
def before_placement(options: LoadOptions) -> list[Transform]:
    """Transforms of the assigned model, still where the checkpoint put it: quantization, part by
    part (every format quantizes rows independently, so fusing the parts later stacks the same
    codes; fusion keeps the parts as the model's modules)."""
    config = options.quantization_config
    return [] if config is None else [functools.partial(quantize_model, config=config)]


def after_placement(options: LoadOptions, fresh_floats: bool) -> list[Transform]:
    """Transforms on the target device. Fusion copies weights into one buffer the parts then
    view, so it runs where they end up, and fuses float Linears only when the checkpoint's
    floats are fresh memory (GGUF): floats mapped from a file would become private copies.
    Quantized and GGUF-native modules fuse here too. The matvec swap is last."""
    fuse = [functools.partial(_fused, float_linears=fresh_floats)] if options.fuse else []
    return [*fuse, install_matvec]


def _fused(model: nn.Module, **kwargs: Any) -> nn.Module:
    fuse_projections(model, **kwargs)
    return model


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, for its malloc controls; None where the C library is another (musl, macOS)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _Mallinfo2
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP_FREED_BYTES = 512 << 20  # free heap memory kept for the next forward instead of returned
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest: allocations below it come from the heap


def keep_freed_memory() -> None:
    """Let a forward's freed activations stay in the heap for the next one (glibc only; a no-op
    elsewhere). By default glibc maps each allocation over its dynamic threshold afresh and
    returns freed memory at the heap's top to the OS, so every prefill faulted its activations in
    again, zeroed page by page: 11,000 page faults in a 64-token 1B prefill and 29,000 in a
    512-token one, 5-10% of their time (bench/RESULTS.md). With these settings a repeated forward
    reuses the same memory. The peak resident size is the same; after a long prompt up to
    KEEP_FREED_BYTES of freed memory stay resident for the next request. Process-wide, as malloc
    is; called once a model is loaded."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)


def release_freed_memory(above: int = 0) -> None:
    """Hand the loader's freed temporaries back to the OS (glibc only; a no-op elsewhere), if
    the heap holds more than `above` free bytes.

    Decoding and re-packing quantized blocks leaves the heap fragmented, and RSS then stays far
    above the weights' size. Freed memory is not leaked either way; this only makes RSS honest."""
    libc = _glibc()
    if libc is not None and (above <= 0 or _free_heap_bytes(libc) > above):
        libc.malloc_trim(0)


def _free_heap_bytes(libc: ctypes.CDLL) -> int:
    """Free bytes glibc's heap holds (mallinfo2, glibc 2.33 on); where it is missing, as if
    there were many, so the caller trims."""
    if not hasattr(libc, "mallinfo2"):
        return 1 << 62
    return libc.mallinfo2().fordblks
