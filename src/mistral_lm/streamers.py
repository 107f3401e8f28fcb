"""Text streamers with the Transformers protocol: `put(prompt_ids)`, `put(token)` per step, `end()`.

Both are built on `StreamingDetokenizer`, so text appears as soon as a character is complete
(not at word boundaries as in Transformers) and the streamed text always equals `decode` of the
same ids: with `skip_prompt=True`, of the generated ids only.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

from .errors import GenerationError
from .tokenizer import MistralTokenizer, StreamingDetokenizer

_DECODE_OPTIONS = frozenset({"skip_special_tokens", "clean_up_tokenization_spaces"})


class TextStreamer:
    """Prints generated text to stdout as it is produced (flushing each piece), then a newline.

    >>> model.generate(**tokenizer(["Hello"], return_tensors="pt"), streamer=TextStreamer(tokenizer))
    """

    def __init__(self, tokenizer: MistralTokenizer, skip_prompt: bool = False, **decode_kwargs: Any) -> None:
        unknown = set(decode_kwargs) - _DECODE_OPTIONS
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments {sorted(unknown)}; "
                            f"decode options are {sorted(_DECODE_OPTIONS)}")
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self._detokenizer = StreamingDetokenizer(tokenizer, **decode_kwargs)
        self._next_is_prompt = True

    def put(self, value: Any) -> None:
        """Receive the prompt ids (first call), then the ids of each step; batch size must be 1."""
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, list) and value and isinstance(value[0], list):
            if len(value) > 1:
                raise GenerationError(f"{type(self).__name__} streams one sequence, got a batch of {len(value)}; "
                                      "generate with batch size 1 or stream without a streamer")
            value = value[0]
        is_prompt, self._next_is_prompt = self._next_is_prompt, False
        if not is_prompt and isinstance(value, list) and len(value) > 1:  # a step puts one token per sequence
            raise GenerationError(f"{type(self).__name__} streams one sequence, got a step with {len(value)} tokens "
                                  "(batch size > 1); generate with batch size 1 or stream without a streamer")
        if is_prompt and self.skip_prompt:
            return
        text = self._detokenizer.add(value)
        if text:
            self.on_finalized_text(text)

    def end(self) -> None:
        """Flush what is left and get ready for the next generation."""
        self.on_finalized_text(self._detokenizer.finish(), stream_end=True)
        self._next_is_prompt = True

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Where finished text goes; subclasses override this (Transformers' hook name)."""
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """Generated text as an iterator, for a consumer in another thread than `generate`.

    `timeout` (seconds) bounds each wait; `queue.Empty` is raised when it runs out.

    >>> streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    >>> Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer)).start()
    >>> for text in streamer: print(text, end="")
    """

    _STOP = object()

    def __init__(self, tokenizer: MistralTokenizer, skip_prompt: bool = False, timeout: float | None = None,
                 **decode_kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.timeout = timeout
        self.text_queue: queue.Queue[Any] = queue.Queue()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self._STOP, timeout=self.timeout)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self._STOP:
            raise StopIteration
        return value
