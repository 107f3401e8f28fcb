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

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
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
# `{% generation %}...{% endgeneration %}` (Transformers' assistant-mask blocks) renders its body
# between these two private-use characters; message text holding them is escaped like a special token.
_GEN_START, _GEN_END = "\ue001", "\ue002"
# Transformers' way to leave the final message open: tag its text, render, cut at the tag.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _Generation(Extension):
    """The `{% generation %}` block: marks the assistant text that `return_assistant_tokens_mask` masks."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller: Any) -> str:
        return _GEN_START + caller() + _GEN_END


def _raise_exception(message: str) -> None:
    """Templates call this to reject a conversation (the Transformers template convention)."""
    raise TokenizerError(f"chat template: {message}")


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """The Transformers template environment: trimmed blocks, `raise_exception`, `strftime_now`, `tojson`."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _Generation])
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
                continue_final_message: bool | str = False, **template_kwargs: Any) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_special_token) pieces, message text always non-special.

    `template` is Jinja source (None: the built-in Mistral template), `special_tokens` the strings
    that are control tokens, `variables` what the template sees besides the messages (e.g.
    `bos_token`); `template_kwargs` are passed to the template too. `continue_final_message`
    leaves the final message open, as Transformers does (see `render_chat_spans`).

    >>> render_chat([{"role": "user", "content": "Hi </s>"}], None, special_tokens=["<s>", "</s>"],
    ...             variables={"bos_token": "<s>", "eos_token": "</s>"})
    [('<s>', True), ('[INST] Hi </s> [/INST]', False)]
    """
    return render_chat_spans(messages, template, special_tokens=special_tokens, variables=variables,
                             add_generation_prompt=add_generation_prompt,
                             continue_final_message=continue_final_message, **template_kwargs)[0]


def render_chat_spans(messages: Sequence[Mapping[str, Any]], template: str | None, *,
                      special_tokens: Sequence[str], variables: Mapping[str, Any], add_generation_prompt: bool = False,
                      continue_final_message: bool | str = False,
                      **template_kwargs: Any) -> tuple[list[tuple[str, bool]], list[tuple[int, int]]]:
    """`render_chat`'s pieces, and the (start, end) character spans, in the pieces joined, of the
    template's `{% generation %}` blocks (Transformers' `generation_indices`).

    `continue_final_message` (True, or the name of the field to continue, "content" for True)
    renders the final message open, Transformers' way: its text is tagged, the conversation
    rendered, and the output cut where the tag is, so whatever the template writes after the
    message (</s>, an end-of-turn token) is left out.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in messages):
        raise TokenizerError("messages must be a list of dicts with a 'role' and a 'content', e.g. "
                             "[{'role': 'user', 'content': 'Hello'}]")
    source = template or MISTRAL_INSTRUCT_TEMPLATE
    specials = [_ESCAPE, _GEN_START, _GEN_END, *sorted(special_tokens, key=len, reverse=True)]
    index = {s: k for k, s in enumerate(specials)}
    pattern = re.compile("|".join(map(re.escape, specials)))
    escaped = [_escape(m, pattern, index) for m in messages]
    final = _tag_final_message(escaped, source, continue_final_message) if continue_final_message else None
    try:
        rendered = _compile(source).render(messages=escaped, add_generation_prompt=add_generation_prompt,
                                           **variables, **template_kwargs)
    except SecurityError:  # a template reaching outside the sandbox says so itself
        raise
    except (TypeError, TemplateError) as err:  # e.g. a None content the template concatenates
        raise TokenizerError(f"chat template: rendering these messages failed: {type(err).__name__}: {err}") from err
    if final is not None:
        rendered = _cut_at_tag(rendered, final)
    return _split(rendered, specials, special_tokens)


def _tag_final_message(messages: list[dict[str, Any]], source: str, field: bool | str) -> str:
    """Append the continue tag to the final message's text (in place); return that text."""
    if not messages:
        raise TokenizerError("continue_final_message is set but the conversation is empty")
    field = field if isinstance(field, str) else "content"
    value = messages[-1].get(field)
    if value is None:
        raise TokenizerError(f"continue_final_message is set but the final message has no {field!r} to continue")
    if field not in source:
        raise TokenizerError(f"continue_final_message={field!r}: the chat template never reads a {field!r} field")
    if isinstance(value, list):  # text chunks: the last one with text is continued
        block = next((b for b in reversed(value) if isinstance(b, dict) and "text" in b), None)
        if block is None:
            raise TokenizerError("continue_final_message is set but the final message has no text to continue")
        final, block["text"] = block["text"], block["text"] + _CONTINUE_TAG
        return final
    if not isinstance(value, str):
        raise TokenizerError(f"continue_final_message: the final message's {field!r} must be a string or a list of "
                             f"text chunks, got {type(value).__name__}")
    messages[-1][field] = value + _CONTINUE_TAG
    return value


def _cut_at_tag(rendered: str, final: str) -> str:
    """The rendering up to the continue tag (Transformers' rule: the message's own trailing
    whitespace stays when the template kept the tag's space, else it is trimmed)."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise TokenizerError("continue_final_message is set but the final message does not appear in the rendered "
                             "chat: the template drops or rewrites part of it, so it cannot be left open; final "
                             f"message: {final.strip()[:200]!r}")
    at = rendered.rindex(tag)
    return rendered[:at] if rendered.startswith(_CONTINUE_TAG, at) else rendered[:at].rstrip()


def _split(rendered: str, specials: list[str],
           special_tokens: Sequence[str]) -> tuple[list[tuple[str, bool]], list[tuple[int, int]]]:
    """Pieces (the template's special tokens apart, escaped message text restored) and generation spans."""
    controls = frozenset(special_tokens)
    scan = re.compile(_ESCAPE + "[\U000f0000-\U000ffffd]|" + "|".join(map(re.escape, specials[1:])))
    pieces: list[tuple[str, bool]] = []
    spans: list[tuple[int, int]] = []
    text: list[str] = []
    length, start, opened = 0, 0, None  # characters emitted; where `text` starts; open generation block
    for match in scan.finditer(rendered):
        text.append(rendered[start:match.start()])
        length += match.start() - start
        start = match.end()
        token = match[0]
        if token[0] == _ESCAPE:  # escaped message text: the original string, as text
            original = specials[ord(token[1]) - _INDEX_BASE]
            text.append(original)
            length += len(original)
        elif token == _GEN_START:
            opened = length if opened is None else opened
        elif token == _GEN_END:
            if opened is not None and length > opened:
                spans.append((opened, length))
            opened = None
        elif token in controls:
            pieces.append(("".join(text), False))
            pieces.append((token, True))
            text = []
            length += len(token)
    text.append(rendered[start:])
    length += len(rendered) - start
    if opened is not None and length > opened:  # a block left open by continue_final_message
        spans.append((opened, length))
    pieces.append(("".join(text), False))
    return [(t, special) for t, special in pieces if t], spans
