"""Hugging Face checkpoint folders without a tensor framework: which files, which names.

Shared by the PyTorch loader (`checkpoints/safetensors.py`, `pretrained`) and the Flax one
(`flax/convert.py`); each keeps only its own `safe_open(framework=...)`. Nothing here imports
torch or jax, so one definition of the shard index (with its path guard) and of the key mapping
serves both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Container
from pathlib import Path

from ..errors import CheckpointError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PT_WEIGHTS = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"
# Keys some checkpoints carry that hold no learned state.
IGNORED_KEYS = ("rotary_emb.inv_freq",)
# Heads a checkpoint may carry that the model being loaded does not have: a causal-LM
# checkpoint fine-tuned for classification, or back.
OTHER_HEADS = ("lm_head.weight", "score.weight")


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint folder, safetensors first, in shard order.

    Example: a folder with model.safetensors.index.json listing two shards ->
    [folder/model-00001-of-00002.safetensors, folder/model-00002-of-00002.safetensors].
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    for single, index in ((SAFE_WEIGHTS, SAFE_INDEX), (PT_WEIGHTS, PT_INDEX)):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            return shards_from_index(folder / index)
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(
        f"no weights in {folder}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {PT_WEIGHTS} or {PT_INDEX}; found {found}"
    )


def shards_from_index(index: Path) -> list[Path]:
    """The distinct shard files an index's weight_map lists, in first-seen order.

    A shard name that is absolute or escapes the index's folder is a CheckpointError.
    """
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read the shard index {index}: {exc}") from exc
    shards = []
    for name in names:
        # Judged by the name, not by the resolved path: a Hugging Face cache snapshot holds its
        # shards as symlinks into ../../blobs, and those must load.
        relative = Path(os.path.normpath(name)) if isinstance(name, str) else None
        if relative is None or relative.is_absolute() or relative.parts[:1] == ("..",):
            raise CheckpointError(f"shard index {index} points outside its folder: {name!r}")
        shard = index.parent / relative
        if not shard.is_file():
            raise CheckpointError(f"shard {name} listed in {index.name} is missing")
        shards.append(shard)
    return shards


def model_key(name: str, expected: Container[str]) -> str | None:
    """The model's name for checkpoint tensor `name`, or None if the model has no such parameter.

    Base-model and causal-LM checkpoints load into either class, as with Transformers: the
    "model." prefix is stripped or added when that gives an expected name.
    Example: "layers.0.mlp.up_proj.weight" under a causal LM -> "model.layers.0.mlp.up_proj.weight".
    """
    if name in expected:
        return name
    if name.startswith("model.") and name[len("model."):] in expected:
        return name[len("model."):]  # a causal-LM checkpoint loaded into the bare decoder
    if "model." + name in expected:
        return "model." + name  # a base-model checkpoint loaded under a head
    return None


def skippable(name: str, expected: Container[str]) -> bool:
    """Whether a tensor without a model parameter is expected in a checkpoint (no learned state, or the other head)."""
    return name.endswith(IGNORED_KEYS) or (name in OTHER_HEADS and name not in expected)
