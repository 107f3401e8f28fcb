"""Mistral's own checkpoint layout (mistral-inference): `params.json` + `consolidated*.safetensors`.

Three tables and one permutation turn such a folder into what the HF-named loader expects:

    config_from_params   params.json fields -> MistralConfig (checked, errors name the field)
    weight_files         consolidated.safetensors, or consolidated-0000N-of-0000M.safetensors
    hf_name              mistral-inference tensor names -> Transformers' names
    to_half_split        Q/K rows: interleaved-pair RoPE -> HF's half-split RoPE

and back for writing (`save_mistral_layout`, `mistral-lm convert --layout mistral`).

Only the first parse of every tensor goes through here; the result is an ordinary stream of
HF-named tensors, so shape checks, dtype policy and assignment stay in `loading.py`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .._util import is_int
from ..config import CONFIG_NAME, MistralConfig
from ..errors import CheckpointError, ConfigError
from .safetensors import LazyTensor, eager, split_shards, write_shard

PARAMS_NAME = "params.json"
SINGLE_FILE = "consolidated.safetensors"
_SHARD = re.compile(r"^consolidated-(\d+)-of-(\d+)\.safetensors$")

# mistral-inference name -> Transformers name; "{i}" is the layer index.
NAME_TABLE: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
}
# Which config field counts the heads whose rows a tensor holds (the rows to permute).
_ROPE_HEADS = {"attention.wq.weight": "num_attention_heads", "attention.wk.weight": "num_key_value_heads"}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")

# params.json field -> MistralConfig field; the required ones first.
_REQUIRED = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
             "hidden_dim": "intermediate_size", "norm_eps": "rms_norm_eps", "vocab_size": "vocab_size"}
_OPTIONAL = {"head_dim": "head_dim", "n_kv_heads": "num_key_value_heads", "rope_theta": "rope_theta",
             "sliding_window": "sliding_window", "max_seq_len": "max_position_embeddings"}
# Fields describing parts this package does not implement: refusing beats loading half a model.
_UNSUPPORTED = ("moe", "vision_encoder", "lora")


def is_mistral_folder(folder: str | os.PathLike) -> bool:
    """A folder in Mistral's layout: params.json and no config.json (config.json wins when both exist)."""
    folder = Path(folder)
    return folder.is_dir() and (folder / PARAMS_NAME).is_file() and not (folder / CONFIG_NAME).is_file()


# ------------------------------------------------------------------ params.json -> config
def read_params(folder: str | os.PathLike) -> dict[str, Any]:
    file = Path(folder) / PARAMS_NAME
    try:
        params = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {file}: {exc}") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{file} must hold a JSON object, got {type(params).__name__}")
    return params


def config_from_params(params: dict[str, Any], **overrides: Any) -> MistralConfig:
    """MistralConfig from the fields of a params.json; ConfigError names the params.json field.

    Defaults follow Transformers' conversion script: n_kv_heads = n_heads, head_dim = dim // n_heads,
    rope_theta = 10000 (Mistral-7B-v0.1's params.json has none), no sliding window unless given.

    >>> c = config_from_params({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
    ...                         "hidden_dim": 128, "norm_eps": 1e-5, "vocab_size": 100})
    >>> (c.hidden_size, c.head_dim, c.num_key_value_heads, c.sliding_window)
    (64, 16, 2, None)
    """
    for name in _UNSUPPORTED:
        if params.get(name):
            raise ConfigError(f"params.json field {name!r}: this package implements dense text Mistral models only")
    missing = [k for k in _REQUIRED if k not in params]
    if missing:
        raise ConfigError(f"params.json lacks the field(s) {missing} (needed: {list(_REQUIRED)})")
    for name in ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size", "n_kv_heads", "head_dim", "max_seq_len"):
        if name in params and (not is_int(params[name]) or params[name] <= 0):
            raise ConfigError(f"params.json field {name!r} must be a positive integer, got {params[name]!r}")
    for name in ("norm_eps", "rope_theta"):
        value = params.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"params.json field {name!r} must be a positive number, got {value!r}")
    window = params.get("sliding_window")
    if window is not None and (not is_int(window) or window <= 0):
        raise ConfigError(f"params.json field 'sliding_window' must be a positive integer or null, got {window!r}")
    n_heads, n_kv = params["n_heads"], params.get("n_kv_heads", params["n_heads"])
    if n_heads % n_kv:
        raise ConfigError(f"params.json field 'n_kv_heads' ({n_kv}) must divide n_heads ({n_heads})")
    if "head_dim" not in params and params["dim"] % n_heads:
        raise ConfigError(f"params.json field 'head_dim' is needed: dim ({params['dim']}) is not a multiple "
                          f"of n_heads ({n_heads})")
    fields = {hf: params[k] for k, hf in {**_REQUIRED, **_OPTIONAL}.items() if k in params}
    fields.setdefault("num_key_value_heads", n_kv)
    fields.setdefault("rope_theta", 10000.0)
    fields["sliding_window"] = window
    fields["tie_word_embeddings"] = False
    return MistralConfig(**{**fields, **overrides})


