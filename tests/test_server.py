"""The OpenAI-compatible server through the official openai client, against a live server on the tiny checkpoint."""
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from exaserve.cli import builtin_tiny_checkpoint
from exaserve.engine import LLM, SamplingParams
from exaserve.engine.chat_template import prompt_ends_in_reasoning, render_chat
from exaserve.engine.tiny import make_tiny_checkpoint
from exaserve.server.parsers import THINK_END, THINK_START, TOOL_END, TOOL_START, parse_full

pytest_plugins = ["server_fixture"]

MODEL = "tiny"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tiny_model, live_server):
    with live_server(tiny_model, "--dtype", "float32", "--max-num-seqs", "64", "--served-model-name", MODEL) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


@pytest.fixture(scope="module")
def offline(tiny_model):
    return LLM(str(tiny_model), dtype="float32", max_num_seqs=1)


def visible(llm, raw: str) -> str:
    """What the server shows of raw output text by default: special-token strings removed, parser tags kept."""
    tok = llm.tokenizer
    special = {tok.id_to_token(i) for i in tok.special_ids} - {THINK_START, THINK_END, TOOL_START, TOOL_END}
    return re.sub("|".join(map(re.escape, sorted(special, key=len, reverse=True))), "", raw)


def offline_chat(llm, messages, max_tokens, **template_kwargs):
    """(prompt ids, parsed output) of greedy decoding by the offline engine."""
    prompt = render_chat(llm.tokenizer.chat_template, messages, **template_kwargs)
    ids = llm.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, skip_special_tokens=False)
    raw = llm.generate([ids], params)[0].outputs[0].text
    return ids, parse_full(visible(llm, raw), starts_in_reasoning=prompt_ends_in_reasoning(prompt), parse_tools=False)


def offline_text(llm, ids, max_tokens) -> str:
    return llm.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0].outputs[0].text


def ask(i=0):
    return [{"role": "user", "content": f"Tell me about Seoul, part {i}."}]


def reasoning_of(message):
    return getattr(message, "reasoning_content", None)


def test_models_health_version_tokenize(server, client, offline):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    missing = httpx.get(f"{server.url}/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"
    unknown = httpx.get(f"{server.url}/v1/no-such-route")
    assert unknown.status_code == 404 and unknown.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello there"}).json()
    assert tokens["tokens"] == offline.tokenizer.encode("Hello there", add_special_tokens=True)
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 4096
    chat_ids = httpx.post(f"{server.url}/tokenize", json={"messages": ask()}).json()["tokens"]
    assert chat_ids == offline_chat(offline, ask(), 1)[0]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": chat_ids}).json()["prompt"]
    assert text == render_chat(offline.tokenizer.chat_template, ask())


@pytest.mark.parametrize("thinking", [True, False])
def test_greedy_chat_equals_offline_engine(client, offline, thinking):
    extra = {} if thinking else {"chat_template_kwargs": {"enable_thinking": False}}
    response = client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=12, temperature=0,
                                              extra_body={"ignore_eos": True, **extra})
    ids, expected = offline_chat(offline, ask(), 12, **({} if thinking else {"enable_thinking": False}))
    (choice,) = response.choices
    assert (reasoning_of(choice.message), choice.message.content) == (expected.reasoning, expected.content)
    assert getattr(choice.message, "reasoning", None) == expected.reasoning
    assert choice.finish_reason == "length"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (
        len(ids), 12, len(ids) + 12)
    # With thinking on the output starts inside <think>; with it off there is no reasoning at all.
    assert (expected.reasoning is not None) == thinking


def collect_chat_stream(stream):
    """Per choice index: reasoning, content, finish_reason, and the order of delta kinds; plus the usage."""
    choices, usage = {}, None
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for c in chunk.choices:
            state = choices.setdefault(c.index, {"reasoning": "", "content": "", "kinds": [], "finish": None,
                                                 "role": None})
            state["role"] = state["role"] or c.delta.role
            if reasoning_of(c.delta):
                state["reasoning"] += reasoning_of(c.delta)
                state["kinds"].append("reasoning")
            if c.delta.content:
                state["content"] += c.delta.content
                state["kinds"].append("content")
            if c.finish_reason:
                state["finish"] = c.finish_reason
    return choices, usage


