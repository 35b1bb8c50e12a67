"""The server's limits and failure paths, on an app built in-process over a fake engine (the tiny checkpoint's real
tokenizer and chat template), driven through httpx's ASGI transport in one event loop."""
import asyncio
import logging
import re
import time
from types import SimpleNamespace

import httpx
import pytest

from exaserve.engine.outputs import DeltaOutput
from exaserve.engine.tokenizer import Tokenizer
from exaserve.server.app import DEFAULT_MAX_N, DEFAULT_MAX_REQUEST_BYTES, build_app

pytest_plugins = ["server_fixture"]

ASK = [{"role": "user", "content": "Hello"}]
MiB = 1 << 20


class FakeEngine:
    """What the server uses of an AsyncEngine. Each request answers one token once `release` is set; `failure`, if
    set, is raised by add_request instead."""

    max_model_len = 4096
    generation_defaults: dict = {}

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.model_config = SimpleNamespace(vocab_size=tokenizer.vocab_size)
        self.release: asyncio.Event | None = None
        self.failure: Exception | None = None
        self.held = 0   # requests waiting for `release`: the engine's queue

    def num_waiting(self):
        return self.held

    def validate(self, ids, params):
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"the prompt ({len(ids)} tokens) is too long")

    async def add_request(self, request_id, ids, params):
        if self.failure is not None:
            raise self.failure
        if self.release is not None:
            self.held += 1
            try:
                await self.release.wait()
            finally:
                self.held -= 1
        yield DeltaOutput(request_id, [5], "x", None, True, "length", None, len(ids), 1)

    def is_healthy(self):
        return True


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return Tokenizer.from_pretrained(tiny_model)


def run(app, scenario):
    """Run `await scenario(client)` against the app; returns its result."""
    async def main():
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            return await scenario(client)

    return asyncio.run(main())


def check_error(response, status, *fragments, param="unchecked"):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    for fragment in fragments:
        assert fragment in error["message"]
    if param != "unchecked":
        assert error["param"] == param
    return error


def chat(**fields):
    return {"messages": ASK, "max_tokens": 1, **fields}


def test_defaults():
    assert DEFAULT_MAX_REQUEST_BYTES == 8 * MiB and DEFAULT_MAX_N == 128


# ---------------------------------------------------------------- request body size

def test_body_over_the_limit_is_413_and_reading_stops(tokenizer):
    app = build_app(FakeEngine(tokenizer), served_model_name="m", max_request_bytes=2 * MiB)
    chunks_read = 0

    async def body(chunks=64):
        nonlocal chunks_read
        for _ in range(chunks):
            chunks_read += 1
            yield b" " * MiB

    async def scenario(client):
        nonlocal chunks_read
        # chunked (no Content-Length): counted as it arrives; the third MiB is over the limit and the last read
        chunked = await client.post("/v1/chat/completions", content=body())
        counted, chunks_read = chunks_read, 0
        # a Content-Length over the limit is refused before any of the body is read
        declared = await client.post("/v1/completions", content=body(3), headers={"Content-Length": str(3 * MiB)})
        exact = await client.post("/tokenize", content=b'{"prompt": "a"}'.ljust(2 * MiB))  # exactly the limit
        return chunked, counted, declared, chunks_read, exact, await client.post("/v1/chat/completions", json=chat())

    chunked, counted, declared, declared_read, exact, after = run(app, scenario)
    check_error(chunked, 413, "larger than 2097152 bytes")
    assert chunked.json()["error"]["type"] == "RequestTooLargeError"
    assert counted == 3
    check_error(declared, 413, "larger than 2097152 bytes")
    assert declared_read == 0
    assert exact.status_code == 200 and exact.json()["count"] == 2  # <|bos|> a
    assert after.status_code == 200, after.text


# ---------------------------------------------------------------- n and the waiting queue

def test_n_is_bounded(tokenizer):
    app = build_app(FakeEngine(tokenizer), served_model_name="m", max_n=8)

    async def scenario(client):
        return [await client.post("/v1/chat/completions", json=chat(n=9)),
                await client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1}),
                await client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 4, "max_tokens": 1}),
                await client.post("/v1/chat/completions", json=chat(n=8))]

    too_many, batch, batch_ok, ok = run(app, scenario)
    check_error(too_many, 400, "9 choices", "8", param="n")
    check_error(batch, 400, "9 choices (n=3 for each of 3 prompts)", param="n")
    assert len(batch_ok.json()["choices"]) == 8 and len(ok.json()["choices"]) == 8


