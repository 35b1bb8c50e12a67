"""The OpenAI-compatible HTTP edge: FastAPI routes over one AsyncEngine.

A request is validated, rendered and tokenized here, becomes n engine requests (one per choice), and the
engine's deltas come back as one JSON body or as SSE chunks. Every engine request runs in its own task that
feeds one queue per HTTP request; cancelling those tasks (client gone, error, end of the response) aborts
whatever is still in the engine, so no path can leak a running request.
"""

import asyncio
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from exaserve import __version__
from exaserve.engine import SamplingParams
from exaserve.engine.chat_template import ChatTemplateError, encode_chat, prompt_ends_in_reasoning
from exaserve.engine.outputs import DeltaOutput
from exaserve.server import protocol as p
from exaserve.server import responses as rs
from exaserve.server.metrics import CONTENT_TYPE, Metrics
from exaserve.server.parsers import (
    THINK_END,
    THINK_START,
    TOOL_END,
    TOOL_START,
    OutputParser,
    ParsedDelta,
    ParsedOutput,
)

log = logging.getLogger("exaserve.server")

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "BadRequestError",
                413: "RequestTooLargeError", 429: "RateLimitError", 500: "InternalServerError",
                503: "ServiceUnavailableError"}

# A JSON body is held whole, parsed into Python objects (several times its size) and its text tokenized. 8 MiB
# still holds a full 256K-token K-EXAONE context written as \u-escaped Korean (~9 bytes a token), and costs seconds
# of CPU and a few hundred MiB; unbounded, one 20 MB body took 46 s and 2.6 GB.
DEFAULT_MAX_REQUEST_BYTES = 8 << 20
# OpenAI's bound on n. Each choice is an engine request: without a bound one request could queue thousands.
DEFAULT_MAX_N = 128


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers

    def body(self) -> dict:
        return p.error_body(self.message, type=_ERROR_TYPES.get(self.status, "BadRequestError"), param=self.param,
                            code=self.status)


def _cached_tokens(cached: list[int], n: int) -> int:
    """Prompt tokens served from the prefix cache, for usage: per prompt the fewest any of its n choices (choices
    k*n .. k*n+n-1) found, as the first to run computes what the others reuse."""
    return sum(min(cached[k:k + n]) for k in range(0, len(cached), n))


