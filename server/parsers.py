"""Split K-EXAONE output text into reasoning, content and tool calls, whole or as a stream of deltas.

The model writes `{reasoning}\\n</think>\\n\\n{content}` when its prompt left a `<think>` block open (the
K-EXAONE default), and plain content when thinking was disabled. Content may carry tool calls as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks.

Rules (identical for whole text and for any split into deltas, which is what streaming guarantees):
- Reasoning is everything up to `</think>`, stripped at both ends. If `</think>` never comes the whole
  output is reasoning (a turn cut by max_tokens while still thinking has no answer yet).
- A `<think>` at the very start of the output (after whitespace) opens reasoning even when thinking was
  off, and is dropped when the prompt already opened it.
- Content loses its leading whitespace. With tool parsing on, whitespace around a parsed tool call is
  dropped; a block that does not parse (bad JSON, no string name, arguments not an object) and an
  unclosed block stay in the content verbatim.

The stream holds back only what it cannot decide yet: a possible tag prefix at the end of the text,
whitespace that may turn out to be dropped, and an open tool-call block until its closing tag.
"""

import json
import secrets
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

THINK_START, THINK_END = "<think>", "</think>"
TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"

_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # compact JSON object

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """One piece of a streamed tool call in OpenAI's format: the first piece of a call has its id and name."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {
            "index": self.index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ParsedDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    # The same pieces in the order the model wrote them, when that is known (the parser's deltas): ("reasoning",
    # text), ("content", text) or ("tool_call", ToolCallDelta). Text after a call stays after it here.
    parts: list[tuple[str, object]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def add(self, kind: str, value) -> None:
        """Append text ("reasoning", "content") or a tool-call piece ("tool_call") to the fields and the parts."""
        if kind == "tool_call":
            self.tool_calls.append(value)
            self.parts.append((kind, value))
            return
        if not value:
            return
        setattr(self, kind, getattr(self, kind) + value)
        if self.parts and self.parts[-1][0] == kind:
            self.parts[-1] = (kind, self.parts[-1][1] + value)
        else:
            self.parts.append((kind, value))

    def ordered(self) -> list[tuple[str, object]]:
        """The pieces in order: `parts`, or for a delta built from its fields alone, reasoning, content, calls."""
        if self.parts:
            return self.parts
        return [(k, v) for k, v in (("reasoning", self.reasoning), ("content", self.content)) if v] + [
            ("tool_call", piece) for piece in self.tool_calls]


@dataclass
class ParsedOutput:
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall]

    @classmethod
    def from_deltas(cls, deltas: Iterable[ParsedDelta]) -> "ParsedOutput":
        reasoning, content, calls = [], [], {}
        for delta in deltas:
            reasoning.append(delta.reasoning)
            content.append(delta.content)
            for piece in delta.tool_calls:
                if piece.id is not None:
                    calls[piece.index] = ToolCall(piece.id, piece.name, piece.arguments)
                else:
                    calls[piece.index].arguments += piece.arguments
        return cls("".join(reasoning) or None, "".join(content) or None, [calls[i] for i in sorted(calls)])


def _parse_tool_call(body: str) -> tuple[str, str] | None:
    """(name, compact JSON arguments) of a tool-call block body, or None when it is not a well-formed call."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models double-encode the arguments object
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return call["name"], json.dumps(arguments, ensure_ascii=False)


def _split_decided(text: str, tag: str) -> tuple[str, str]:
    """Split text (which holds no complete `tag`) into the part that can be emitted now and the part to hold:
    a tail that may grow into `tag`, and the whitespace before it, which is dropped if the tag follows."""
    held = 0
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            held = n
            break
    decided = text[: len(text) - held].rstrip()
    return decided, text[len(decided):]


_START, _REASONING, _CONTENT, _TOOL_CALL = range(4)


