"""OpenAI's Responses API (`POST /v1/responses`): its request items, and the response and stream events built
from one chat choice's parsed output.

A Responses request is served as the chat completion it describes: `ResponsesRequest.to_chat()` turns its input
items into chat messages (reasoning items passed back become the next assistant turn's reasoning, so thinking
interleaves across tool turns as the chat template renders it; function_call items become that turn's tool
calls and function_call_output items tool messages), its function tools into chat tools, `text.format` into
response_format, `reasoning.effort` into reasoning_effort (thinking off for "none") and max_output_tokens into
max_tokens; the chat request's validation and sampling defaults then apply unchanged. `ResponseBuilder` turns
the parsed deltas of the one choice into output items (`reasoning`, `message`, `function_call`) and, while
streaming, into the typed events in OpenAI's order, each with its sequence_number; the non-streaming body is
the same builder's final response, so a stream accumulates to exactly that body.

Stateless: nothing is stored (`store` is accepted and answered false), and `previous_response_id` is a 400 that
says to send the conversation in `input`: stored responses would need a bounded store keyed by API key, and
agents that keep reasoning across turns pass the reasoning items back anyway.
"""
from __future__ import annotations

import secrets
import string
from typing import Annotated, Any, Literal

import orjson
from pydantic import BeforeValidator, Field, field_validator, model_validator

from exaserve.server.parsers import ParsedDelta
from exaserve.server.protocol import _Model, now

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    """OpenAI-style ids: "resp_...", "msg_...", "rs_...", "fc_...", "call_..."."""
    return f"{prefix}_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


# ---------------------------------------------------------------- request items

def _text_of_parts(value, kinds: tuple[str, ...], what: str):
    """A string, or the text of a list of parts of the given types joined with newlines."""
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        if not isinstance(part, dict) or part.get("type") not in kinds or not isinstance(part.get("text"), str):
            raise ValueError(f"{what} parts must be {{\"type\": {' or '.join(map(repr, kinds))}, \"text\": \"...\"}}; "
                             f"only text is supported")
        texts.append(part["text"])
    return "\n".join(texts)


# A string, or text parts (input_text / output_text / text) joined with newlines.
Text = Annotated[str, BeforeValidator(lambda value: _text_of_parts(value, ("input_text", "output_text", "text"),
                                                                   "content"))]


class MessageItem(_Model):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Text


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output"]
    call_id: str
    output: Text


class _ReasoningText(_Model):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Model):
    type: Literal["reasoning"]
    summary: list[_ReasoningText] = []
    content: list[_ReasoningText] | None = None

    def text(self) -> str:
        """The reasoning the model wrote (its content), else its summary."""
        return "\n".join(part.text for part in (self.content or self.summary))


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem,
                      Field(discriminator="type")]


class FunctionTool(_Model):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def to_chat(self) -> dict:
        function = {"name": self.name}
        for key in ("description", "parameters", "strict"):
            if getattr(self, key) is not None:
                function[key] = getattr(self, key)
        return {"type": "function", "function": function}


class FunctionChoice(_Model):
    type: Literal["function"]
    name: str


class TextFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, validation_alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError('type "json_schema" needs a schema: {"type": "json_schema", "name": ..., "schema": {...}}')
        return self

    def to_response_format(self) -> dict:
        if self.type != "json_schema":
            return {"type": self.type}
        spec = {"name": self.name or "response", "schema": self.schema_}
        if self.strict is not None:
            spec["strict"] = self.strict
        return {"type": "json_schema", "json_schema": spec}

    def echo(self) -> dict:
        out = {"type": self.type}
        if self.type == "json_schema":
            out.update(name=self.name or "response", schema=self.schema_, strict=self.strict,
                       description=self.description)
        return out


class TextConfig(_Model):
    format: TextFormat | None = None


class ReasoningConfig(_Model):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: str | None = None   # accepted; the model's whole reasoning is returned as the item's content


