"""Transformers (PyTorch-layout) safetensors <-> Flax params.

One naming rule covers every tensor, because the linen modules carry the state-dict names:
a Flax path joined with "." is the PyTorch key, after renaming its last part —

    ("model", "layers", "0", "self_attn", "q_proj", "kernel")  <->  "model.layers.0.self_attn.q_proj.weight"
    ("model", "embed_tokens", "embedding")                     <->  "model.embed_tokens.weight"
    ("model", "norm", "weight")                                <->  "model.norm.weight"

and a Linear's weight is stored (out, in) by PyTorch but used as an (in, out) kernel by Flax, so
kernels are transposed both ways. The expected names and shapes come from the model's own
`params_shape_tree`, so the checks below cannot drift from the modules.

Files are read with safetensors' Flax backend: numpy has no bfloat16, and torch is not needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import SafetensorError, safe_open
from safetensors.flax import save_file

from ..errors import CheckpointError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# Keys some checkpoints carry that hold no learned state.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Heads a checkpoint may carry that the model being loaded does not have.
_OTHER_HEADS = ("lm_head.weight", "score.weight")
_SHOWN = 10  # names listed per kind of problem in an error message

Params = dict[str, Any]


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """The PyTorch key of a Flax param path, and whether its value is transposed between the two."""
    *module, leaf = path
    if leaf not in ("kernel", "embedding", "weight"):
        raise CheckpointError(f"no PyTorch name for the Flax parameter {'/'.join(path)}")
    return ".".join(module) + ".weight", leaf == "kernel"


def flax_to_hf(params: Params) -> dict[str, jax.Array]:
    """A PyTorch-layout state dict (names and (out, in) weights) from Flax params."""
    state = {}
    for path, value in flatten_dict(params).items():
        name, transpose = hf_name(path)
        state[name] = value.T if transpose else value
    return state


def hf_to_flax(tensors: Mapping[str, jax.Array], shape_tree: Params, source: str = "the checkpoint") -> Params:
    """Flax params shaped like `shape_tree` (ShapeDtypeStruct leaves) from a PyTorch state dict.

    Base-model and causal-LM checkpoints both load into either class, as with Transformers:
    the "model." prefix is added or stripped to fit, and a head the model lacks is skipped.
    Raises CheckpointError naming every missing, unexpected and mis-shaped tensor.
    """
    expected = {hf_name(path)[0]: (path, spec) for path, spec in flatten_dict(shape_tree).items()}
    has_prefix = any(name.startswith("model.") for name in expected)
    found: dict[str, str] = {}  # model name -> checkpoint name
    unexpected = []
    for name in tensors:
        key = name
        if has_prefix and not name.startswith("model.") and "model." + name in expected:
            key = "model." + name  # a base-model checkpoint under a head
        elif not has_prefix and name.startswith("model."):
            key = name[len("model."):]  # a causal-LM checkpoint into the bare decoder
        if key in expected:
            found[key] = name
        elif not (name.endswith(_IGNORED_SUFFIXES) or name in _OTHER_HEADS):
            unexpected.append(name)
    missing = [name for name in expected if name not in found]
    params, misshaped = {}, []
    for key, name in found.items():
        path, spec = expected[key]
        value = tensors[name]
        transpose = hf_name(path)[1]
        want = tuple(reversed(spec.shape)) if transpose else tuple(spec.shape)
        if tuple(value.shape) != want:
            misshaped.append(f"{name}: {tuple(value.shape)}, expected {want}")
            continue
        params[path] = (value.T if transpose else value).astype(spec.dtype)
    problems = [f"{label} ({len(names)}): {names[:_SHOWN]}"
                for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if names]
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    return unflatten_dict(params)


def load_safetensors(folder: str | os.PathLike) -> dict[str, jax.Array]:
    """Every tensor of a Transformers folder: model.safetensors, or the shards its index lists."""
    folder = Path(folder)
    if (folder / SAFE_WEIGHTS).is_file():
        files = [folder / SAFE_WEIGHTS]
    elif (folder / SAFE_INDEX).is_file():
        files = _shards(folder / SAFE_INDEX)
    else:
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
        raise CheckpointError(
            f"no {SAFE_WEIGHTS} or {SAFE_INDEX} in {folder} (found: {found}); the Flax loader reads "
            "safetensors only: re-save a pytorch_model.bin checkpoint with mistral_lm.MistralForCausalLM"
        )
    tensors = {}
    for file in files:
        try:
            with safe_open(file, framework="flax") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {file}: {exc}") from exc
    return tensors


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read the shard index {index}: {exc}") from exc
    shards = [index.parent / name for name in names]
    absent = [s.name for s in shards if not s.is_file()]
    if absent:
        raise CheckpointError(f"shards listed in {index} are missing: {absent}")
    return shards


def save_safetensors(state: Mapping[str, jax.Array], folder: str | os.PathLike) -> None:
    """Write one model.safetensors; "format": "pt" because names and layout are PyTorch's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: jnp.asarray(value) for name, value in state.items()}, folder / SAFE_WEIGHTS,
              metadata={"format": "pt"})
