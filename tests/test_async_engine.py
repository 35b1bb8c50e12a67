"""AsyncEngine: concurrent streams equal the offline results; leaving a stream early aborts its request."""
import asyncio

import pytest

from exaserve.engine import LLM, AsyncEngine, SamplingParams
from exaserve.engine.async_engine import EngineDeadError, RequestFailedError
from exaserve.engine.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_async")))


def test_concurrent_streams_match_offline_and_abort_frees(tiny):
    prompts = [[60 + i, 70 + 2 * i, 80] * (1 + i % 5) for i in range(12)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    offline = [o.outputs[0].token_ids for o in LLM(tiny, dtype="float32").generate(prompts, params)]
    engine = AsyncEngine(tiny, dtype="float32", max_num_seqs=8, max_num_batched_tokens=32)

    async def collect(i, p):
        ids, text, last = [], [], None
        async for d in engine.add_request(f"r{i}", p, params):
            ids += d.token_ids
            text.append(d.text)
            last = d
        assert last.finished and last.finish_reason == "length" and last.num_output_tokens == 10
        return ids

    async def leave_early():
        async for d in engine.add_request("leaver", [5, 6, 7], SamplingParams(max_tokens=500, ignore_eos=True)):
            if d.num_output_tokens >= 3:
                break

    async def main():
        results = await asyncio.gather(*(collect(i, p) for i, p in enumerate(prompts)), leave_early())
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in engine.add_request("too-long", [5] * 10, SamplingParams(max_tokens=10 ** 6)):
                pass
        for _ in range(200):                 # the abort reaches the engine thread asynchronously
            s = engine.stats()
            if s["aborted"] == 1 and s["running"] == 0:
                break
            await asyncio.sleep(0.02)
        return results[:-1]

    try:
        assert asyncio.run(main()) == offline
        s = engine.stats()
        assert s["aborted"] == 1 and s["blocks_used"] == 0 and s["ring_slots_used"] == 0
    finally:
        engine.shutdown()


def test_outputs_are_handed_over_as_the_next_step_computes(tiny):
    """A step's outputs reach the event loop when the next step enters the model, or as the engine goes idle:
    never later, and never after a later step's outputs."""
    engine = AsyncEngine(tiny, dtype="float32", max_num_seqs=4)
    events = []
    step, runner = engine.core.step, engine.core.runner
    engine.core.step = lambda before_forward=None: events.append("step") or step(before_forward)
    # the model runs through one of them (rows_step: the whole step in one C++ call)
    for owner, name in [(runner, "forward"), *([(runner.cpu_model, "rows_step")] if runner.cpu_model else [])]:
        run = getattr(owner, name)
        setattr(owner, name, lambda *a, run=run, **k: events.append("forward") or run(*a, **k))

    async def one(rid, n):
        seen = []
        async for d in engine.add_request(rid, [5, 6, 7], SamplingParams(max_tokens=n, ignore_eos=True)):
            events.append(f"out {rid} {d.num_output_tokens}")
            seen.append(d.num_output_tokens)
        return seen

    async def main():
        return await asyncio.gather(one("a", 5), one("b", 1))

    try:
        a, b = asyncio.run(main())
    finally:
        engine.shutdown()
    assert a == [1, 2, 3, 4, 5] and b == [1]      # in order, none lost, the last one too (engine idle after)
    # token j of "a" (made by forward j) is handed over inside forward j + 1; the 5th, after which the engine
    # is idle, as the engine goes idle
    forwards = [i for i, e in enumerate(events) if e == "forward"]
    outs = [i for i, e in enumerate(events) if e.startswith("out a")]
    assert len(forwards) == 5 and len(outs) == 5
    assert all(forwards[j + 1] < outs[j] for j in range(4)) and forwards[4] < outs[4]


async def _tokens(engine, rid, n=3):
    out = []
    async for d in engine.add_request(rid, [5, 6, 7], SamplingParams(max_tokens=n, ignore_eos=True)):
        out += d.token_ids
    return out


def test_a_fault_while_adding_one_request_fails_only_that_request(tiny):
    engine = AsyncEngine(tiny, dtype="float32", max_num_seqs=4)
    add = engine.core.add_request

    def faulty(rid, *args, **kwargs):
        if rid == "bad":
            raise TypeError("injected fault")
        return add(rid, *args, **kwargs)

    engine.core.add_request = faulty

    async def main():
        bad, good = await asyncio.gather(_tokens(engine, "bad"), _tokens(engine, "good"), return_exceptions=True)
        return bad, good, await _tokens(engine, "after")

    try:
        bad, good, after = asyncio.run(main())
        assert isinstance(bad, RuntimeError) and "TypeError: injected fault" in str(bad)
        assert len(good) == 3 and len(after) == 3 and engine.is_healthy()
    finally:
        engine.shutdown()


def test_a_request_that_fails_in_a_step_fails_alone(tiny):
    """NaN logits for one request (a fault in its sampling): its stream raises RequestFailedError (a 500, not a 400:
    no ValueError), the requests that shared its steps finish with their own tokens."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    offline = [o.outputs[0].token_ids for o in LLM(tiny, dtype="float32").generate(prompts, params)]
    engine = AsyncEngine(tiny, dtype="float32", max_num_seqs=4)
    bad = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
    sample = engine.core.runner.sampler

    def faulty(logits, rows):
        rows_bad = [i for i, row in enumerate(rows) if row.params is bad]
        if rows_bad:
            logits = logits.clone()
            logits[rows_bad, 0] = float("nan")
        return sample(logits, rows)

    engine.core.runner.sampler = faulty

    async def run(rid, prompt, p):
        out = []
        async for d in engine.add_request(rid, prompt, p):
            out += d.token_ids
        return out

    async def main():
        results = await asyncio.gather(*(run(f"r{i}", q, params) for i, q in enumerate(prompts)),
                                       run("bad", [20, 21], bad), return_exceptions=True)
        return results, await run("after", prompts[0], params)

    try:
        results, after = asyncio.run(main())
        assert results[:3] == offline and after == offline[0]
        assert isinstance(results[3], RequestFailedError) and not isinstance(results[3], ValueError)
        assert "FloatingPointError" in str(results[3]) and "NaN" in str(results[3])
        s = engine.stats()
        assert engine.is_healthy() and s["failed"] == 1 and s["blocks_used"] == 0 and s["ring_slots_used"] == 0
    finally:
        engine.shutdown()


def test_a_fault_of_a_whole_step_fails_its_requests_not_the_engine(tiny):
    engine = AsyncEngine(tiny, dtype="float32", max_num_seqs=4)
    runner = engine.core.runner
    owner, name = (runner.cpu_model, "rows_step") if runner.cpu_model is not None else (runner, "forward")
    run = getattr(owner, name)
    faults = [RuntimeError("injected forward fault")]

    def forward_failing_once(*args, **kwargs):
        if faults:
            raise faults.pop()
        return run(*args, **kwargs)

    setattr(owner, name, forward_failing_once)

    async def main():
        first = await asyncio.gather(_tokens(engine, "a"), _tokens(engine, "b"), return_exceptions=True)
        return first, await _tokens(engine, "after")

    try:
        first, after = asyncio.run(main())
        # "a" is in the first step; "b" too, unless the engine thread took the step before "b" reached it
        assert isinstance(first[0], RequestFailedError) and "RuntimeError: injected forward fault" in str(first[0])
        assert isinstance(first[1], RequestFailedError) or len(first[1]) == 3
        s = engine.stats()
        assert s["failed"] == sum(isinstance(e, RequestFailedError) for e in first) and s["aborted"] == 0
        assert len(after) == 3 and engine.is_healthy() and s["blocks_used"] == 0
    finally:
        engine.shutdown()


def test_a_dead_engine_thread_fails_every_request_and_reports_unhealthy(tiny):
    engine = AsyncEngine(tiny, dtype="float32", max_num_seqs=4)
    engine.core.has_unfinished = lambda: (_ for _ in ()).throw(MemoryError("injected"))

    async def main():
        first = await asyncio.gather(_tokens(engine, "a", n=50), return_exceptions=True)
        with pytest.raises(EngineDeadError, match="MemoryError"):
            await _tokens(engine, "b")
        return first[0]

    try:
        failed = asyncio.run(main())
        assert isinstance(failed, EngineDeadError) and not engine.is_healthy()
    finally:
        engine.shutdown()


def test_num_waiting_counts_requests_not_yet_scheduled(tiny):
    """The queue --max-queue bounds: requests sent but not yet running, not running ones without a token yet."""
    engine = AsyncEngine(tiny, dtype="float32", max_num_seqs=1)
    params = SamplingParams(max_tokens=400, ignore_eos=True)
    seen = []

    async def main():
        first = asyncio.Event()

        async def consume(i):
            async for _ in engine.add_request(f"q{i}", [5, 6, 7 + i], params):
                first.set()

        tasks = [asyncio.create_task(consume(i)) for i in range(3)]
        await asyncio.sleep(0)
        seen.append(engine.num_waiting())         # all three sent, at most one taken so far
        await first.wait()
        seen.append(engine.num_waiting())          # one runs (one seat), two wait
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(200):
            if engine.stats()["running"] == 0 and engine.num_waiting() == 0:
                break
            await asyncio.sleep(0.02)
        seen.append(engine.num_waiting())

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert seen[0] >= 2 and seen[1] == 2 and seen[2] == 0
