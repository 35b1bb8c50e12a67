"""AsyncEngine: concurrent streams equal the offline results; leaving a stream early aborts its request."""
import asyncio

import pytest

from exaserve.engine import LLM, AsyncEngine, SamplingParams
from exaserve.engine.async_engine import EngineDeadError
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
