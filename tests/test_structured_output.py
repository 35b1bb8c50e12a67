"""Structured outputs (engine/structured.py, issue 18): the random tiny model never writes JSON by chance, so every
output that parses and validates here was made to by its grammar.

One live server serves the HTTP cases (many requests per format, batched); the engine cases run the offline LLM:
greedy under a grammar with MTP drafts (k=2) equals k=0, the matcher's draft probe and rollback, and the
compile timeout.
"""
import asyncio
import json
import re
import threading

import httpx
import jsonschema
import pytest
import torch

from exaserve.engine import LLM, SamplingParams
from exaserve.engine.structured import Grammars, StructuredOutput, apply_masks
from exaserve.server.parsers import THINK_END

pytest_plugins = ["server_fixture"]

MODEL = "tiny"
N = 50   # requests per format: half streamed, half as the n choices of one request

# Bounded, so that a random model finishes well inside max_tokens: the grammar allows no other way to go on.
# Strings are bounded by a pattern: xgrammar 0.2.9 lets a maxLength string hold raw control characters (which
# strict JSON parsers refuse).
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Za-z]{1,6}$"},
        "rank": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["capital", "port"]},
    },
    "required": ["city", "rank", "kind"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"unit": {"enum": ["C", "F"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["unit", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def server(tiny_model, live_server):
    with live_server(tiny_model, "--dtype", "float32", "--max-num-seqs", "64", "--served-model-name", MODEL) as live:
        yield live


def chat_body(i: int, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Describe city {i} as JSON."}],
            "max_tokens": 120, "temperature": 1.0, "seed": i, **NO_THINKING, **extra}


async def _post(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    response = await client.post(url, json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> list[dict]:
    """The choices of a streamed response, merged: text/content, finish_reason, tool-call pieces."""
    merged: dict[int, dict] = {}
    async with client.stream("POST", url, json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            for choice in event["choices"]:
                out = merged.setdefault(choice["index"], {"text": "", "finish_reason": None, "calls": {}})
                delta = choice.get("delta", choice)
                out["text"] += delta.get("content") or delta.get("text") or ""
                for piece in delta.get("tool_calls") or ():
                    call = out["calls"].setdefault(piece["index"], {"name": None, "arguments": ""})
                    call["name"] = piece["function"].get("name") or call["name"]
                    call["arguments"] += piece["function"].get("arguments") or ""
                out["finish_reason"] = choice["finish_reason"] or out["finish_reason"]
    return [merged[i] for i in sorted(merged)]


def run_many(server, path: str, body_of, count: int = N) -> list[dict]:
    """count outputs of one format: count/2 streamed requests and one request with n = count/2, all at once. Each
    output is {"text", "finish_reason", "calls": [{"name", "arguments"}]}."""
    url = f"{server.url}{path}"

    async def go():
        async with httpx.AsyncClient() as client:
            whole = _post(client, url, {**body_of(0), "n": count // 2})
            streamed = [_stream(client, url, body_of(i)) for i in range(1, count // 2 + 1)]
            return await asyncio.gather(whole, *streamed)

    whole, *streamed = asyncio.run(go())
    outputs = []
    for choice in whole["choices"]:
        message = choice.get("message")
        text = choice["text"] if message is None else (message["content"] or "")
        calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                 for c in (message or {}).get("tool_calls") or ()]
        outputs.append({"text": text, "finish_reason": choice["finish_reason"], "calls": calls})
    for out in streamed:
        (only,) = out
        outputs.append({**only, "calls": [only["calls"][k] for k in sorted(only["calls"])]})
    assert len(outputs) == count
    return outputs


def test_json_schema_outputs_validate(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    outputs = run_many(server, "/v1/chat/completions", lambda i: chat_body(i, response_format=fmt))
    texts = set()
    for out in outputs:
        assert out["finish_reason"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
        texts.add(out["text"])
    assert len(texts) > 1   # sampled, not one fixed answer


def test_structured_outputs_json_on_completions(server):
    def body(i):
        return {"model": MODEL, "prompt": f"City {i}:", "max_tokens": 120, "temperature": 1.0, "seed": i,
                "structured_outputs": {"json": json.dumps(SCHEMA)}}

    for out in run_many(server, "/v1/completions", body):
        assert out["finish_reason"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), SCHEMA)


def test_json_object_outputs_parse(server):
    # Any JSON object may nest and run on: what finishes parses as an object, what max_tokens cuts is "length".
    outputs = run_many(server, "/v1/chat/completions",
                       lambda i: chat_body(i, response_format={"type": "json_object"}, max_tokens=30))
    finished = [out for out in outputs if out["finish_reason"] == "stop"]
    assert all(out["finish_reason"] in ("stop", "length") for out in outputs)
    assert finished
    for out in finished:
        assert isinstance(json.loads(out["text"]), dict)
    for out in outputs:
        assert out["text"].lstrip().startswith("{")


@pytest.mark.parametrize("kind", ["regex", "choice", "grammar"])
def test_regex_choice_grammar(server, kind):
    spec, check = {
        "regex": ("[0-9]{3}-(ab|cd)", lambda t: re.fullmatch("[0-9]{3}-(ab|cd)", t)),
        "choice": (["Seoul", "Busan", "Incheon port"], lambda t: t in ("Seoul", "Busan", "Incheon port")),
        "grammar": ('root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?',
                    lambda t: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", t)),
    }[kind]
    outputs = run_many(server, "/v1/completions", lambda i: {
        "model": MODEL, "prompt": f"Answer {i}:", "max_tokens": 40, "temperature": 1.0, "seed": i,
        "structured_outputs": {kind: spec}})
    for out in outputs:
        if kind == "grammar" and out["finish_reason"] == "length":   # "+" may repeat past max_tokens
            assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\+?", out["text"]), out
            continue
        assert out["finish_reason"] == "stop" and check(out["text"]), out
    if kind == "choice":
        assert len({out["text"] for out in outputs}) > 1


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_calls_validate(server, choice):
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "get_time"}}
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    # fewer: the tool declarations make long prompts
    outputs = run_many(server, "/v1/chat/completions",
                       lambda i: chat_body(i, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False), 24)
    names = set()
    for out in outputs:
        assert out["finish_reason"] == "tool_calls", out
        (call,) = out["calls"]
        names.add(call["name"])
        jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
        assert not out["text"]
    if choice == "named":
        assert names == {"get_time"}
    else:
        assert names <= set(schemas)


def test_constraint_starts_after_reasoning(server):
    """Thinking on: the reasoning is free and the constraint starts after </think> (the bias writes it at once;
    inside the constrained part the grammar forbids it again)."""
    think_end = httpx.post(f"{server.url}/tokenize", json={"prompt": THINK_END, "add_special_tokens": False}
                           ).json()["tokens"]
    assert len(think_end) == 1
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Pick a city."}], "max_tokens": 30,
            "temperature": 1.0, "seed": 3, "logit_bias": {str(think_end[0]): 100}, "n": 8,
            "structured_outputs": {"choice": ["Seoul", "Busan"]}}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).json()
    for choice in response["choices"]:
        assert choice["finish_reason"] == "stop"
        assert choice["message"]["content"] in ("Seoul", "Busan")
        assert not choice["message"]["reasoning_content"]


def test_logprobs_stop_strings_and_length(server):
    body = {"model": MODEL, "prompt": "Go:", "max_tokens": 40, "temperature": 1.0, "seed": 5, "logprobs": 3,
            "structured_outputs": {"regex": "(ab){1,5}cd"}, "n": 4}
    for choice in httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()["choices"]:
        assert re.fullmatch("(ab){1,5}cd", choice["text"]) and choice["finish_reason"] == "stop"
        # the mask is applied before sampling: the sampled tokens are likely under it, masked ones have -inf
        assert all(lp > float("-inf") for lp in choice["logprobs"]["token_logprobs"])
    cut = httpx.post(f"{server.url}/v1/completions", json={**body, "stop": ["cd"], "logprobs": None}).json()
    assert all(c["finish_reason"] == "stop" and re.fullmatch("(ab){1,5}", c["text"]) for c in cut["choices"])
    short = httpx.post(f"{server.url}/v1/completions", json={
        **body, "logprobs": None, "max_tokens": 3, "structured_outputs": {"regex": "[a-z]{30}"}}).json()
    assert all(c["finish_reason"] == "length" for c in short["choices"])


@pytest.mark.parametrize("body, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "nope"),
    ({"structured_outputs": {"regex": "[a-"}}, "regex"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "undefined_rule"),
    ({"structured_outputs": {"choice": []}}, "choice"),
    ({"structured_outputs": {"json": "{not json"}}, "JSON"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
])
def test_invalid_specs_are_400_and_the_server_keeps_serving(server, body, message):
    response = httpx.post(f"{server.url}/v1/chat/completions", json={**chat_body(0), **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert message.lower() in response.json()["error"]["message"].lower()
    ok = httpx.post(f"{server.url}/v1/chat/completions", json={**chat_body(1), "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


# ---------------------------------------------------------------- engine

@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from exaserve.engine.tokenizer import Tokenizer
    return Tokenizer.from_pretrained(tiny_model)


def test_greedy_with_mtp_drafts_equals_plain_under_a_grammar(tiny_model):
    prompts = [[1, 300 + 7 * i, 400 + i, 500] for i in range(6)]
    specs = [StructuredOutput(json=SCHEMA), StructuredOutput(regex="[a-z]{2,6}( [a-z]{2,6}){1,3}")]
    outs = {}
    for k in (0, 2):
        llm = LLM(str(tiny_model), dtype="float32", max_num_seqs=8, num_speculative_tokens=k)
        params = [SamplingParams(max_tokens=60, temperature=0, structured_outputs=specs[i % 2]) for i in range(6)]
        outs[k] = [o.outputs[0] for o in llm.generate(prompts, params)]
        if k:
            stats = llm.engine.stats()
            assert stats["drafts_proposed"] > 0
            # drafts the grammar forbids are rejected: the MTP block of a random model drafts free text
            assert stats["drafts_accepted"] < stats["drafts_proposed"]
        llm.engine.close()
    assert [o.token_ids for o in outs[2]] == [o.token_ids for o in outs[0]]
    for i, o in enumerate(outs[0]):
        assert o.finish_reason == "stop"
        if i % 2 == 0:
            jsonschema.validate(json.loads(o.text), SCHEMA)
        else:
            assert re.fullmatch("[a-z]{2,6}( [a-z]{2,6}){1,3}", o.text)


def test_greedy_rows_under_a_grammar_take_the_one_call_step(tiny_model, monkeypatch):
    """On the C++ path, greedy rows under a grammar stay in the one-call step: their masks go into the call and
    the argmax (screened, or over every logit) is of the allowed tokens. Tokens equal the Python path's
    (logits, then xgrammar's mask, then the sampler), in a batch with an unconstrained row."""
    prompts = [[1, 300 + 7 * i, 400 + i, 500] for i in range(4)]
    params = [SamplingParams(max_tokens=60, temperature=0, structured_outputs=StructuredOutput(json=SCHEMA)),
              SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=60, temperature=0,
                             structured_outputs=StructuredOutput(regex="[a-z]{2,6}( [a-z]{2,6}){1,3}")),
              SamplingParams(max_tokens=60, temperature=0,
                             structured_outputs=StructuredOutput(choice=("Seoul", "Busan")))]
    llm = LLM(str(tiny_model), dtype="float32", max_num_seqs=8)
    runner = llm.engine.runner
    cpu_model = runner.cpu_model
    assert cpu_model is not None and len(cpu_model.screen) == 3
    masks = []
    rows_step = cpu_model.rows_step

    def spy(*a):
        masks.append((a[5], a[7] if len(a) > 7 else None))
        return rows_step(*a)

    def run(patch):
        masks.clear()
        with monkeypatch.context() as m:
            patch(m)
            return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]

    try:
        fused = run(lambda m: m.setattr(cpu_model, "rows_step", spy))
        assert masks and all(argmax for argmax, _ in masks)           # every step: the argmax in C++ ...
        assert sum(mask is not None for _, mask in masks) >= 10        # ... with the grammars' masks
        unscreened = run(lambda m: (m.setattr(cpu_model, "screen", ()), m.setattr(cpu_model, "rows_step", spy)))
        assert masks and all(mask is not None for _, mask in masks[:5])
        python = run(lambda m: m.setattr(runner, "cpu_model", None))
        assert not masks
    finally:
        llm.engine.close()
    for outs in (unscreened, python):
        assert [o.token_ids for o in outs] == [o.token_ids for o in fused]
    jsonschema.validate(json.loads(fused[0].text), SCHEMA)
    assert re.fullmatch("[a-z]{2,6}( [a-z]{2,6}){1,3}", fused[2].text) and fused[3].text in ("Seoul", "Busan")
    assert fused[1].finish_reason == "length" and len(fused[1].token_ids) == 40


def test_a_complete_output_stops_before_min_tokens(tiny_model):
    """Once the grammar allows only the stop token, the request stops there even short of min_tokens (which would
    otherwise mask the stop token too and leave nothing to sample), greedy and sampled; other requests keep
    min_tokens."""
    for k in (0, 1):   # plain decoding, and MTP's verification
        llm = LLM(str(tiny_model), dtype="float32", max_num_seqs=4, num_speculative_tokens=k)
        try:
            choice = StructuredOutput(choice=("Seoul", "Busan"))
            params = [SamplingParams(max_tokens=30, temperature=t, seed=1, min_tokens=10, structured_outputs=choice)
                      for t in (0.0, 1.0)] + [SamplingParams(max_tokens=30, temperature=0, min_tokens=12)]
            outs = [o.outputs[0] for o in llm.generate([[1, 300, 301]] * 3, params, use_tqdm=False)]
        finally:
            llm.engine.close()
        for out in outs[:2]:
            assert out.finish_reason == "stop" and out.text in ("Seoul", "Busan"), (k, out)
        assert len(outs[2].token_ids) >= 12


def test_tensor_parallel_samples_under_the_grammar_as_one_rank(tiny_model):
    """tp=2: the matchers and masks live on rank 0, where sampling happens; the tokens are those of one rank."""
    prompts = [[1, 310 + 9 * i, 420 + i] for i in range(4)]
    params = [SamplingParams(max_tokens=120, temperature=0, structured_outputs=StructuredOutput(json=SCHEMA)),
              SamplingParams(max_tokens=48, temperature=1.0, seed=4,
                             structured_outputs=StructuredOutput(choice=("Seoul", "Busan", "Daegu")))] * 2
    outs = {}
    for tp in (1, 2):
        llm = LLM(str(tiny_model), dtype="float32", max_num_seqs=4, tensor_parallel_size=tp)
        try:
            outs[tp] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.engine.close()
    assert [o.token_ids for o in outs[2]] == [o.token_ids for o in outs[1]]
    for i, o in enumerate(outs[2]):
        assert o.finish_reason == "stop"
        if i % 2 == 0:
            jsonschema.validate(json.loads(o.text), SCHEMA)
        else:
            assert o.text in ("Seoul", "Busan", "Daegu")


def test_async_engine_compiles_off_its_event_loop(tiny_model):
    """AsyncEngine.add_request with a grammar it has not compiled yet: compiled in a thread, then served; an invalid
    one raises ValueError with the library's message."""
    from exaserve.engine import AsyncEngine
    engine = AsyncEngine(str(tiny_model), dtype="float32", max_num_seqs=4)

    async def main():
        params = SamplingParams(max_tokens=20, temperature=1.0, seed=2,
                                structured_outputs=StructuredOutput(regex="[0-9]{4}"))
        text = "".join([d.text async for d in engine.add_request("r0", [1, 300, 301], params)])
        with pytest.raises(ValueError, match="Unclosed"):
            bad = SamplingParams(max_tokens=5, structured_outputs=StructuredOutput(regex="[0-"))
            async for _ in engine.add_request("r1", [1, 300, 301], bad):
                pass
        return text

    try:
        assert re.fullmatch("[0-9]{4}", asyncio.run(main()))
    finally:
        engine.shutdown()


def test_draft_probe_masks_the_first_rejected_draft_and_rolls_back(tokenizer):
    grammars = Grammars(tokenizer, 1024, [53])
    state = grammars.state(StructuredOutput(choice=("abc",)))
    a, b = tokenizer.encode("a"), tokenizer.encode("b")
    assert len(a) == len(b) == 1
    logits = torch.zeros(4, 1024)
    # drafts: "a" is allowed, "a" again is not: rows 0 and 1 get masks, row 1 forbids the second "a", rows 2-3 stay
    apply_masks(logits, [(0, state, [a[0], a[0], b[0]])])
    assert logits[0, a[0]] == 0 and logits[0, b[0]] == float("-inf")
    assert logits[1, a[0]] == float("-inf") and logits[1, b[0]] == 0
    assert bool((logits[2:] == 0).all())
    # the probe left the matcher where it was: "a" is still the only way on
    state.accept(a[0])
    with pytest.raises(RuntimeError, match="does not match"):
        state.accept(a[0])
    grammars.close()


def test_start_after_leaves_output_free_until_the_trigger(tokenizer):
    grammars = Grammars(tokenizer, 1024, [53])
    (end,) = tokenizer.encode(THINK_END)
    state = grammars.state(StructuredOutput(regex="x", start_after=(end,)))
    free = tokenizer.encode("hello")
    logits = torch.zeros(3, 1024)
    apply_masks(logits, [(0, state, [free[0], end])])   # free, free, then constrained after the trigger
    assert bool((logits[:2] == 0).all()) and int((logits[2] == 0).sum()) == 1
    for t in [*free, end]:
        state.accept(t)
    assert state.active and not state.terminated
    grammars.close()


def test_a_slow_compile_is_refused(tokenizer, monkeypatch):
    gate = threading.Event()
    grammars = Grammars(tokenizer, 1024, [53], compile_timeout=0.05)
    monkeypatch.setattr(grammars, "_compile", lambda spec: gate.wait(30))
    with pytest.raises(ValueError, match="took longer than"):
        grammars.compile(StructuredOutput(regex="slow"))
    gate.set()
    grammars.close()