def test_streaming_chat_equals_non_streaming(client):
    kwargs = dict(model=MODEL, messages=ask(1), max_tokens=24, **GREEDY)
    full = client.chat.completions.create(**kwargs)
    choices, usage = collect_chat_stream(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs))
    state = choices[0]
    message = full.choices[0].message
    assert (state["reasoning"] or None, state["content"] or None) == (reasoning_of(message), message.content)
    assert state["role"] == "assistant" and state["finish"] == full.choices[0].finish_reason == "length"
    kinds = state["kinds"]
    assert kinds == sorted(kinds, key=lambda kind: kind == "content")  # all reasoning deltas come first
    details = {"prompt_tokens_details"}
    assert usage.model_dump(exclude=details) == full.usage.model_dump(exclude=details)
    # the second request found the first one's prompt in the prefix cache (all but its last, partial block)
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16


def test_completions_with_token_id_prompts_equal_offline_engine(client, offline):
    prompts = [[5, 80, 81, 300], [7, 200, 201, 202, 203, 9]]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, **GREEDY)
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text for c in response.choices] == [offline_text(offline, ids, 6) for ids in prompts]
    assert [c.finish_reason for c in response.choices] == ["length", "length"]
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (10, 12)

    single = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=6, **GREEDY)
    assert single.choices[0].text == response.choices[1].text
    text = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, **GREEDY)
    ids = offline.tokenizer.encode("Hello there", add_special_tokens=True)
    assert text.choices[0].text == offline_text(offline, ids, 6)
    assert text.usage.prompt_tokens == len(ids)


def test_streaming_completions_with_usage(client):
    kwargs = dict(model=MODEL, prompt=[[11, 12, 13], [14, 15]], max_tokens=5, n=2, **GREEDY)
    full = client.completions.create(**kwargs)
    texts, finish, usage = {}, {}, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert [texts[i] for i in range(4)] == [c.text for c in full.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: n copies of one answer per prompt
    assert set(finish.values()) == {"length"}
    assert (usage.prompt_tokens, usage.completion_tokens) == (5, 20) == (full.usage.prompt_tokens,
                                                                         full.usage.completion_tokens)


def test_n2_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=MODEL, messages=ask(2), max_tokens=10, temperature=1.0)

    def answers(response):
        return [(reasoning_of(c.message), c.message.content) for c in sorted(response.choices, key=lambda c: c.index)]

    first = client.chat.completions.create(n=2, seed=7, **kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert 2 <= first.usage.completion_tokens <= 20
    assert answers(client.chat.completions.create(n=2, seed=7, **kwargs)) == answers(first)
    # Choice i samples with seed + i: the second choice is a solo request seeded 8.
    assert answers(client.chat.completions.create(n=1, seed=8, **kwargs)) == answers(first)[1:]

    choices, _ = collect_chat_stream(client.chat.completions.create(n=2, seed=7, stream=True, **kwargs))
    assert [(choices[i]["reasoning"] or None, choices[i]["content"] or None) for i in range(2)] == answers(first)


def test_stop_strings(client):
    kwargs = dict(model=MODEL, prompt=[[21, 22, 23, 24]], **GREEDY)
    text = client.completions.create(max_tokens=16, **kwargs).choices[0].text
    start = next(i for i in range(3, len(text) - 3) if all(c.isprintable() and c != "\ufffd" for c in text[i:i + 3]))
    stop = text[start:start + 3]
    stopped = client.completions.create(max_tokens=16, stop=[stop], **kwargs).choices[0]
    assert (stopped.text, stopped.finish_reason) == (text[:text.find(stop)], "stop")


def test_logprobs(client):
    chat = client.chat.completions.create(model=MODEL, messages=ask(3), max_tokens=5, logprobs=True,
                                          top_logprobs=3, **GREEDY)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == 5
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy picks the most likely token
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                  reverse=True)

    text = client.completions.create(model=MODEL, prompt=[[31, 32, 33]], max_tokens=4, logprobs=2, **GREEDY)
    logprobs = text.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 4
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0


