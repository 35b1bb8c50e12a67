"""Asynchronous front of the engine: requests come from asyncio, steps run in one background thread.

The event loop never waits on a model step: adds and aborts go through an inbox that the engine thread
drains between steps, and outputs come back with one `call_soon_threadsafe` per loop per step.

A step's outputs are handed to the event loop when the next step enters the model (the GIL is free for the
milliseconds the C++/torch kernels run), not as the step ends: handed over at once, the event loop's work on them
(JSON, SSE, socket writes) would hold the GIL exactly while the engine thread runs the next step's Python
(scheduling, inputs), and each would wait on the other (measured: input preparation 0.15 -> 0.55 ms per step
at concurrency 1 over HTTP). The delay this adds is the next step's scheduling, a fraction of a millisecond.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import defaultdict
from typing import AsyncIterator

import torch

from exaserve.engine import envs
from exaserve.engine.config import EngineConfig
from exaserve.engine.distributed import WorkerError
from exaserve.engine.engine_core import EngineCore
from exaserve.engine.outputs import DeltaOutput
from exaserve.engine.sampling_params import SamplingParams

log = logging.getLogger("exaserve.engine")


class EngineDeadError(RuntimeError):
    """The engine thread has stopped on an error: no request can run any more (the process should restart)."""


class RequestFailedError(RuntimeError):
    """An internal fault failed this request (its sampling, its output, or the step it was in); the engine goes on
    serving the others. Not a ValueError: the request itself was valid (an HTTP server answers 500, not 400)."""


class AsyncEngine:
    def __init__(self, model: str | EngineConfig, *, env: envs.Env | None = None, **engine_args):
        """model: a checkpoint directory, with EngineConfig's options as keyword arguments (enable_prefix_caching=False
        turns the prefix cache off); or an EngineConfig. env: the EXASERVE_* settings when the caller has read them
        already. The config is validated here, in the caller's thread; the engine is built in the engine thread."""
        config = EngineConfig.of(model, engine_args)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._adds_pending, self._adds_lock = 0, threading.Lock()   # requests sent that the engine has not taken
        self._stopped = False
        self.failure: BaseException | None = None   # what stopped the engine thread, if anything did
        # The model is built inside the engine thread, so that thread is the only one that ever runs tensor
        # work: a second thread with its own OpenMP team halves CPU speed (measured 2x per step).
        ready, failure = threading.Event(), []

        def start():
            try:
                self.core = EngineCore(config, env)
            except BaseException as e:  # handed to the constructor's caller
                failure.append(e)
                return
            finally:
                ready.set()
            try:
                self._run()
            except BaseException as e:  # nothing may leave requests waiting on a thread that is gone
                log.exception("the engine thread stopped")
                self.failure = e
                dead = EngineDeadError(f"the engine stopped: {type(e).__name__}: {e}")
                for rid in list(self._streams):
                    self._post(rid, dead)
            finally:
                self.core.close()   # tensor-parallel workers end with the engine thread

        self._thread = threading.Thread(target=start, name="exaserve-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        self.tokenizer = self.core.tokenizer
        self.model_config = self.core.model_config
        self.max_model_len = self.core.max_model_len
        self.generation_defaults = self.core.generation_defaults

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError (with a clear message) for a request that can never run."""
        self.core.validate(prompt_token_ids, params)

    def describe(self) -> dict:
        """Facts for the startup log: device, dtype, load time, pool sizes."""
        kv, core = self.core.kv, self.core
        weights = {p.data_ptr(): p.numel() * p.element_size() for p in core.model.parameters()}  # tied: once
        return {"device": str(core.device), "dtype": str(core.dtype).removeprefix("torch."), "kernels": core.ops.name,
                "weight_dtype": str(core.weight_dtype).removeprefix("torch."), "weight_bytes": sum(weights.values()),
                "threads": torch.get_num_threads() if core.device.type == "cpu" else None,
                "load_seconds": core.load_seconds, "num_blocks": kv.paged.num_blocks,
                "block_size": kv.paged.block_size, "paged_bytes": kv.paged.nbytes, "ring_slots": kv.ring.num_slots,
                "ring_len": kv.ring.ring_len, "ring_bytes": kv.ring.nbytes, "max_model_len": core.max_model_len,
                "prefix_caching": core.scheduler.prefix_caching, "snapshot_blocks": kv.ring.num_snapshot_blocks,
                "snapshot_bytes": kv.ring.snapshot_nbytes,
                "num_speculative_tokens": core.num_speculative_tokens,
                "tensor_parallel_size": core.par.size, "expert_parallel": core.par.expert_parallel}

    async def add_request(self, request_id: str, prompt_token_ids: list[int],
                          params: SamplingParams) -> AsyncIterator[DeltaOutput]:
        """Yields the request's deltas; leaving early (disconnect, cancellation) aborts it. Raises ValueError for an
        invalid request, RequestFailedError when an internal fault fails it, EngineDeadError once the engine is gone."""
        if not self.is_healthy():
            raise EngineDeadError(f"the engine stopped: {self.failure!r}")
        grammar = params.structured_outputs
        if grammar is not None and not self.core.grammars.submit(grammar).done():
            # a grammar compiles off the event loop (the server's validate compiled it already: no wait there)
            await asyncio.to_thread(self.core.grammars.compile, grammar)
        self.core.validate(prompt_token_ids, params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        with self._adds_lock:
            self._adds_pending += 1
        self._send(("add", request_id, prompt_token_ids, params))
        finished = False
        try:
            while not finished:
                d = await q.get()
                if isinstance(d, BaseException):
                    raise d
                finished = d.finished
                if d.error is not None:
                    raise RequestFailedError(d.error)
                yield d
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    async def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (done by the engine thread between steps; returns once done)."""
        if not self.is_healthy():
            raise EngineDeadError(f"the engine stopped: {self.failure!r}")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._send(("reset_prefix_cache", loop, done))
        await done

    def is_healthy(self) -> bool:
        """False once the engine thread has stopped on an error, or a tensor-parallel worker has died, even
        between requests (/health then answers 503, and the server exits)."""
        return self.failure is None and (self._stopped or self._thread.is_alive()) and self.core.workers_alive()

    def num_waiting(self) -> int:
        """Requests not yet scheduled: sent to the engine thread, or in the scheduler's waiting queue (preempted
        ones included). Read from any thread; a snapshot."""
        return self._adds_pending + len(self.core.scheduler.waiting)

    def problem(self) -> str | None:
        """Why the engine is not healthy, or None."""
        if self.failure is not None:
            return f"{type(self.failure).__name__}: {self.failure}"
        if not self.core.workers_alive():
            return f"a tensor-parallel worker is gone ({self.core.describe_workers()})"
        if not (self._stopped or self._thread.is_alive()):
            return "the engine thread exited"
        return None

    def stats(self) -> dict:
        return self.core.stats()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _send(self, msg) -> None:
        self._inbox.put(msg)
        self._wake.set()

    # -- engine thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        pending: list[DeltaOutput] = []  # the last step's outputs, dispatched as the next step computes

        def flush() -> None:
            if pending:
                self._dispatch(pending)
                pending.clear()

        while not self._stopped:
            self._drain_inbox(flush)
            if not self.core.has_unfinished():
                flush()
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                deltas = self.core.step(before_forward=flush)
            except WorkerError:     # a rank is gone: no later step can run
                raise
            except Exception as e:  # a bug in a step must not kill the server: fail what was in flight
                log.exception("engine step failed")
                flush()
                self._fail_all(e)
                continue
            flush()  # a step that ran no model (nothing schedulable) did not call it
            pending.extend(deltas)
        flush()

    def _drain_inbox(self, flush) -> None:
        out = []
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "add":
                _, rid, ids, params = msg
                with self._adds_lock:
                    self._adds_pending -= 1
                if rid not in self._streams:            # the client left before the engine saw it
                    continue
                try:
                    self.core.add_request(rid, ids, params, validated=True)
                except ValueError as e:
                    self._post(rid, e)
                except Exception as e:  # a bug met by one request fails that request, not the engine
                    log.exception("adding request %s failed", rid)
                    self._post(rid, RequestFailedError(f"engine error: {type(e).__name__}: {e}"))
            elif msg[0] == "reset_prefix_cache":
                _, loop, done = msg
                self.core.reset_prefix_cache()
                loop.call_soon_threadsafe(_resolve, done)
            else:
                d = self.core.abort(msg[1])
                if d is not None:
                    out.append(d)
        if out:
            flush()  # keep each stream's order: earlier outputs first
            self._dispatch(out)

    def _fail_all(self, exc: Exception) -> None:
        error = f"engine error: {type(exc).__name__}: {exc}"
        for rid in list(self.core.requests):
            self.core.fail(rid, error)
            self._post(rid, RequestFailedError(error))

    def _post(self, rid: str, item) -> None:
        stream = self._streams.get(rid)
        if stream is not None:
            stream[0].call_soon_threadsafe(stream[1].put_nowait, item)

    def _dispatch(self, deltas: list[DeltaOutput]) -> None:
        per_loop = defaultdict(list)
        for d in deltas:
            stream = self._streams.get(d.request_id)
            if stream is not None:
                per_loop[stream[0]].append((stream[1], d))
        for loop, items in per_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop has closed (its process is shutting down): nobody to tell
                pass


def _resolve(future: asyncio.Future) -> None:
    if not future.done():        # its waiter may have been cancelled
        future.set_result(None)


def _put_all(items) -> None:
    for q, d in items:
        q.put_nowait(d)
