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

import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import SafetensorError, safe_open
from safetensors.flax import save_file

from ..checkpoints import hf_folder
from ..errors import CheckpointError

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
    found: dict[str, str] = {}  # model name -> checkpoint name
    unexpected = []
    for name in tensors:
        key = hf_folder.model_key(name, expected)
        if key is not None:
            found[key] = name
        elif not hf_folder.skippable(name, expected):
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
    files = hf_folder.weight_files(folder)
    if files[0].suffix != ".safetensors":
        raise CheckpointError(
            f"{folder} holds {files[0].name} but no {hf_folder.SAFE_WEIGHTS} or {hf_folder.SAFE_INDEX}; the Flax "
            "loader reads safetensors only: re-save the checkpoint with mistral_lm.MistralForCausalLM"
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


def save_safetensors(state: Mapping[str, jax.Array], folder: str | os.PathLike) -> None:
    """Write one model.safetensors; "format": "pt" because names and layout are PyTorch's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: jnp.asarray(value) for name, value in state.items()}, folder / hf_folder.SAFE_WEIGHTS,
              metadata={"format": "pt"})