def test_max_queue_counts_every_choice(tokenizer):
    engine = FakeEngine(tokenizer)
    app = build_app(engine, served_model_name="m", max_queue=4)
    server = app.state.server

    async def until(condition):
        while not condition():
            await asyncio.sleep(0.01)

    async def scenario(client):
        engine.release = asyncio.Event()
        over = await client.post("/v1/chat/completions", json=chat(n=5))  # could never be admitted
        first = asyncio.create_task(client.post("/v1/chat/completions", json=chat(n=3)))
        await asyncio.wait_for(until(lambda: server.num_waiting == 3), 30)
        busy = await client.post("/v1/chat/completions", json=chat(n=2))  # 3 + 2 > 4
        busy_batch = await client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1})
        second = asyncio.create_task(client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}))
        await asyncio.wait_for(until(lambda: server.num_waiting == 4), 30)
        full = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
        engine.release.set()
        done = [await first, await second]
        return over, busy, busy_batch, full, done, server.num_waiting

    over, busy, busy_batch, full, done, waiting_after = run(app, scenario)
    check_error(over, 400, "5 choices", "--max-queue 4", param="n")
    for refused, waiting in ((busy, 3), (busy_batch, 3), (full, 4)):
        check_error(refused, 429, f"{waiting} requests are waiting", "--max-queue 4")
        assert refused.headers["retry-after"] == "1"
    assert [len(r.json()["choices"]) for r in done] == [3, 1]
    assert waiting_after == 0 and server.metrics.rejected == 3


# ---------------------------------------------------------------- the event loop stays free

@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions", "/tokenize"])
def test_health_answers_while_the_largest_request_is_prepared(tokenizer, endpoint):
    # Tokenizing ~2 MiB of text takes seconds on a CPU; on the event loop, /health waited for all of it.
    limit = 2 * MiB
    app = build_app(FakeEngine(tokenizer), served_model_name="m", max_request_bytes=limit)
    text = "Some ordinary words, and a number 12345. " * ((limit - 1000) // 41)
    body = chat(messages=[{"role": "user", "content": text}]) if endpoint != "/v1/completions" else \
        {"prompt": text, "max_tokens": 1}
    if endpoint == "/tokenize":
        body = {"messages": body["messages"]}

    async def scenario(client):
        big = asyncio.create_task(client.post(endpoint, json=body))
        start, latencies = time.monotonic(), []
        while not big.done():
            # A probe is due every 20 ms; the client shares the server's event loop, so a probe's latency counts
            # from when it was due: a blocked loop delays the sending as much as the answer.
            due = time.monotonic() + 0.02
            await asyncio.sleep(0.02)
            assert (await client.get("/health")).status_code == 200
            latencies.append(time.monotonic() - due)
        return await big, time.monotonic() - start, latencies

    response, elapsed, latencies = run(app, scenario)
    assert response.status_code in (200, 400), response.text  # 400: too long for the context, once tokenized
    # The loop was never held for long: /health answered within a second, and within a third of the time the
    # request took (so that a machine fast enough to tokenize the body in under a second still tests something).
    assert max(latencies) < min(1.0, elapsed / 3), (max(latencies), elapsed)


# ---------------------------------------------------------------- 500s tell an id, not internals

def test_internal_errors_give_an_id_and_log_the_details(tokenizer, caplog):
    engine = FakeEngine(tokenizer)
    app = build_app(engine, served_model_name="m")
    secret = "KeyError: /srv/secret/path token=abc"

    async def scenario(client):
        engine.failure = RuntimeError(secret)
        plain = await client.post("/v1/chat/completions", json=chat())
        streamed = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "stream": True})
        engine.failure = None
        app.state.server.sampling_params = lambda *args, **kwargs: {}["no such key " + secret]  # fails early
        early = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
        tokenize = await client.post("/tokenize", json={"prompt": "a"})
        return plain, streamed, early, tokenize

    with caplog.at_level(logging.ERROR, logger="exaserve.server"):
        plain, streamed, early, tokenize = run(app, scenario)
    assert tokenize.status_code == 200
    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    stream_error = httpx.Response(500, content=events[-2])  # the last event before [DONE] is the error
    for response, prefix in ((plain, "chatcmpl-"), (stream_error, "cmpl-"), (early, "cmpl-")):
        error = check_error(response, 500, param=None)
        assert error["type"] == "InternalServerError"
        match = re.fullmatch(r"internal server error \(request id (\S+)\)", error["message"])
        assert match and match[1].startswith(prefix), error["message"]
        assert "secret" not in response.text and "Error" not in error["message"]
        # the log has the details under the same id
        logged = [r for r in caplog.records if match[1] in r.getMessage()]
        assert logged and secret in str(logged[0].exc_info[1])
