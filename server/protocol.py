"""OpenAI API wire format: request models (pydantic v2), the error envelope, and response builders.

Responses are plain dicts (serialised with orjson): they are built once per chunk on the hot path, where
model validation would only cost time.
"""

import json
import re
import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from exaserve.engine.chat_template import RESERVED_VARIABLES
from exaserve.engine.structured import MAX_JSON_WHITESPACE, StructuredOutput


class _Model(BaseModel):
    # extra: clients send fields of newer API versions and of other servers. strict: no type coercion, as in the
    # OpenAI API: true is not the integer 1 (max_tokens, n, token ids), 1.5 or "2" not an integer, 1 not a boolean;
    # an integer still passes where a number is expected (temperature 1).
    model_config = ConfigDict(extra="ignore", strict=True)


# Deeper JSON is refused before validation: pydantic validates nested values recursively (a tool schema 1000
# levels deep raised RecursionError), and no real request nests more than a few levels.
MAX_JSON_DEPTH = 64


def json_depth_exceeds(value, limit: int) -> bool:
    """Whether parsed JSON nests lists and objects more than `limit` deep (a bare value is depth 0); iterative,
    so any depth is safe to check."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _no_reserved_variables(kwargs: dict[str, Any]) -> dict[str, Any]:
    reserved = sorted(RESERVED_VARIABLES & kwargs.keys())
    if reserved:
        raise ValueError(f"{reserved[0]!r} is set by the server from the request itself; it cannot be a template "
                         f"kwarg")
    return kwargs


TemplateKwargs = Annotated[dict[str, Any], AfterValidator(_no_reserved_variables)]


# ---------------------------------------------------------------- chat messages and tools

class FunctionCall(_Model):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallParam(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None  # text parts are joined into one string
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    # Our responses carry both names, so a client that sends an answer back may use either.
    reasoning_content: str | None = Field(None, validation_alias=AliasChoices("reasoning_content", "reasoning"))

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value):
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError('content parts must be {"type": "text", "text": "..."}; only text is supported')
            texts.append(part["text"])
        return "\n".join(texts)

    @model_validator(mode="after")
    def _content_required(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def to_template(self) -> dict:
        """The message as chat templates expect it (HF convention: tool-call arguments as a dict)."""
        message = self.model_dump(exclude_none=True, exclude={"tool_calls"})
        message.setdefault("content", None)
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": _arguments_object(call.function.arguments)}}
                for call in self.tool_calls
            ]
        return message


def _arguments_object(arguments: str | dict) -> str | dict:
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments  # the template gets what the client sent
    return parsed if isinstance(parsed, dict) else arguments


class FunctionDef(_Model):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Model):
    include_usage: bool = False


# ---------------------------------------------------------------- structured outputs

class JsonSchemaSpec(_Model):
    name: str | None = None
    description: str | None = None
    # "schema" would shadow a BaseModel attribute: the field has another name and reads the key "schema"
    schema_: dict[str, Any] = Field(validation_alias="schema")
    # Accepted as OpenAI documents it; the output follows the schema either way (additional properties only where
    # the schema allows them).
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object: {"name": ..., "schema": {...}}')
        return self


class StructuredOutputsParam(_Model):
    """vLLM's structured_outputs extra field: exactly one of json (a JSON schema), json_object, regex, choice,
    grammar (EBNF)."""
    json_: str | dict[str, Any] | None = Field(None, validation_alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    @field_validator("json_")
    @classmethod
    def _schema_text_parses(cls, value):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"not a JSON schema: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("a JSON schema is an object")
        return value

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"give exactly one of json, json_object, regex, choice, grammar; got "
                             f"{[k.rstrip('_') for k in given] or 'none'}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice must not be empty")
        return self

    def spec(self) -> StructuredOutput:
        return StructuredOutput(json=self.json_, json_object=bool(self.json_object), regex=self.regex,
                                choice=tuple(self.choice) if self.choice is not None else None, grammar=self.grammar)


def tool_call_tag(tools: list["ToolDef"], named: str | None, parallel: bool) -> str:
    """xgrammar structural tag forcing K-EXAONE tool calls, `<tool_call>{"name": ..., "arguments": {...}}
    </tool_call>`: one call of `named`, or one or more (just one unless parallel) of any tool in `tools`, their
    arguments following each function's parameters schema. A little whitespace may come first: the template's
    turn has `</think>\n\n` before the calls."""
    def tag(function: "FunctionDef") -> dict:
        parameters = function.parameters if function.parameters is not None else {"type": "object"}
        return {"type": "tag", "begin": f'<tool_call>{{"name": {json.dumps(function.name)}, "arguments": ',
                "content": {"type": "json_schema", "json_schema": parameters,
                            "max_whitespace_cnt": MAX_JSON_WHITESPACE},
                "end": "}</tool_call>"}

    if named is not None:
        form = tag(next(t.function for t in tools if t.function.name == named))
    else:
        form = {"type": "tags_with_separator", "tags": [tag(t.function) for t in tools], "separator": "\n",
                "at_least_one": True, "stop_after_first": not parallel}
    lead = {"type": "regex", "pattern": "[ \\n]{0,4}"}
    return json.dumps({"type": "structural_tag", "format": {"type": "sequence", "elements": [lead, form]}})


# ---------------------------------------------------------------- requests

_FROM_GENERATION_CONFIG = ("temperature", "top_p", "top_k", "min_p",
                           "presence_penalty", "frequency_penalty", "repetition_penalty")


class _SamplingRequest(_Model):
    """Fields shared by chat and text completions. None means: generation_config.json, else the engine default."""

    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # 0 or -1: off
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None  # JSON keys are token-id strings
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParam | None = None

    @model_validator(mode="after")
    def _one_output_format(self):
        if self.structured_outputs is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise ValueError("give either response_format or structured_outputs, not both")
        return self

    def structured_output(self) -> StructuredOutput | None:
        """The grammar the output must follow, if any (the constraint starts at the first output token)."""
        if self.structured_outputs is not None:
            return self.structured_outputs.spec()
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutput(json_object=True)
        return StructuredOutput(json=fmt.json_schema.schema_)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _token_id_keys(cls, value):
        # JSON object keys are strings: decimal ones are token ids; others ("1.5", "true") stay and fail as ints.
        if isinstance(value, dict):
            return {int(k) if isinstance(k, str) and re.fullmatch(r"[0-9]+", k) else k: v for k, v in value.items()}
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_kwargs(self, defaults: Mapping[str, Any] | None, max_tokens: int | None,
                         logprobs: int | None) -> dict:
        kwargs = {}
        for key in _FROM_GENERATION_CONFIG:
            value = getattr(self, key)
            if value is None and defaults:
                value = defaults.get(key)
            if value is not None:
                kwargs[key] = value
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        kwargs.update(
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, logit_bias=self.logit_bias,
            ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, skip_special_tokens=self.skip_special_tokens,
            logprobs=logprobs,
        )
        structured = self.structured_output()
        if structured is not None:
            kwargs["structured_outputs"] = structured
        return kwargs


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: TemplateKwargs | None = None
    add_generation_prompt: bool = True
    # OpenAI's efforts (the openai client's ReasoningEffort); see template_kwargs for what they do here.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(cls, choice, info: ValidationInfo):
        if choice in (None, "none", "auto"):
            return choice
        names = {tool.function.name for tool in info.data.get("tools") or ()}
        if not names:
            raise ValueError(f"{choice!r} needs tools" if isinstance(choice, str) else "a named tool needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"unknown tool {choice.function.name!r}")
        return choice

    @model_validator(mode="after")
    def _forced_tools_alone(self):
        if self.forces_tool_call and (self.structured_outputs is not None or (
                self.response_format is not None and self.response_format.type != "text")):
            raise ValueError("tool_choice that forces a call cannot be combined with response_format or "
                             "structured_outputs")
        return self

    @property
    def forces_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    def structured_output(self) -> StructuredOutput | None:
        """response_format / structured_outputs, or the forced tool calls of tool_choice "required" or a named
        function (one call of that function; "required": one or more, one unless parallel_tool_calls)."""
        if not self.forces_tool_call:
            return super().structured_output()
        named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        return StructuredOutput(structural_tag=tool_call_tag(self.tools, named, self.parallel_tool_calls is not False))

    @property
    def parse_tools(self) -> bool:
        """Whether the output is scanned for tool calls (tool_choice "none" keeps them as text)."""
        return bool(self.tools) and self.tool_choice != "none"

    def template_messages(self) -> list[dict]:
        return [message.to_template() for message in self.messages]

    def template_tools(self) -> list[dict] | None:
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None

    def template_kwargs(self) -> dict[str, Any]:
        """chat_template_kwargs, plus reasoning_effort under its own name (a template may read it). EXAONE either
        thinks or not (enable_thinking, on by default): "none" turns thinking off unless chat_template_kwargs sets
        enable_thinking; the other efforts leave it on, since the model has no shorter way to reason. Keys set in
        chat_template_kwargs win."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", self.reasoning_effort)
            if self.reasoning_effort == "none":
                kwargs.setdefault("enable_thinking", False)
        return kwargs

    def to_sampling_kwargs(self, defaults: Mapping[str, Any] | None = None, *,
                           default_max_tokens: int | None = None) -> dict:
        """SamplingParams kwargs: request values, else `defaults` (generation_config.json), else the engine's.
        default_max_tokens (the room left in the context) applies when the client sets no limit."""
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_kwargs(defaults, max_tokens, logprobs)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # null: up to the end of the context
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    # Accepted only where they change nothing, so that no request is silently answered as another one.
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _no_empty_prompts(cls, value):
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("must not be empty")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("not supported: this server does not insert text (no fill-in-the-middle)")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value, info: ValidationInfo):
        if value is not None and value != info.data.get("n"):
            raise ValueError("only best_of equal to n is supported: the server does not pick among extra samples")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts, each a string or a list of token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def to_sampling_kwargs(self, defaults: Mapping[str, Any] | None = None, *,
                           default_max_tokens: int | None = None) -> dict:
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        return self._sampling_kwargs(defaults, max_tokens, self.logprobs)


