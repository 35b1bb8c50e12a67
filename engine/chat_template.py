"""Render a checkpoint's Jinja2 chat template with Hugging Face `apply_chat_template` semantics, and encode the
result so that no text from the client becomes a control token (used by the HTTP server and by `LLM.chat`; jinja2
and tokenizers, no tensors)."""

import datetime
import functools
import json
import re

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Backend

# Variables render_chat sets itself: template kwargs cannot set them.
RESERVED_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})


class ChatTemplateError(ValueError):
    """The template refused the conversation (raise_exception) or failed to render; the message is the template's."""


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
    # Jinja's own tojson HTML-escapes and sorts keys; chat templates expect plain json.dumps output.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat(
    template: str,
    messages: list[dict],
    /,
    *,
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **template_kwargs,
) -> str:
    """Render `messages` (OpenAI-style dicts) into the prompt text; template_kwargs (chat_template_kwargs such as
    enable_thinking) are visible to the template as variables, under any name but RESERVED_VARIABLES (template and
    messages are positional-only, so a variable may be called `template`). A `developer` message (OpenAI's current
    name for system instructions) is rendered as a `system` one: EXAONE templates know no developer role."""
    if "messages" in template_kwargs:
        raise ValueError("'messages' is a reserved chat template variable")
    messages = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
    variables = {**template_kwargs, "messages": messages, "tools": tools,
                 "add_generation_prompt": add_generation_prompt, "bos_token": bos_token, "eos_token": eos_token}
    try:
        return _compile(template).render(variables)
    # A template is user-supplied code: any failure inside it is a bad request, never a server crash.
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:
        raise ChatTemplateError(str(exc) or type(exc).__name__) from exc


def prompt_ends_in_reasoning(prompt: str, start: str = "<think>", end: str = "</think>") -> bool:
    """True when the prompt leaves a reasoning block open, so the model's output begins inside reasoning."""
    return prompt.rfind(start) > prompt.rfind(end)


def encode_chat(tokenizer, template: str, messages: list[dict], *, tools: list[dict] | None = None,
                add_generation_prompt: bool = True, template_kwargs: dict | None = None) -> tuple[str, list[int]]:
    """Render the conversation (bos/eos from the tokenizer) and encode it: (prompt text, token ids).

    Every string from the client (contents, names, tool calls and results, tools, template kwargs) is encoded as
    plain text: a special-token string typed in a message (`<|endofturn|><|system|>`) never becomes the control
    token, so a user cannot close their turn and open another; the template's own markers stay special. Only a
    conversation that holds such a string is treated differently: otherwise the ids are exactly
    `tokenizer.encode(prompt, add_special_tokens=False)`.
    """
    template_kwargs = dict(template_kwargs or {})
    reserved = sorted(RESERVED_VARIABLES & template_kwargs.keys())
    if reserved:
        raise ValueError(f"{reserved[0]!r} is a reserved chat template variable")
    guard = _guard(tokenizer)

    def render(messages, tools, template_kwargs):
        return render_chat(template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                           bos_token=guard.bos, eos_token=guard.eos, **template_kwargs)

    client = (messages, tools, template_kwargs)
    masked, forged = guard.mask(client)
    if not forged:
        prompt = render(*client)
        return prompt, tokenizer.encode(prompt)
    rendered = render(*masked)
    return rendered.translate(guard.restore), guard.encode(rendered)


# Each special-token string found in client text stands in for itself as one code point of the supplementary
# private-use planes while the template renders: text never holds these, and no template string method splits one.
_PLACEHOLDER_BASE = 0xF0000


class _SpecialGuard:
    """One tokenizer's special-token strings, and how to encode a prompt in which the client's are placeholders."""

    def __init__(self, tokenizer):
        # The wrapper offers no offsets: this class uses the `tokenizers` object itself.
        self.backend: _Backend = tokenizer.backend
        self.special_ids = frozenset(tokenizer.special_ids)
        self.bos = tokenizer.id_to_token(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else ""
        self.eos = tokenizer.id_to_token(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else ""
        strings = sorted({tokenizer.id_to_token(i) for i in self.special_ids} - {None}, key=len, reverse=True)
        # longest first, so that no special string hides inside another
        self._pattern = re.compile("|".join(map(re.escape, strings))) if strings else None
        self._placeholder = {s: chr(_PLACEHOLDER_BASE + k) for k, s in enumerate(strings)}
        self.restore = {ord(c): s for s, c in self._placeholder.items()}
        last = _PLACEHOLDER_BASE + max(len(strings) - 1, 0)
        self._any_placeholder = re.compile(f"[{chr(_PLACEHOLDER_BASE)}-{chr(last)}]")

    @functools.cached_property
    def plain(self) -> _Backend:
        """The tokenizer with special tokens encoded as text (the wrapper's list of special ids, which follows
        tokenizer_config.json, decides which; non-special added tokens such as <think> still match)."""
        spec = json.loads(self.backend.to_str())
        for token in spec["added_tokens"]:
            token["special"] = token["id"] in self.special_ids
        plain = _Backend.from_str(json.dumps(spec))
        plain.encode_special_tokens = True
        return plain

    def mask(self, value) -> tuple[object, int]:
        """value (nested lists, dicts, strings) with every special string in its strings, keys included, replaced
        by its placeholder; and how many there were."""
        count = 0

        def sub(text: str) -> str:
            nonlocal count
            text, n = self._pattern.subn(lambda m: self._placeholder[m.group()], text)
            count += n
            return text

        if self._pattern is None:
            return value, 0
        return _map_strings(value, sub), count

    def encode(self, rendered: str) -> list[int]:
        """Ids of a prompt rendered from masked client strings. Every special token in it is the template's own
        (the client's are placeholders); between two of them, a stretch that holds a placeholder is encoded again
        with its special strings restored and special tokens off. The rest keeps the ids of the whole encoding."""
        encoding = self.backend.encode_batch([rendered], add_special_tokens=False)[0]
        ids, offsets = encoding.ids, encoding.offsets
        markers = [k for k, t in enumerate(ids) if t in self.special_ids]
        pieces, plain_texts = [], []  # a piece: a list of ids, or the index of a text to encode as plain text
        token, char = 0, 0
        for k in [*markers, len(ids)]:
            end = offsets[k][0] if k < len(ids) else len(rendered)
            stretch = rendered[char:end]
            if self._any_placeholder.search(stretch):
                pieces.append(len(plain_texts))
                plain_texts.append(stretch.translate(self.restore))
            else:
                pieces.append(ids[token:k])
            if k < len(ids):
                pieces.append([ids[k]])
                char = offsets[k][1]
            token = k + 1
        plain = [e.ids for e in self.plain.encode_batch(plain_texts, add_special_tokens=False)]
        return [t for piece in pieces for t in (plain[piece] if isinstance(piece, int) else piece)]


@functools.lru_cache(maxsize=8)
def _guard(tokenizer) -> _SpecialGuard:
    return _SpecialGuard(tokenizer)


def _map_strings(value, fn):
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value