class ResponsesRequest(_Model):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # vLLM-style extras, as on the chat endpoint
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _messages_may_omit_type(cls, value):
        # EasyInputMessage: {"role": ..., "content": ...} with no type is a message
        if isinstance(value, list):
            return [{**item, "type": "message"} if isinstance(item, dict) and "type" not in item and "role" in item
                    else item for item in value]
        return value

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value):
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, tools):
        for i, tool in enumerate(tools if isinstance(tools, list) else ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tools[{i}]: only function tools are supported, not {kind!r}")
        return tools

    @field_validator("previous_response_id")
    @classmethod
    def _stateless(cls, value):
        if value is not None:
            raise ValueError("this server does not store responses: send the whole conversation in `input` "
                             "(pass earlier output items back as input items)")
        return value

    @field_validator("conversation", "background")
    @classmethod
    def _no_server_state(cls, value):
        if value:
            raise ValueError("not supported: this server keeps no conversations and runs no background responses; "
                             "send the whole conversation in `input`")
        return value

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, value):
        if value == "auto":
            raise ValueError('"auto" is not supported: an input longer than the context is refused, not cut')
        return value

    def messages(self) -> list[dict]:
        """The input as chat messages. A reasoning item goes to the next assistant turn (a message or function
        calls: one turn until another role speaks); function calls join the assistant turn before them."""
        messages: list[dict] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return messages + [{"role": "user", "content": self.input}]
        reasoning: list[str] = []
        turn: dict | None = None   # the open assistant turn

        def assistant() -> dict:
            nonlocal turn
            if turn is None:
                turn = {"role": "assistant", "content": None}
                messages.append(turn)
            if reasoning:
                turn["reasoning_content"] = "\n".join(filter(None, [turn.get("reasoning_content"), *reasoning]))
                reasoning.clear()
            return turn

        for item in self.input:
            if isinstance(item, ReasoningItem):
                if turn is not None and (turn.get("content") is not None or turn.get("tool_calls")):
                    turn = None     # reasoning after the turn's output starts the next turn
                reasoning.append(item.text())
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                assistant().setdefault("tool_calls", []).append(call)
            elif isinstance(item, MessageItem) and item.role == "assistant":
                message = assistant()
                if message.get("content") is not None:   # a turn has one text: a second one starts the next turn
                    turn = None
                    message = assistant()
                message["content"] = item.content
            else:
                if reasoning:
                    assistant()
                turn = None
                if isinstance(item, FunctionCallOutputItem):
                    messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
                else:
                    messages.append({"role": item.role, "content": item.content})
        if reasoning:
            assistant()
        return messages

    def to_chat(self) -> dict:
        """The chat completion request this one asks for (validated by the chat endpoint's model)."""
        body: dict[str, Any] = {"messages": self.messages()}
        for key in ("temperature", "top_p", "parallel_tool_calls", "seed", "top_k", "min_p", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "ignore_eos", "chat_template_kwargs", "user"):
            if getattr(self, key) is not None:
                body[key] = getattr(self, key)
        if self.max_output_tokens is not None:
            body["max_tokens"] = self.max_output_tokens
        if self.tools:
            body["tools"] = [tool.to_chat() for tool in self.tools]
        if isinstance(self.tool_choice, FunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        if self.text is not None and self.text.format is not None:
            body["response_format"] = self.text.format.to_response_format()
        if self.reasoning is not None and self.reasoning.effort is not None:
            body["reasoning_effort"] = self.reasoning.effort
        return body

    def echo(self) -> dict:
        """The request's settings as a response object repeats them."""
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, FunctionChoice) else (
            self.tool_choice or "auto")
        text_format = self.text.format.echo() if self.text is not None and self.text.format is not None else {
            "type": "text"}
        return {
            "instructions": self.instructions, "tools": [t.model_dump() for t in self.tools or ()],
            "tool_choice": choice, "parallel_tool_calls": self.parallel_tool_calls is not False,
            "temperature": self.temperature, "top_p": self.top_p, "max_output_tokens": self.max_output_tokens,
            "text": {"format": text_format},
            "reasoning": {"effort": self.reasoning.effort if self.reasoning else None, "summary": None},
            "store": False, "metadata": self.metadata or {}, "previous_response_id": None,
            "truncation": "disabled", "user": self.user,
        }


# ---------------------------------------------------------------- output items and events

def sse(event: dict) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