def test_64_simultaneous_streams_each_equal_their_solo_output(server, offline):
    async def one(client, i):
        stream = await client.chat.completions.create(model=MODEL, messages=ask(100 + i % 16), max_tokens=8,
                                                      stream=True, **GREEDY)
        reasoning, content, finish = "", "", None
        async for chunk in stream:
            for c in chunk.choices:
                reasoning += reasoning_of(c.delta) or ""
                content += c.delta.content or ""
                finish = c.finish_reason or finish
        return reasoning or None, content or None, finish

    async def all_streams():
        async with server.openai(async_client=True) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(all_streams())
    # 16 different conversations, each sent 4 times: a mix-up between sequences of the batch shows, and the
    # solo references (one engine step per token on the CPU) stay cheap.
    solo = [offline_chat(offline, ask(100 + i), 8)[1] for i in range(16)]
    assert results == [(solo[i % 16].reasoning, solo[i % 16].content, "length") for i in range(64)]


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_client_disconnect_aborts_the_request(server):
    before = server.metrics()["exaserve_request_aborts_total"]
    body = {"model": MODEL, "prompt": [41, 42, 43], "max_tokens": 3000, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the request is running: it sent a token
    wait_for(lambda: server.metrics()["exaserve_request_aborts_total"] == before + 1)

    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.0)
    wait_for(lambda: server.metrics()["exaserve_request_aborts_total"] == before + 2)
    metrics = server.metrics()
    assert metrics["exaserve_num_requests_running"] == metrics["exaserve_num_requests_waiting"] == 0
    assert metrics["exaserve_kv_blocks_used"] == metrics["exaserve_ring_slots_used"] == 0


def test_metrics_exposition(server):
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("exaserve_time_to_first_token_seconds", "exaserve_time_per_output_token_seconds",
                 "exaserve_e2e_request_latency_seconds"):
        assert f"# TYPE {name} histogram" in text
        assert re.search(rf'^{name}_bucket{{le="\+Inf"}} [1-9]', text, re.MULTILINE)
    metrics = server.metrics()
    assert metrics["exaserve_generation_tokens_total"] > 0 and metrics["exaserve_prompt_tokens_total"] > 0
    assert metrics["exaserve_preemptions_total"] == 0


def test_without_model_the_builtin_tiny_checkpoint_is_made_once_and_served(live_server, tmp_path, monkeypatch):
    with live_server(None, "--dtype", "float32", env={"XDG_CACHE_HOME": str(tmp_path)}) as server:
        assert [m.id for m in server.openai().models.list().data] == ["exaserve-tiny"]
        log = server.log()
    (checkpoint,) = (tmp_path / "exaserve").iterdir()
    assert f"built-in tiny random checkpoint at {checkpoint}" in log
    assert re.search(r"KV pools: \d+ blocks x 16 tokens .* MiB\), \d+ ring slots x \d+ tokens .* MiB\)", log)
    assert re.search(r"on cpu: float32 weights \(\d+\.\d MiB\), float32 activations and KV cache, (cpu|torch) "
                     r"kernels, \d+ threads", log)
    assert re.search(r"Serving 'exaserve-tiny' on http://127\.0\.0\.1:\d+", log)
    made = (checkpoint / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert builtin_tiny_checkpoint() == checkpoint  # the next start reuses it
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == made


def test_cli_refuses_a_missing_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "exaserve.cli", "serve", "--model", str(tmp_path / "none")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode != 0 and "cannot serve" in result.stderr


def test_speculative_decoding_server_equals_plain_and_exports_metrics(tiny_model, live_server, offline):
    """--num-speculative-tokens 2: greedy completions equal the plain engine's, and /metrics shows the MTP
    counters (the tiny checkpoint's MTP block is random, so few drafts are accepted)."""
    with live_server(tiny_model, "--dtype", "float32", "--num-speculative-tokens", "2") as live:
        client = live.openai()
        for prompt in ([5, 6, 7, 8], [100, 200, 300]):
            got = client.completions.create(model=str(tiny_model), prompt=prompt, max_tokens=12, **GREEDY)
            assert got.choices[0].text == offline_text(offline, prompt, 12)
        samples = live.metrics()
        assert samples["exaserve_spec_drafts_proposed_total"] > 0
        assert 0 <= samples["exaserve_spec_drafts_accepted_total"] <= samples["exaserve_spec_drafts_proposed_total"]
        assert 'exaserve_spec_acceptance_rate{position="2"}' in httpx.get(f"{live.url}/metrics").text
    with pytest.raises(RuntimeError, match="MTP block"):
        no_mtp = make_tiny_checkpoint(Path(tempfile.mkdtemp()), with_mtp=False)
        with live_server(no_mtp, "--num-speculative-tokens", "1"):
            pass
