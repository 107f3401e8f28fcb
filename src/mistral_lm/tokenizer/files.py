"""Tokenizer files: what a folder, a tokenizer file or a GGUF file says, and writing a folder back.

`file_kwargs` and `folder_config` turn files into `MistralTokenizer` constructor keywords;
`save_folder` turns those keywords (and an engine) back into files that both our loader and
`transformers.AutoTokenizer` read with the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import TokenizerError

if TYPE_CHECKING:
    from .engines import Engine

TOKEN_NAMES = ("bos", "eos", "unk", "pad")


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise TokenizerError(f"cannot read the {what} {str(path)!r}: {err.strerror}") from err


def file_kwargs(path: Path) -> dict[str, Any]:
    """Constructor keywords for one file: a GGUF (its vocabulary and settings), a Tekken file (a .json
    named like mistral-common's, e.g. tekken.json, or one laid out as Tekken under another name), a
    tokenizer.json, else a SentencePiece model."""
    if path.suffix == ".gguf":  # checkpoints/ reads the header and rebuilds the vocabulary
        from ..checkpoints.gguf import read_gguf
        from ..checkpoints.gguf_tokenizer import gguf_tokenizer_parts

        backend, settings = gguf_tokenizer_parts(read_gguf(path))
        return {"tokenizer_object": backend, **settings}
    if path.suffix != ".json":
        return {"sp_model_path": path}
    if is_tekken(path):
        return {"tekken_file": path}
    from tokenizers import Tokenizer

    content = read_file(path, "tokenizer file")
    try:
        return {"tokenizer_object": Tokenizer.from_str(content.decode())}
    except Exception as err:  # tokenizers raises its own Exception type on malformed files
        if _looks_like_tekken(content):  # a tekken.json saved under another name
            return {"tekken_file": path}
        raise TokenizerError(f"{str(path)!r} is neither a valid tokenizer.json ({err}) nor a Tekken file") from err


def is_tekken(path: Path) -> bool:
    """mistral-common's rule: a .json file with "tekken" in its name."""
    return path.suffix == ".json" and "tekken" in path.name


def _looks_like_tekken(content: bytes) -> bool:
    """Tekken's layout: a top-level "config" and a "vocab" list (tokenizer.json has a "model")."""
    try:
        data = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("config"), dict) and isinstance(data.get("vocab"), list) \
        and "model" not in data


def folder_config(folder: Path) -> dict[str, Any]:
    """Constructor keywords from tokenizer_config.json, special_tokens_map.json, chat_template.jinja."""
    def load(name: str) -> dict[str, Any]:
        file = folder / name
        try:
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        except json.JSONDecodeError as err:
            raise TokenizerError(f"{str(file)!r} is not valid JSON: {err}") from err

    config, special_map = load("tokenizer_config.json"), load("special_tokens_map.json")
    kwargs: dict[str, Any] = {}
    for name in TOKEN_NAMES:
        token = config.get(f"{name}_token", special_map.get(f"{name}_token"))
        if isinstance(token, dict):  # serialized AddedToken
            token = token.get("content")
        if token is not None:
            kwargs[f"{name}_token"] = token
    for key in ("add_bos_token", "add_eos_token", "padding_side", "model_max_length"):
        if config.get(key) is not None:
            kwargs[key] = config[key]
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: Transformers uses "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None:
        kwargs["chat_template"] = template
    return kwargs


def save_folder(folder: Path, engine: Engine, settings: dict[str, Any]) -> tuple[str, ...]:
    """Write the engine's model files, tokenizer.json and tokenizer_config.json; return their paths.

    `settings` are constructor keywords (`bos_token`, `add_bos_token`, `chat_template`, ...) plus
    `clean_up_tokenization_spaces`. The config names the generic fast class (transformers'
    LlamaTokenizer would rebuild the pipeline and change leading spaces) and `split_special_tokens`;
    BOS/EOS go into tokenizer.json's post-processor, which is where transformers reads them.
    """
    from tokenizers import processors

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in engine.model_files().items():
        (folder / name).write_bytes(content)
        written.append(folder / name)
    backend = engine.to_tokenizers()
    vocab = {piece: i for i, piece in enumerate(engine.pieces)}
    bos = [settings["bos_token"]] if settings["add_bos_token"] and settings["bos_token"] else []
    eos = [settings["eos_token"]] if settings["add_eos_token"] and settings["eos_token"] else []
    if bos or eos:
        template = " ".join([*bos, "$A", *eos])
        backend.post_processor = processors.TemplateProcessing(
            single=template, pair=f"{template} {template.replace('$A', '$B')}",
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys([*bos, *eos])])
    backend.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{name}_token": settings[f"{name}_token"] for name in TOKEN_NAMES},
        **{key: settings[key] for key in ("add_bos_token", "add_eos_token", "padding_side",
                                          "clean_up_tokenization_spaces")},
        "split_special_tokens": True,
    }
    config |= {key: settings[key] for key in ("model_max_length", "chat_template") if settings[key] is not None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    written += [folder / "tokenizer.json", folder / "tokenizer_config.json"]
    return tuple(str(p) for p in written)