class OutputParser:
    """Incremental parser: feed() each new piece of output text, then finish() once the output is complete."""

    def __init__(self, *, starts_in_reasoning: bool, parse_tools: bool,
                 id_factory: Callable[[], str] = new_tool_call_id):
        self._starts_in_reasoning = starts_in_reasoning
        self._parse_tools = parse_tools
        self._id_factory = id_factory
        self._state = _START
        self._buf = ""  # text received but not yet emitted
        self._skip_space = True  # drop leading whitespace of the section now being read
        self._space_before_call = ""  # whitespace before an open <tool_call>: content unless the call parses
        self._num_calls = 0

    def feed(self, delta: str) -> ParsedDelta:
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> ParsedDelta:
        return self._drain(final=True)

    def _drain(self, final: bool) -> ParsedDelta:
        out = ParsedDelta()
        while self._step(out, final):
            pass
        return out

    def _step(self, out: ParsedDelta, final: bool) -> bool:
        """Consume what can be decided from the buffer; True when the state changed and scanning continues."""
        if self._skip_space:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._skip_space = False
        buf = self._buf
        if self._state == _START:
            if buf.startswith(THINK_START):
                self._enter(_REASONING, buf[len(THINK_START):], skip_space=True)
            elif THINK_START.startswith(buf) and not final:
                return False
            else:
                self._state = _REASONING if self._starts_in_reasoning else _CONTENT
            return True
        if self._state == _REASONING:
            end = buf.find(THINK_END)
            if end >= 0:
                out.add("reasoning", buf[:end].rstrip())
                self._enter(_CONTENT, buf[end + len(THINK_END):], skip_space=True)
                return True
            decided, self._buf = (buf.rstrip(), "") if final else _split_decided(buf, THINK_END)
            out.add("reasoning", decided)
            return False
        if self._state == _CONTENT:
            start = buf.find(TOOL_START) if self._parse_tools else -1
            if start >= 0:
                before = buf[:start].rstrip()
                out.add("content", before)
                self._space_before_call = buf[len(before):start]
                self._enter(_TOOL_CALL, buf[start + len(TOOL_START):])
                return True
            if final or not self._parse_tools:
                decided, self._buf = buf, ""
            else:
                decided, self._buf = _split_decided(buf, TOOL_START)
            out.add("content", decided)
            return False
        return self._step_tool_call(out, final)

    def _step_tool_call(self, out: ParsedDelta, final: bool) -> bool:
        buf = self._buf
        end = buf.find(TOOL_END)
        reopened = buf.find(TOOL_START)
        if reopened >= 0 and (end < 0 or reopened < end):
            # The block was never closed before a new one began: its opening tag is plain text.
            out.add("content", self._space_before_call + TOOL_START)
            self._enter(_CONTENT, buf)
            return True
        if end < 0:
            if final:
                out.add("content", self._space_before_call + TOOL_START + buf)
                self._buf = ""
            return False
        body = buf[:end]
        call = _parse_tool_call(body)
        if call is None:
            out.add("content", self._space_before_call + TOOL_START + body + TOOL_END)
            self._enter(_CONTENT, buf[end + len(TOOL_END):])
            return True
        name, arguments = call
        index = self._num_calls
        self._num_calls += 1
        out.add("tool_call", ToolCallDelta(index, self._id_factory(), name))
        out.add("tool_call", ToolCallDelta(index, arguments=arguments))
        self._enter(_CONTENT, buf[end + len(TOOL_END):], skip_space=True)
        return True

    def _enter(self, state: int, buf: str, skip_space: bool = False) -> None:
        self._state, self._buf, self._skip_space = state, buf, skip_space


def parse_full(text: str, *, starts_in_reasoning: bool, parse_tools: bool,
               id_factory: Callable[[], str] = new_tool_call_id) -> ParsedOutput:
    """Parse a complete output (non-streaming responses); the same rules as streaming it through OutputParser."""
    parser = OutputParser(starts_in_reasoning=starts_in_reasoning, parse_tools=parse_tools, id_factory=id_factory)
    return ParsedOutput.from_deltas([parser.feed(text), parser.finish()])