# ------------------------------------------------------------------ files
def weight_files(folder: str | os.PathLike) -> list[Path]:
    """consolidated.safetensors, or every consolidated-0000N-of-0000M.safetensors in order.

    Example: a folder holding consolidated-00002-of-00002.safetensors and
    consolidated-00001-of-00002.safetensors -> [folder/...-00001-..., folder/...-00002-...].
    An incomplete shard set is a CheckpointError naming the missing shard numbers.
    """
    folder = Path(folder)
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    shards = {int(m[1]): (int(m[2]), folder / m[0]) for p in folder.iterdir() if (m := _SHARD.match(p.name))}
    if not shards:
        found = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(f"no weights in {folder}: expected {SINGLE_FILE} or "
                              f"consolidated-0000N-of-0000M.safetensors next to {PARAMS_NAME}; found {found}")
    totals = {total for total, _ in shards.values()}
    total = max(totals)
    missing = [n for n in range(1, total + 1) if n not in shards]
    if len(totals) > 1 or missing:
        raise CheckpointError(f"incomplete shard set in {folder}: {total} shards named, missing {missing}")
    return [shards[n][1] for n in range(1, total + 1)]


# ------------------------------------------------------------------ names and the RoPE permutation
def hf_name(name: str) -> tuple[str, str | None]:
    """(Transformers name, config field counting the RoPE heads of its rows or None).

    Example: "layers.3.attention.wk.weight" -> ("model.layers.3.self_attn.k_proj.weight",
    "num_key_value_heads"). A name not in NAME_TABLE is a CheckpointError.
    """
    if name in NAME_TABLE:
        return NAME_TABLE[name], None
    match = _LAYER.match(name)
    if match and f"layers.{{i}}.{match[2]}" in NAME_TABLE:
        return NAME_TABLE[f"layers.{{i}}.{match[2]}"].format(i=match[1]), _ROPE_HEADS.get(match[2])
    raise CheckpointError(f"unexpected tensor {name!r} in a Mistral-format checkpoint; known names: "
                          f"{list(NAME_TABLE)}")


