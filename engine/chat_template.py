"""Render a checkpoint's Jinja2 chat template with Hugging Face `apply_chat_template` semantics (used by the HTTP
server and by `LLM.chat`; only jinja2, no tensors)."""

import datetime
import functools
import json

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


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
    *,
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **kwargs,
) -> str:
    """Render `messages` (OpenAI-style dicts) into the prompt text; extra kwargs (chat_template_kwargs such as
    enable_thinking) are visible to the template as variables. A `developer` message (OpenAI's current name for
    system instructions) is rendered as a `system` one: EXAONE templates know no developer role."""
    messages = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
    try:
        return _compile(template).render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **kwargs,
        )
    # A template is user-supplied code: any failure inside it is a bad request, never a server crash.
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:
        raise ChatTemplateError(str(exc) or type(exc).__name__) from exc


def prompt_ends_in_reasoning(prompt: str, start: str = "<think>", end: str = "</think>") -> bool:
    """True when the prompt leaves a reasoning block open, so the model's output begins inside reasoning."""
    return prompt.rfind(start) > prompt.rfind(end)