class TokenizeRequest(_Model):
    """Either a prompt (add_special_tokens applies) or messages rendered through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    tools: list[ToolDef] | None = None
    chat_template_kwargs: TemplateKwargs | None = None

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- errors

def error_body(message: str, *, type: str = "BadRequestError", param: str | None = None, code: int = 400) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _is_field_name(part: str) -> bool:
    # pydantic puts union branch tags in error locations ("str", "list[int]", "NamedToolChoice",
    # "function-after[...]", "[key]"); field names are snake_case identifiers.
    return part.isidentifier() and not part[0].isupper() and part not in {"str", "int", "float", "bool", "list", "dict"}


def validation_error_message(exc: ValidationError) -> tuple[str, str | None]:
    """A one-line message naming the offending field (e.g. "messages[0].role: ..."), and that field."""
    error = exc.errors()[0]
    param = ""
    for part in error["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif _is_field_name(part):
            param += f".{part}" if param else part
    message = error["msg"].removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), (param or None)


# ---------------------------------------------------------------- responses

def new_request_id(prefix: str) -> str:
    """"chatcmpl-..." for chat, "cmpl-..." for text completions."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_message(content: str | None, reasoning: str | None = None, tool_calls: list[dict] | None = None) -> dict:
    """The assistant message of a non-streaming answer; reasoning under both names clients look for."""
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning, "reasoning": reasoning}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def chat_delta(*, role: str | None = None, content: str | None = None, reasoning: str | None = None,
               tool_calls: list[dict] | None = None) -> dict:
    delta = {}
    if role is not None:
        delta["role"] = role
    if content:
        delta["content"] = content
    if reasoning:
        delta["reasoning_content"] = delta["reasoning"] = reasoning
    if tool_calls:
        delta["tool_calls"] = tool_calls
    return delta


