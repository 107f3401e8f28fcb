"""Chat templates: sandboxed Jinja rendering, and the built-in Mistral instruct v0.1/v0.2 format.

Pure: `render_chat` turns messages into (text, is_special) pieces and knows nothing of ids; the
tokenizer encodes the pieces (`MistralTokenizer.apply_chat_template`).

Two guarantees, both tested against mistral-common:

* Templates run in Jinja's `ImmutableSandboxedEnvironment`: a template from a downloaded folder
  cannot reach Python internals (`__class__`, `__subclasses__`) or mutate its inputs.
* Message text cannot inject control tokens. The special-token strings inside messages are
  escaped before rendering, the output is split at the special tokens the *template* wrote, and
  the text between them (message text included, unescaped again) is encoded as plain text. This
  is what mistral-common does: it encodes "[INST] {content} [/INST]" with sentencepiece, so a
  "</s>" typed by a user stays the characters "</s>".
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from ..errors import TokenizerError

# Mistral-7B-Instruct v0.1/v0.2 (mistral-common's v1 instruct tokenizer): "<s>[INST] user [/INST]
# answer</s>[INST] ...". An optional first system message is prepended to the first user message,
# roles must alternate, and the answer is preceded by one space: mistral-common encodes the answer
# on its own, where sentencepiece's dummy prefix plays that space.
MISTRAL_INSTRUCT_TEMPLATE = """\
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message['tool_calls'] is defined and message['tool_calls'] or message['role'] == 'tool' %}
        {{- raise_exception('the Mistral instruct v1 format has no tool tokens: tool calls and results need a v2+ '
                            ~ 'tokenizer; got one at position ' ~ loop.index0) }}
    {%- elif message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Only user and assistant roles are supported, after an optional first system message; '
                            ~ 'got role ' ~ message['role'] ~ ' at position ' ~ loop.index0) }}
    {%- elif (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/... after an optional '
                            ~ 'first system message; got ' ~ message['role'] ~ ' at position ' ~ loop.index0) }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- else %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"""

_ESCAPE = "\ue000"  # private-use character that starts an escaped special-token string
_INDEX_BASE = 0xF0000  # the escaped string's index, as a supplementary private-use character


def _raise_exception(message: str) -> None:
    """Templates call this to reject a conversation (the Transformers template convention)."""
    raise TokenizerError(f"chat template: {message}")


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """The Transformers template environment: trimmed blocks, `raise_exception`, `strftime_now`, `tojson`."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    return _environment().from_string(source)


def _escape(value: Any, pattern: re.Pattern[str], index: dict[str, int]) -> Any:
    """A copy of a message with special-token strings (and the escape character) escaped."""
    if isinstance(value, str):
        return pattern.sub(lambda m: _ESCAPE + chr(_INDEX_BASE + index[m[0]]), value)
    if isinstance(value, Mapping):
        return {k: _escape(v, pattern, index) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escape(v, pattern, index) for v in value]
    return value


def render_chat(messages: Sequence[Mapping[str, Any]], template: str | None, *, special_tokens: Sequence[str],
                variables: Mapping[str, Any], add_generation_prompt: bool = False,
                **template_kwargs: Any) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_special_token) pieces, message text always non-special.

    `template` is Jinja source (None: the built-in Mistral template), `special_tokens` the strings
    that are control tokens, `variables` what the template sees besides the messages (e.g.
    `bos_token`); `template_kwargs` are passed to the template too.

    >>> render_chat([{"role": "user", "content": "Hi </s>"}], None, special_tokens=["<s>", "</s>"],
    ...             variables={"bos_token": "<s>", "eos_token": "</s>"})
    [('<s>', True), ('[INST] Hi </s> [/INST]', False)]
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in messages):
        raise TokenizerError("messages must be a list of dicts with a 'role' and a 'content', e.g. "
                             "[{'role': 'user', 'content': 'Hello'}]")
    specials = [_ESCAPE, *sorted(special_tokens, key=len, reverse=True)]
    index = {s: k for k, s in enumerate(specials)}
    pattern = re.compile("|".join(map(re.escape, specials)))
    try:
        rendered = _compile(template or MISTRAL_INSTRUCT_TEMPLATE).render(
            messages=[_escape(m, pattern, index) for m in messages], add_generation_prompt=add_generation_prompt,
            **variables, **template_kwargs)
    except SecurityError:  # a template reaching outside the sandbox says so itself
        raise
    except (TypeError, TemplateError) as err:  # e.g. a None content the template concatenates
        raise TokenizerError(f"chat template: rendering these messages failed: {type(err).__name__}: {err}") from err
    unescape = re.compile(_ESCAPE + "([\U000f0000-\U000ffffd])")
    pieces, start = [], 0
    for match in pattern.finditer(rendered):  # only the template's own special tokens are left to find
        if match[0] != _ESCAPE:
            pieces += [(rendered[start:match.start()], False), (match[0], True)]
            start = match.end()
    pieces.append((rendered[start:], False))
    return [(unescape.sub(lambda m: specials[ord(m[1]) - _INDEX_BASE], text) if not special else text, special)
            for text, special in pieces if text]
