"""Typed errors.

Every error raised on bad user input derives from `MistralLMError`, so callers can catch the
project's errors in one place, and from the built-in class a Transformers user would expect
(`ValueError` for bad values), so existing `except ValueError` code keeps working.
"""

from __future__ import annotations


class MistralLMError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MistralLMError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class CheckpointError(MistralLMError, ValueError):
    """A checkpoint is missing, truncated, malformed, or does not match the model."""


class TokenizerError(MistralLMError, ValueError):
    """A tokenizer file or a tokenizer call is invalid."""


class GenerationError(MistralLMError, ValueError):
    """A generation argument is invalid, or generation cannot proceed."""


class InputError(MistralLMError, ValueError):
    """A forward-pass input has the wrong shape, dtype or value range."""


class ToolCallError(TokenizerError):
    """A model's generated tool call is not the JSON its chat format defines (malformed, truncated,
    a missing name): the caller decides whether to return the text or retry."""


class DistributedError(MistralLMError, RuntimeError):
    """A collective failed: a peer rank crashed, hung past the timeout, or disagrees with this one."""