def _json(body: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _internal_error(request_id: str, exc: BaseException) -> ApiError:
    """A 500 that gives the client only an id to quote; the details go to the log under the same id."""
    log.error("request %s failed", request_id, exc_info=exc)
    return ApiError(500, f"internal server error (request id {request_id})")


def _decode(raw: bytes, model_cls):
    """The validated request model of a JSON body (runs in a worker thread: a large body takes a while)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    # Counting brackets is cheap and bounds the depth: only a body with many of them is walked.
    if raw.count(b"[") + raw.count(b"{") > p.MAX_JSON_DEPTH and p.json_depth_exceeds(data, p.MAX_JSON_DEPTH):
        raise ApiError(400, f"the request body nests lists and objects more than {p.MAX_JSON_DEPTH} deep")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, *p.validation_error_message(exc)) from None


# ---------------------------------------------------------------- text post-processing per choice

class _SpecialTextFilter:
    """Removes special-token strings from streamed text, holding back a tail that may begin one."""

    def __init__(self, strings: set[str]):
        ordered = sorted(strings, key=len, reverse=True)  # longest first, so no token hides inside another
        self._pattern = re.compile("|".join(map(re.escape, ordered)))
        self._prefixes = {s[:k] for s in strings for k in range(1, len(s))}
        self._longest = len(ordered[0])
        self._held = ""

    def feed(self, text: str, final: bool) -> str:
        text = self._pattern.sub("", self._held + text)
        hold = 0
        if not final:
            hold = next((k for k in range(min(self._longest - 1, len(text)), 0, -1) if text[-k:] in self._prefixes), 0)
        self._held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]


class _ChatChoice:
    """Turns one choice's raw engine text into reasoning / content / tool-call deltas.

    tool_choice "required" or a named function constrains the output to tool calls (server/protocol.py
    tool_call_tag); a call that max_tokens cut short stays content, with finish_reason "length". With a named
    function, calls to other functions are dropped; with parallel_tool_calls=false only the first call is kept.
    """

    def __init__(self, *, starts_in_reasoning: bool, parse_tools: bool, special: set[str] | None,
                 only_tool: str | None, single_call: bool):
        self._filter = _SpecialTextFilter(special) if special else None
        self._parser = OutputParser(starts_in_reasoning=starts_in_reasoning, parse_tools=parse_tools)
        self._only_tool, self._single_call = only_tool, single_call
        self._call_index: dict[int, int] = {}  # parser's call index -> index in the response
        self.num_output_tokens = 0

    def feed(self, delta: DeltaOutput) -> ParsedDelta:
        text = self._filter.feed(delta.text, delta.finished) if self._filter else delta.text
        out = self._parser.feed(text)
        if delta.finished:
            for kind, value in self._parser.finish().ordered():
                out.add(kind, value)
        self.num_output_tokens = delta.num_output_tokens
        return self._select(out)

    def _select(self, out: ParsedDelta) -> ParsedDelta:
        """The delta with only the kept calls, renumbered (a named tool_choice, parallel_tool_calls=false)."""
        if not out.tool_calls:
            return out
        kept = ParsedDelta()
        for kind, value in out.ordered():
            if kind != "tool_call":
                kept.add(kind, value)
                continue
            if value.id is not None:  # a call's first piece carries its name
                wanted = self._only_tool is None or value.name == self._only_tool
                if wanted and not (self._single_call and self._call_index):
                    self._call_index[value.index] = len(self._call_index)
            index = self._call_index.get(value.index)
            if index is not None:
                kept.add(kind, replace(value, index=index))
        return kept

    def finish_reason(self, engine_reason: str) -> str:
        return "tool_calls" if self._call_index and engine_reason == "stop" else engine_reason


class _ReasoningTokens:
    """Counts the output tokens before `</think>` (the reasoning tokens of usage), from the token ids."""

    def __init__(self, end_ids: list[int], reasoning: bool):
        self._end, self._active, self._tail = list(end_ids), reasoning and bool(end_ids), []
        self.count = 0

    def feed(self, token_ids: list[int]) -> None:
        for token in token_ids:
            if not self._active:
                return
            self.count += 1
            self._tail = (self._tail + [token])[-len(self._end):]
            if self._tail == self._end:
                self.count -= len(self._end)
                self._active = False


# ---------------------------------------------------------------- engine requests of one HTTP request

class _Generation:
    """The n engine requests of one HTTP request, merged into one stream of (choice index, delta)."""

    def __init__(self, server: "OpenAIServer", request_id: str, prompts: list[list[int]],
                 params: list[SamplingParams]):
        self._server = server
        self.request_id = request_id
        self._queue: asyncio.Queue = asyncio.Queue()
        server.live.add(self)
        server.loop = asyncio.get_running_loop()
        self._unsent = set(range(len(prompts)))  # choices not handed to the engine yet: waiting, too
        server.num_unsent += len(prompts)
        self._tasks = []
        for i, (ids, sp) in enumerate(zip(prompts, params)):
            task = asyncio.create_task(self._pump(i, f"{request_id}-{i}", ids, sp))
            # A done callback runs even for a task cancelled before it started, so the count never leaks.
            task.add_done_callback(lambda _, i=i: self._sent(i))
            self._tasks.append(task)

    def _sent(self, i: int) -> None:
        if i in self._unsent:
            self._unsent.discard(i)
            self._server.num_unsent -= 1

    async def _pump(self, i: int, request_id: str, ids: list[int], params: SamplingParams) -> None:
        arrival, first = time.monotonic(), None
        # From here the engine counts it (AsyncEngine.num_waiting): the generator's first step queues the request
        # before anything else runs on this loop.
        self._sent(i)
        try:
            async for delta in self._server.engine.add_request(request_id, ids, params):
                if first is None and delta.token_ids:
                    first = time.monotonic()
                self._queue.put_nowait((i, delta))
                if delta.finished and delta.finish_reason != "abort":
                    self._server.metrics.observe_request(arrival, first, time.monotonic(), delta.num_output_tokens)
        except Exception as exc:  # CancelledError passes: it means the consumer is gone
            self._queue.put_nowait((i, exc))
        self._queue.put_nowait((i, None))

    async def __aiter__(self) -> AsyncIterator[tuple[int, DeltaOutput]]:
        remaining = len(self._tasks)
        while remaining:
            i, item = await self._queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, ValueError):
                raise ApiError(400, str(item))
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item

    def close(self) -> None:
        """Abort what is still running; safe to call more than once and from any cleanup path."""
        self._server.live.discard(self)
        for task in self._tasks:
            task.cancel()

    def fail(self, error: Exception) -> None:
        """End the response with `error` (an error event when streaming) and abort its engine requests."""
        self._queue.put_nowait((-1, error))
        self.close()

    async def aclose(self) -> None:
        # A response's background task: Starlette runs plain functions in a thread, where cancel() is unsafe.
        self.close()


async def _wait_for_disconnect(request: Request) -> None:
    # Called after the body was read: the next message uvicorn delivers is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------- the server

class OpenAIServer:
    def __init__(self, engine, *, served_model_name: str, api_key: str | None = None,
                 chat_template: str | None = None, max_queue: int | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_n: int = DEFAULT_MAX_N):
        self.engine = engine
        self.tokenizer = tok = engine.tokenizer
        self.model_name = served_model_name
        self.api_key = api_key
        self.chat_template = chat_template or tok.chat_template
        self.max_queue = max_queue
        self.max_request_bytes = max_request_bytes
        self.max_n = max_n
        self.max_model_len = engine.max_model_len
        self.metrics = Metrics()
        self.num_unsent = 0   # engine requests admitted here but not yet handed to the engine
        self.live: set[_Generation] = set()     # responses in flight, for fail_in_flight
        self.loop: asyncio.AbstractEventLoop | None = None
        self.created = p.now()
        # Markers the parsers need stay even where a checkpoint marks them special.
        self._special = {tok.id_to_token(i) for i in tok.special_ids} - {THINK_START, THINK_END, TOOL_START, TOOL_END}
        self._special.discard(None)
        self._token_text: dict[int, str] = {}
        self.think_end_ids = tok.encode(THINK_END)   # where a reasoning request's structured output starts

    # -- request plumbing ----------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 9110); the key is compared in constant time
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'")

    async def read_body(self, request: Request) -> bytes:
        """The body, refused (413) past max_request_bytes: by its Content-Length before any of it is read, and by
        counting as a chunked one arrives, which stops reading there."""
        limit = self.max_request_bytes
        too_large = ApiError(413, f"the request body is larger than {limit} bytes")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    async def parse(self, request: Request, model_cls):
        body = await asyncio.to_thread(_decode, await self.read_body(request), model_cls)
        if body.model is not None and body.model != self.model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           "model")
        return body

    def encode_chat(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
                    template_kwargs: dict | None) -> tuple[str, list[int]]:
        """The prompt text and ids of a conversation. Slow for a long one: call it in a worker thread."""
        if self.chat_template is None:
            raise ApiError(400, "the model has no chat template; start the server with --chat-template FILE")
        try:
            return encode_chat(self.tokenizer, self.chat_template, messages, tools=tools,
                               add_generation_prompt=add_generation_prompt, template_kwargs=template_kwargs)
        except ChatTemplateError as exc:
            raise ApiError(400, f"chat template error: {exc}", "messages") from None

    def check_choices(self, n: int, num_prompts: int = 1) -> None:
        """Refuse a request for more choices (engine requests) than max_n, or than max_queue lets wait; then admit."""
        count = n * num_prompts
        what = f"n={n} for each of {num_prompts} prompts" if num_prompts > 1 else f"n={n}"
        if count > self.max_n:
            raise ApiError(400, f"{count} choices ({what}) is more than the {self.max_n} one request may ask for",
                           "n")
        # Such a request could never be admitted: a clear 400 rather than 429s that retrying cannot fix.
        if self.max_queue is not None and count > self.max_queue:
            raise ApiError(400, f"{count} choices ({what}) is more than --max-queue {self.max_queue} lets wait", "n")
        self.admit(count)

    def admit(self, count: int) -> None:
        """429 when `count` more engine requests would make more than max_queue wait (none waiting: always in)."""
        if self.max_queue is not None and self.num_waiting + count > self.max_queue:
            self.metrics.rejected += 1
            raise ApiError(429, f"the server is busy: {self.num_waiting} requests are waiting "
                                f"(--max-queue {self.max_queue}); retry later", headers={"Retry-After": "1"})

    def sampling_params(self, body, prompt_len: int, engine_overrides: dict | None = None) -> list[SamplingParams]:
        """One SamplingParams per choice; seeded choices get seed + index so they differ but reproduce."""
        kwargs = body.to_sampling_kwargs(self.engine.generation_defaults,
                                         default_max_tokens=max(1, self.max_model_len - prompt_len))
        kwargs.update(engine_overrides or {})
        seed = kwargs.pop("seed")
        return [SamplingParams(**kwargs, seed=None if seed is None else seed + i) for i in range(body.n)]

    def validate(self, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        # The engine would raise the same error, but only once the response had already started. The choices of
        # one prompt (the same list) differ only in their seed, which validation does not read: one check each.
        previous = None
        for ids, sp in zip(prompts, params):
            if ids is not previous:
                try:
                    self.engine.validate(ids, sp)
                except ValueError as exc:
                    raise ApiError(400, str(exc)) from None
            previous = ids

    @property
    def num_waiting(self) -> int:
        """Engine requests that wait to be scheduled: the queue --max-queue bounds (running ones are not in it)."""
        return self.num_unsent + self.engine.num_waiting()

    def fail_in_flight(self, message: str = "the server is shutting down; retry the request") -> None:
        """End every response in flight with a 503 (an error event for a stream): the shutdown deadline. Safe
        to call from a signal handler or another thread."""
        def fail_all():
            for gen in list(self.live):
                gen.fail(ApiError(503, message))

        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fail_all)

    async def start(self, request_id: str, prompts: list[list[int]], params: list[SamplingParams]) -> _Generation:
        await asyncio.to_thread(self.validate, prompts, params)  # a pass over every prompt token
        # Admitted again: the queue may have filled while this request was tokenized (check_choices ran before).
        self.admit(len(prompts))
        return _Generation(self, request_id, prompts, params)

    async def until_disconnect(self, request: Request, gen: _Generation, collect):
        """Run a non-streaming collection; a client that leaves first aborts it."""
        work = asyncio.ensure_future(collect)
        watch = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            return None
        finally:
            work.cancel()
            watch.cancel()
            gen.close()

    def stream(self, gen: _Generation, events: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(self._sse(gen, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"}, background=BackgroundTask(gen.aclose))

    async def _sse(self, gen: _Generation, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield event
        except ApiError as exc:  # the status line is sent already: the error becomes the last event
            yield p.sse_event(exc.body())
        except Exception as exc:
            yield p.sse_event(_internal_error(gen.request_id, exc).body())
        finally:
            gen.close()
        yield p.SSE_DONE

    def token_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None, top_n: int
                       ) -> list[p.TokenLogprob]:
        if logprobs is None:
            return []
        out = []
        for token, entry in zip(token_ids, logprobs):
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
            out.append((self._text_of(token), entry[token], [(self._text_of(t), lp) for t, lp in top]))
        return out

    def _text_of(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    # -- chat completions ----------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        request_id = request.state.request_id = p.new_request_id("chatcmpl")
        body: p.ChatCompletionRequest = await self.parse(request, p.ChatCompletionRequest)
        gen, choices, ids, _ = await self.start_chat(request_id, body)
        top_n = (body.top_logprobs or 0) if body.logprobs else None
        meta = (request_id, self.model_name, p.now())
        if body.stream:
            return self.stream(gen, self._chat_events(gen, choices, meta, len(ids), top_n, body.include_usage))
        result = await self.until_disconnect(request, gen, self._chat_full(gen, choices, meta, len(ids), top_n))
        return _json(result) if result is not None else Response(status_code=499)

    async def start_chat(self, request_id: str, body: p.ChatCompletionRequest
                         ) -> tuple[_Generation, list[_ChatChoice], list[int], bool]:
        """Admit, render and start a chat request: its generation, one parser per choice, the prompt ids, and
        whether the output starts inside the reasoning."""
        self.check_choices(body.n)
        prompt, ids = await asyncio.to_thread(self.encode_chat, body.template_messages(), body.template_tools(),
                                              body.add_generation_prompt, body.template_kwargs())
        # Raw text from the engine so no marker the parser needs is ever dropped; special tokens the client
        # asked to skip are removed afterwards, from the visible text only.
        overrides = {"skip_special_tokens": False}
        reasons = prompt_ends_in_reasoning(prompt)
        structured = body.structured_output()
        if structured is not None and reasons:   # the reasoning is free; the constraint starts after </think>
            overrides["structured_outputs"] = replace(structured, start_after=tuple(self.think_end_ids))
        params = self.sampling_params(body, len(ids), overrides)
        gen = await self.start(request_id, [ids] * body.n, params)
        named = body.tool_choice.function.name if isinstance(body.tool_choice, p.NamedToolChoice) else None
        choices = [_ChatChoice(starts_in_reasoning=reasons, parse_tools=body.parse_tools,
                               special=self._special if body.skip_special_tokens else None, only_tool=named,
                               single_call=body.parallel_tool_calls is False) for _ in range(body.n)]
        return gen, choices, ids, reasons

    async def _chat_full(self, gen, choices, meta, prompt_len, top_n) -> dict:
        parsed = [[] for _ in choices]
        logprobs = [[] for _ in choices]
        reasons = [None] * len(choices)
        cached = [0] * len(choices)
        async for i, delta in gen:
            cached[i] = delta.num_cached_tokens
            parsed[i].append(choices[i].feed(delta))
            if top_n is not None:
                logprobs[i] += self.token_logprobs(delta.token_ids, delta.logprobs, top_n)
            if delta.finished:
                reasons[i] = choices[i].finish_reason(delta.finish_reason)
        out = []
        for i in range(len(choices)):
            result = ParsedOutput.from_deltas(parsed[i])
            message = p.chat_message(result.content, result.reasoning, [c.to_openai() for c in result.tool_calls])
            out.append(p.chat_choice(i, message, reasons[i], p.chat_logprobs(logprobs[i]) if top_n is not None
                                     else None))
        completion_tokens = sum(c.num_output_tokens for c in choices)
        return p.chat_response(*meta, out, p.usage(prompt_len, completion_tokens, _cached_tokens(cached, len(choices))))

    async def _chat_events(self, gen, choices, meta, prompt_len, top_n, include_usage) -> AsyncIterator[bytes]:
        def chunk(i, delta, finish_reason=None, logprobs=None):
            return p.sse_event(p.chat_chunk(*meta, [p.chat_chunk_choice(i, delta, finish_reason, logprobs)]))

        for i in range(len(choices)):
            yield chunk(i, {"role": "assistant", "content": ""})
        cached = [0] * len(choices)
        async for i, delta in gen:
            cached[i] = delta.num_cached_tokens
            parsed = choices[i].feed(delta)
            # Reasoning, then content, then each tool-call piece (header, then arguments) in its own chunk.
            deltas = [d for d in (p.chat_delta(reasoning=parsed.reasoning), p.chat_delta(content=parsed.content)) if d]
            deltas += [{"tool_calls": [piece.to_openai()]} for piece in parsed.tool_calls]
            logprobs = None
            if top_n is not None and delta.token_ids:
                logprobs = p.chat_logprobs(self.token_logprobs(delta.token_ids, delta.logprobs, top_n))
                deltas = deltas or [{}]
            for k, d in enumerate(deltas):
                yield chunk(i, d, logprobs=logprobs if k == 0 else None)
            if delta.finished:
                yield chunk(i, {}, choices[i].finish_reason(delta.finish_reason))
        if include_usage:
            completion_tokens = sum(c.num_output_tokens for c in choices)
            yield p.sse_event(p.chat_chunk(*meta, [], p.usage(prompt_len, completion_tokens,
                                                               _cached_tokens(cached, len(choices)))))

    # -- responses (server/responses.py) -------------------------------------------------------------------
    async def responses(self, request: Request) -> Response:
        request_id = request.state.request_id = rs.new_id("resp")
        body: rs.ResponsesRequest = await self.parse(request, rs.ResponsesRequest)
        try:
            chat = p.ChatCompletionRequest.model_validate(body.to_chat())
        except ValidationError as exc:   # named as the chat request names them: the fields they came from
            message, param = p.validation_error_message(exc)
            for chat_name, name in (("max_tokens", "max_output_tokens"), ("messages", "input"),
                                    ("response_format", "text.format"), ("reasoning_effort", "reasoning.effort")):
                message = message.replace(chat_name, name)
                param = param and param.replace(chat_name, name)
            raise ApiError(400, message, param) from None
        gen, (choice,), ids, reasons = await self.start_chat(request_id, chat)
        builder = rs.ResponseBuilder(request_id, self.model_name, body.echo())
        run = self._response_run(gen, choice, builder, len(ids), reasons)
        if body.stream:
            return StreamingResponse(self._response_sse(gen, builder, run), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"}, background=BackgroundTask(gen.aclose))

        async def collect():
            async for _ in run:
                pass
            return builder.response()

        result = await self.until_disconnect(request, gen, collect())
        return _json(result) if result is not None else Response(status_code=499)

    async def _response_run(self, gen, choice, builder, prompt_len, reasons) -> AsyncIterator[dict]:
        """The response's events, from its one choice's deltas (the builder keeps the response)."""
        for event in builder.start():
            yield event
        counter = _ReasoningTokens(self.think_end_ids, reasons)
        async for _, delta in gen:
            counter.feed(delta.token_ids)
            for event in builder.feed(choice.feed(delta)):
                yield event
            if delta.finished:
                usage = rs.usage(prompt_len, delta.num_output_tokens, delta.num_cached_tokens, counter.count)
                for event in builder.finish(choice.finish_reason(delta.finish_reason), usage):
                    yield event

    async def _response_sse(self, gen, builder, events: AsyncIterator[dict]) -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield rs.sse(event)
        except Exception as exc:  # the status line is sent already: the error ends the stream
            error = exc if isinstance(exc, ApiError) else _internal_error(gen.request_id, exc)
            code = "invalid_request_error" if error.status < 500 else "server_error"
            for event in builder.fail(error.message, code):
                yield rs.sse(event)
        finally:
            gen.close()

    # -- text completions ----------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        request_id = request.state.request_id = p.new_request_id("cmpl")
        body: p.CompletionRequest = await self.parse(request, p.CompletionRequest)
        self.check_choices(body.n, len(body.prompts()))
        prompts = await asyncio.to_thread(lambda: [self.tokenizer.encode(q, add_special_tokens=True)
                                                   if isinstance(q, str) else q for q in body.prompts()])
        engine_prompts, params = [], []
        for ids in prompts:
            engine_prompts += [ids] * body.n
            params += self.sampling_params(body, len(ids))
        gen = await self.start(request_id, engine_prompts, params)
        # Choice k answers prompt k // n; echo puts the prompt text in front of its output.
        echoes = [""] * len(engine_prompts)
        if body.echo:   # decoding long prompts takes a while: off the event loop, as their encoding is
            echoes = await asyncio.to_thread(
                lambda: [self.tokenizer.decode(ids, body.skip_special_tokens) for ids in engine_prompts])
        meta = (request_id, self.model_name, p.now())
        prompt_tokens = sum(map(len, prompts))
        if body.stream:
            return self.stream(gen, self._completion_events(gen, echoes, meta, prompt_tokens, body.logprobs,
                                                            body.include_usage, body.n))
        result = await self.until_disconnect(request, gen, self._completion_full(gen, echoes, meta, prompt_tokens,
                                                                                 body.logprobs, body.n))
        return _json(result) if result is not None else Response(status_code=499)

    async def _completion_full(self, gen, echoes, meta, prompt_tokens, top_n, n) -> dict:
        texts = list(echoes)
        logprobs = [[] for _ in echoes]
        reasons = [None] * len(echoes)
        cached = [0] * len(echoes)
        completion_tokens = 0
        async for i, delta in gen:
            cached[i] = delta.num_cached_tokens
            texts[i] += delta.text
            if top_n is not None:
                logprobs[i] += self.token_logprobs(delta.token_ids, delta.logprobs, top_n)
            if delta.finished:
                reasons[i] = delta.finish_reason
                completion_tokens += delta.num_output_tokens
        choices = [p.completion_choice(i, texts[i], reasons[i], p.completion_logprobs(logprobs[i], len(echoes[i]))
                                       if top_n is not None else None) for i in range(len(echoes))]
        return p.completion_response(*meta, choices, p.usage(prompt_tokens, completion_tokens,
                                                             _cached_tokens(cached, n)))

    async def _completion_events(self, gen, echoes, meta, prompt_tokens, top_n, include_usage,
                                 n) -> AsyncIterator[bytes]:
        offsets = [len(e) for e in echoes]  # where the next text starts in each choice, for text_offset
        for i, echo in enumerate(echoes):
            if echo:
                yield p.sse_event(p.completion_response(*meta, [p.completion_choice(i, echo, None)]))
        completion_tokens = 0
        cached = [0] * len(echoes)
        async for i, delta in gen:
            cached[i] = delta.num_cached_tokens
            logprobs = None
            if top_n is not None:
                logprobs = p.completion_logprobs(self.token_logprobs(delta.token_ids, delta.logprobs, top_n),
                                                 offsets[i])
            offsets[i] += len(delta.text)
            # one chunk per step that produced tokens, even when they decode to no text yet (a partial
            # character, a special token): clients see every token's timing, as with other servers
            if delta.text or delta.token_ids or logprobs or delta.finished:
                reason = delta.finish_reason if delta.finished else None
                yield p.sse_event(p.completion_response(*meta, [p.completion_choice(i, delta.text, reason, logprobs)]))
            if delta.finished:
                completion_tokens += delta.num_output_tokens
        if include_usage:
            yield p.sse_event(p.completion_response(*meta, [], p.usage(prompt_tokens, completion_tokens,
                                                                       _cached_tokens(cached, n))))

    # -- small endpoints -----------------------------------------------------------------------------------
    async def tokenize(self, request: Request) -> Response:
        body: p.TokenizeRequest = await self.parse(request, p.TokenizeRequest)
        if body.messages is not None:
            _, ids = await asyncio.to_thread(
                self.encode_chat, [m.to_template() for m in body.messages],
                [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
                body.add_generation_prompt, body.chat_template_kwargs)
        else:
            ids = await asyncio.to_thread(self.tokenizer.encode, body.prompt, body.add_special_tokens)
        return _json({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        body: p.DetokenizeRequest = await self.parse(request, p.DetokenizeRequest)
        vocab = self.engine.model_config.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
        text = await asyncio.to_thread(self.tokenizer.decode, body.tokens, False)   # off the event loop
        return _json({"prompt": text})

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "exaserve",
                "root": self.model_name, "parent": None, "max_model_len": self.max_model_len}

    async def models(self) -> Response:
        return _json({"object": "list", "data": [self._model_card()]})

    async def model(self, model_id: str) -> Response:
        """GET /v1/models/{id} (the client's models.retrieve)."""
        if model_id != self.model_name:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves {self.model_name!r}",
                           "model")
        return _json(self._model_card())

    async def health(self) -> Response:
        return Response(status_code=200 if self.engine.is_healthy() else 503)

    async def version(self) -> Response:
        return _json({"version": __version__})

    async def reset_prefix_cache(self) -> Response:
        """POST /reset_prefix_cache: forget every cached prompt prefix (e.g. after a benchmark's warm-up)."""
        await self.engine.reset_prefix_cache()
        return Response(status_code=200)

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(self.engine.stats()), media_type=CONTENT_TYPE)