def chat_choice(index: int, message: dict, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk_choice(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def _envelope(obj: str, request_id: str, model: str, created: int, choices: list[dict], usage: dict | None) -> dict:
    body = {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def chat_response(request_id: str, model: str, created: int, choices: list[dict], usage: dict) -> dict:
    return _envelope("chat.completion", request_id, model, created, choices, usage)


def chat_chunk(request_id: str, model: str, created: int, choices: list[dict], usage: dict | None = None) -> dict:
    return _envelope("chat.completion.chunk", request_id, model, created, choices, usage)


def completion_response(request_id: str, model: str, created: int, choices: list[dict], usage: dict | None = None
                        ) -> dict:
    """Also the shape of each streamed text-completion chunk (OpenAI uses one object type for both)."""
    return _envelope("text_completion", request_id, model, created, choices, usage)


TokenLogprob = tuple[str, float, list[tuple[str, float]]]  # (token text, logprob, top alternatives)


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [entry(token, logprob) | {"top_logprobs": [entry(t, lp) for t, lp in top]}
                        for token, logprob, top in tokens]}


def completion_logprobs(tokens: list[TokenLogprob], text_offset: int = 0) -> dict:
    """Legacy completions format; text_offset is where the first token starts in the choice's text."""
    offsets = []
    for token, _, _ in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": [token for token, _, _ in tokens], "token_logprobs": [logprob for _, logprob, _ in tokens],
            "top_logprobs": [dict(top) for _, _, top in tokens], "text_offset": offsets}


SSE_DONE = b"data: [DONE]\n\n"


def sse_event(body: dict) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"