class ResponseBuilder:
    """Output items of one response from its parsed deltas, and the stream events that build them.

    Each call returns the events it produced (dicts, sequence numbers included); `response()` is the response
    object at any point (its status and usage once `finish` ran)."""

    def __init__(self, response_id: str, model: str, echo: dict):
        self.id, self.model, self.echo = response_id, model, echo
        self.created_at = now()
        self.output: list[dict] = []
        self._open: dict | None = None   # the item deltas currently extend
        self._calls: dict[int, dict] = {}  # the parser's call index -> its function_call item
        self._seq = 0
        self.status, self.incomplete, self.usage, self.error = "in_progress", None, None, None

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def response(self) -> dict:
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": self.status,
                "model": self.model, "output": self.output, "error": self.error,
                "incomplete_details": self.incomplete, "usage": self.usage, **self.echo}

    def start(self) -> list[dict]:
        return [self._event("response.created", response=self.response()),
                self._event("response.in_progress", response=self.response())]

    def _add(self, item: dict) -> list[dict]:
        events = self._close()
        self.output.append(item)
        self._open = item
        return events + [self._event("response.output_item.added", output_index=len(self.output) - 1,
                                     item=dict(item, **_empty(item)))]

    def _where(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.output.index(item)}

    def _close(self, status: str = "completed") -> list[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = status
        where = self._where(item)
        if item["type"] == "reasoning":
            part = item["content"][0]
            events = [self._event("response.reasoning_text.done", **where, content_index=0, text=part["text"]),
                      self._event("response.content_part.done", **where, content_index=0, part=part)]
        elif item["type"] == "message":
            part = item["content"][0]
            events = [self._event("response.output_text.done", **where, content_index=0, text=part["text"],
                                  logprobs=[]),
                      self._event("response.content_part.done", **where, content_index=0, part=part)]
        else:
            events = [self._event("response.function_call_arguments.done", **where, name=item["name"],
                                  arguments=item["arguments"])]
        return events + [self._event("response.output_item.done", output_index=where["output_index"], item=item)]

    def _text(self, reasoning: bool, text: str) -> list[dict]:
        """Reasoning or message text: into the open item of its type, or a new one (with its content part)."""
        events = []
        kind = "reasoning" if reasoning else "message"
        if self._open is None or self._open["type"] != kind:
            if reasoning:
                item = {"id": new_id("rs"), "type": "reasoning", "summary": [],
                        "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"}
            else:
                item = {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                        "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
            events += self._add(item)
            events.append(self._event("response.content_part.added", **self._where(item), content_index=0,
                                      part=dict(item["content"][0])))
        self._open["content"][0]["text"] += text
        extra = {} if reasoning else {"logprobs": []}
        name = "response.reasoning_text.delta" if reasoning else "response.output_text.delta"
        events.append(self._event(name, **self._where(self._open), content_index=0, delta=text, **extra))
        return events

    def feed(self, delta: ParsedDelta) -> list[dict]:
        events = []
        for kind, value in delta.ordered():   # in the order the model wrote them: text after a call follows it
            if kind in ("reasoning", "content"):
                events += self._text(kind == "reasoning", value)
            else:
                if value.id is not None:   # a call's first piece: its id and name
                    item = {"id": new_id("fc"), "type": "function_call", "call_id": value.id, "name": value.name,
                            "arguments": "", "status": "in_progress"}
                    events += self._add(item)
                    self._calls[value.index] = item
                item = self._calls[value.index]
                if value.arguments:
                    item["arguments"] += value.arguments
                    events.append(self._event("response.function_call_arguments.delta", **self._where(item),
                                              delta=value.arguments))
        return events

    def finish(self, finish_reason: str, usage: dict) -> list[dict]:
        """Close the last item and the response: "length" leaves it incomplete (max_output_tokens)."""
        cut = finish_reason == "length"
        events = self._close("incomplete" if cut else "completed")
        self.status = "incomplete" if cut else "completed"
        self.incomplete = {"reason": "max_output_tokens"} if cut else None
        self.usage = usage
        kind = "response.incomplete" if cut else "response.completed"
        return events + [self._event(kind, response=self.response())]

    def fail(self, message: str, code: str) -> list[dict]:
        """The stream's last events when the response fails after it started: an `error` event, the open item
        closed as incomplete, and `response.failed` with the error in the response."""
        events = [self._event("error", code=code, message=message, param=None)] + self._close("incomplete")
        self.status = "failed"
        self.error = {"code": code, "message": message}
        return events + [self._event("response.failed", response=self.response())]


def _empty(item: dict) -> dict:
    """What an item holds when it is added: no text or arguments yet."""
    return {"arguments": ""} if item["type"] == "function_call" else {"content": []}


def usage(input_tokens: int, output_tokens: int, cached_tokens: int, reasoning_tokens: int) -> dict:
    return {"input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens}