def build_app(engine, *, served_model_name: str, api_key: str | None = None, chat_template: str | None = None,
              max_queue: int | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              max_n: int = DEFAULT_MAX_N) -> FastAPI:
    """The FastAPI app over a started AsyncEngine. With api_key, every route but /health, /metrics and
    /version needs `Authorization: Bearer <api_key>`. Each choice of a request is one engine request; max_queue
    refuses (429) a request whose choices would make more than max_queue engine requests wait for their first
    token (a request for more than max_queue choices is a 400: it could never be admitted). max_request_bytes:
    larger bodies get 413; max_n: the most choices one request may ask for (n, times the number of prompts of a
    batched completion), more is a 400."""
    server = OpenAIServer(engine, served_model_name=served_model_name, api_key=api_key, chat_template=chat_template,
                          max_queue=max_queue, max_request_bytes=max_request_bytes, max_n=max_n)
    app = FastAPI(title="exaserve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        response = _json(exc.body(), exc.status)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return _json(ApiError(exc.status_code, str(exc.detail)).body(), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected_error(request: Request, exc: Exception) -> Response:
        request_id = getattr(request.state, "request_id", None) or p.new_request_id("req")
        return _json(_internal_error(request_id, exc).body(), 500)

    open_routes = APIRouter()
    open_routes.add_api_route("/health", server.health, methods=["GET"])
    open_routes.add_api_route("/metrics", server.metrics_text, methods=["GET"])
    open_routes.add_api_route("/version", server.version, methods=["GET"])
    guarded = APIRouter(dependencies=[Depends(server.authorize)])
    guarded.add_api_route("/v1/models", server.models, methods=["GET"])
    guarded.add_api_route("/v1/models/{model_id:path}", server.model, methods=["GET"])
    guarded.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    guarded.add_api_route("/v1/completions", server.completions, methods=["POST"])
    guarded.add_api_route("/v1/responses", server.responses, methods=["POST"])
    guarded.add_api_route("/tokenize", server.tokenize, methods=["POST"])
    guarded.add_api_route("/detokenize", server.detokenize, methods=["POST"])
    guarded.add_api_route("/reset_prefix_cache", server.reset_prefix_cache, methods=["POST"])
    app.include_router(open_routes)
    app.include_router(guarded)
    return app
