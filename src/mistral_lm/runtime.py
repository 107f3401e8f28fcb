"""One loader for the front ends: `mistral-lm generate/chat/serve` and `server.serve` all load here.

The front ends share the defaults that decide speed and memory, so the server never computes on
something other than what `mistral-lm generate` measured: a GGUF file runs on its own 4/8-bit
blocks (`quantize="auto"` -> "gguf", as llama.cpp does: about 4x less memory traffic per token
than float32), other checkpoints load as they are unless a quantization is asked for.

>>> model, tokenizer = load_for_inference()  # doctest: +SKIP  (the embedded default model)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import MistralLMError

QUANTIZE_CHOICES = ("auto", "none", "gguf", "int8", "int4", "nf4")


def freeze_imported_objects() -> None:
    """`gc.freeze()` for a process of our own (the CLI, the server), before it loads a model.

    Importing torch and this package leaves ~200k objects that live as long as the process; the
    first full collection after them (during loading or the first generate) walked them all, a
    0.2 s pause (bench/RESULTS.md), and every later one walked them again. Frozen, they are out
    of the collector's reach. Not for the library: a user's process decides its own collector."""
    import gc

    gc.freeze()


def resolve_model_path(model_path: str | Path | None) -> Path:
    """`model_path`, or the embedded default model when None; raises MistralLMError if it is missing."""
    if model_path is None:
        from .defaults import default_model_path

        return default_model_path()
    path = Path(model_path)
    if not path.exists():
        raise MistralLMError(f"model not found: {path}")
    return path


def load_options(path: Path, quantize: str = "auto") -> dict[str, Any]:
    """The `from_pretrained` keywords of a `quantize` choice for the checkpoint at `path`."""
    if quantize not in QUANTIZE_CHOICES:
        raise MistralLMError(f"quantize must be one of {list(QUANTIZE_CHOICES)}, got {quantize!r}")
    if quantize == "auto":
        quantize = "gguf" if path.suffix == ".gguf" else "none"
    if quantize == "gguf" and path.suffix != ".gguf":
        raise MistralLMError(f"--quantize gguf needs a .gguf file, got {path}")
    options: dict[str, Any] = {"gguf_native": quantize == "gguf"}
    if quantize in ("int8", "int4", "nf4"):
        from .quantization import BitsAndBytesConfig

        options["quantization_config"] = {
            "int8": BitsAndBytesConfig(load_in_8bit=True),
            "int4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4"),
            "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        }[quantize]
    return options


def tensor_parallel_size() -> int:
    """The number of ranks torchrun started (its WORLD_SIZE), 1 outside torchrun."""
    import os

    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise MistralLMError(f"WORLD_SIZE={value!r} is not a positive integer (set by torchrun)")
    return int(value)


def load_for_inference(model_path: str | Path | None = None, dtype: str | None = None,
                       quantize: str = "auto", kv_cache_dtype: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a folder or .gguf file; the embedded default model when None.

    Under `torchrun --nproc-per-node N` (WORLD_SIZE > 1) each rank loads its tensor-parallel shard
    (`parallel.from_pretrained`) with the same defaults; every rank must then run the same calls."""
    from .checkpoints.gguf import shared_headers
    from .modeling import MistralForCausalLM
    from .tokenizer import MistralTokenizer

    path = resolve_model_path(model_path)
    with shared_headers():  # a .gguf's header is parsed once for the model and its tokenizer
        if tensor_parallel_size() > 1:
            from .parallel import from_pretrained as sharded

            model = sharded(path, torch_dtype=dtype, kv_cache_dtype=kv_cache_dtype, **load_options(path, quantize))
        else:
            model = MistralForCausalLM.from_pretrained(path, torch_dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                                                       **load_options(path, quantize))
        return model.eval(), MistralTokenizer.from_pretrained(path)