def to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a Q or K projection from interleaved-pair RoPE to HF's half-split RoPE.

    mistral-inference rotates pairs of adjacent features (2j, 2j+1) of each head; Transformers
    rotates feature j with feature j + head_dim/2. Within each head, row 2j moves to j and row
    2j+1 moves to j + head_dim/2 (Transformers' convert_mistral_weights_to_hf `permute`).

    Worked example, one head, head_dim 4, rows named by their Mistral index:
    [0, 1, 2, 3] (pairs (0,1), (2,3)) -> [0, 2, 1, 3] (halves [0, 2] and [1, 3]).

    w: (n_heads * head_dim, dim) -> same shape.
    """
    rows, dim = w.shape
    if rows % (2 * n_heads):
        raise CheckpointError(f"{rows} rows cannot hold {n_heads} heads of an even head_dim")
    # (H, D/2, 2, dim) -> (H, 2, D/2, dim): the pair index becomes the half index
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def to_hf_tensors(tensors: Iterable[tuple[str, torch.Tensor]], config: MistralConfig,
                  source: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Mistral-named tensors -> (HF name, tensor), Q/K rows permuted after their shape is checked
    against the config (a mismatch names head_dim and the head count, before anything is assigned)."""
    for name, tensor in tensors:
        key, heads_field = hf_name(name)
        if heads_field is not None:
            heads = getattr(config, heads_field)
            rows = heads * config.head_dim
            if tensor.dim() != 2 or tensor.shape[0] != rows:
                raise CheckpointError(
                    f"{name} in {source} has shape {tuple(tensor.shape)}, but {heads_field}={heads} x "
                    f"head_dim={config.head_dim} needs {rows} rows: params.json's head_dim or head counts "
                    "do not describe this checkpoint"
                )
            tensor = to_half_split(tensor, heads)
        yield key, tensor


# ------------------------------------------------------------------ writing
def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `to_half_split`: HF half-split Q/K rows -> interleaved pairs.

    One head, head_dim 4, rows named by their HF index: [0, 1, 2, 3] -> [0, 2, 1, 3].
    w: (n_heads * head_dim, dim) -> same shape.
    """
    rows, dim = w.shape
    # (H, 2, D/2, dim) -> (H, D/2, 2, dim): the half index becomes the pair index
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def params_from_config(config: MistralConfig) -> dict[str, Any]:
    """The params.json of a config. The layout has no place for token ids or tied embeddings:
    the output matrix is written as its own tensor, and bos/eos are the tokenizer's to know."""
    hf_to_params = {hf: k for k, hf in {**_REQUIRED, **_OPTIONAL}.items() if k != "max_seq_len"}
    return {k: getattr(config, hf) for hf, k in hf_to_params.items()}


def mistral_tensors(entries: list[LazyTensor], config: MistralConfig) -> list[LazyTensor]:
    """HF-named lazy tensors (a causal LM's) -> Mistral-named ones whose Q/K rows are interleaved
    when made. Without an lm_head entry (tied embeddings) the output matrix is the embedding's:
    the layout always carries its own."""
    by_name = {entry.name: entry for entry in entries}
    if "lm_head.weight" not in by_name and "model.embed_tokens.weight" in by_name:
        embed = by_name["model.embed_tokens.weight"]
        entries = [*entries, embed._replace(name="lm_head.weight", load=lambda: embed.load().clone())]
    to_mistral = {hf.format(i=i): m.format(i=i) for m, hf in NAME_TABLE.items()
                  for i in range(config.num_hidden_layers)}
    out = []
    for entry in entries:
        if entry.name not in to_mistral:
            raise CheckpointError(f"{entry.name!r} has no name in Mistral's layout (only a causal LM can be written)")
        name = to_mistral[entry.name]
        heads_field = _ROPE_HEADS.get(name.split(".", 2)[-1]) if name.startswith("layers.") else None
        heads = getattr(config, heads_field) if heads_field is not None else None
        out.append(LazyTensor(name, entry.shape, entry.dtype, functools.partial(_made, entry.load, heads)))
    return out


def _made(load: Callable[[], torch.Tensor], heads: int | None) -> torch.Tensor:
    tensor = load().detach().to("cpu")
    return (to_interleaved(tensor, heads) if heads is not None else tensor).contiguous()


def save_mistral_layout(state: dict[str, torch.Tensor] | list[LazyTensor], config: MistralConfig,
                        folder: str | os.PathLike, max_shard_size: int | str = "5GB") -> list[Path]:
    """Write params.json and consolidated.safetensors (or consolidated-0000N-of-0000M.safetensors
    above `max_shard_size`), the layout mistral-inference reads; returns the weight files.
    LazyTensors are made one shard at a time."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("consolidated*.safetensors"):
        stale.unlink()
    if isinstance(state, dict):
        embed = state["model.embed_tokens.weight"]
        if state.get("lm_head.weight", embed).data_ptr() == embed.data_ptr():
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied: written from embed
        state = eager(state)
    shards = split_shards(mistral_tensors(state, config), max_shard_size)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"consolidated-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_shard(shard, folder / name)
    (folder / PARAMS_NAME).write_text(json.dumps(params_from_config(config), indent=2) + "\n", encoding="utf-8")
    return [folder / n for n in names]
