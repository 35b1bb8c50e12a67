"""The synchronous engine: scheduler + runner + per-request detokenization and stop conditions."""
from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from exaserve import kernels
from exaserve.engine import distributed, envs
from exaserve.engine.config import EngineConfig, ModelConfig
from exaserve.engine.cpu_model import CpuModel, pack_weights
from exaserve.engine.detokenizer import IncrementalDetokenizer
from exaserve.engine.kv_cache import KVCache
from exaserve.engine.loader import load_model, resolve_dtype
from exaserve.engine.model_runner import ModelRunner
from exaserve.engine.outputs import DeltaOutput
from exaserve.engine.parallel import Parallel
from exaserve.engine.request import Request
from exaserve.engine.sampler import make_generator
from exaserve.engine.sampling_params import SamplingParams
from exaserve.engine.scheduler import Scheduler
from exaserve.engine.structured import Grammars
from exaserve.engine.tokenizer import Tokenizer

log = logging.getLogger("exaserve.engine")
# Engines freeze the gc generations (see EngineCore.__init__); the final collection at exit must see those
# objects again, or native bindings report them as leaked.
atexit.register(gc.unfreeze)

GiB = 1 << 30


@dataclass
class _Plan:
    """What every rank derives alike from the config: device, model config, kernels, dtypes, context length."""
    device: torch.device
    cfg: ModelConfig
    ops: kernels.Ops
    weight_dtype: torch.dtype
    dtype: torch.dtype            # activations and KV cache
    max_model_len: int

    @classmethod
    def of(cls, c: EngineConfig, env: envs.Env, rank: int = 0, verbose: bool = True) -> "_Plan":
        device = torch.device(c.device if c.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda" and c.tensor_parallel_size > 1:
            device = torch.device("cuda", rank % (c.tensor_parallel_size // c.nnodes))   # one GPU per rank
        cfg = ModelConfig.from_pretrained(Path(c.model))
        ops = kernels.select(c.kernels or env.kernels, device, env.cpu_ext_cflags)
        stored = resolve_dtype(cfg.checkpoint_dtype if c.dtype == "auto" else c.dtype)
        weight_dtype = dtype = stored
        if device.type == "cpu" and dtype != torch.float32:
            # CPUs without native bf16/fp16 matrix units run half-precision torch GEMMs 5-40x slower than fp32, so
            # activations are fp32 (self.dtype: activations and KV cache). The C++ kernels read bf16 weights
            # as they are (half the bytes per step, exact widening in registers); otherwise the weights are
            # upcast once at load, which is exact and costs only memory.
            dtype = torch.float32
            if not (weight_dtype == torch.bfloat16 and ops.name == "cpu"):
                weight_dtype = torch.float32
            if verbose:
                log.info("CPU: %s weights kept as %s, computed in float32", str(stored).removeprefix("torch."),
                         str(weight_dtype).removeprefix("torch."))
        max_model_len = min(c.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if verbose and c.max_model_len is not None and c.max_model_len > cfg.max_position_embeddings:
            log.warning("max_model_len %d is above the model's max_position_embeddings; using %d", c.max_model_len,
                        cfg.max_position_embeddings)
        return cls(device, cfg, ops, weight_dtype, dtype, max_model_len)

    def load(self, c: EngineConfig, par: Parallel):
        model = load_model(Path(c.model), self.weight_dtype, self.device, self.cfg, act_dtype=self.dtype,
                           ops=self.ops, par=par, quantization=c.quantization)
        if c.num_speculative_tokens and model.mtp is None:
            raise ValueError(f"num_speculative_tokens={c.num_speculative_tokens} needs the checkpoint's MTP block "
                             f"(mtp.* tensors), and {c.model} has none; use num_speculative_tokens=0")
        model.init_rope(self.max_model_len, self.device)
        if self.ops.name == "cpu" and par.size > 1:
            pack_weights(model)   # ranks run layer by layer on the cpu ops (CpuModel's one call cannot all-reduce)
        return model

    def default_kv_memory(self, c: EngineConfig) -> int:
        """KV bytes when kv_cache_memory is not given. On a GPU, vLLM's rule: this process may use
        gpu_memory_utilization of the device; the weights (loaded by now) and what others use come out of it, and
        the rest goes to the KV pools. On a CPU, 2 GiB."""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return max(0, int(free - total * (1 - c.gpu_memory_utilization)))
        return 2 * GiB

    def kv_cache(self, c: EngineConfig, kv_cache_memory: int, par: Parallel) -> KVCache:
        return KVCache.create(self.cfg, kv_cache_memory=kv_cache_memory, max_num_seqs=c.max_num_seqs,
                              max_model_len=self.max_model_len, block_size=c.block_size,
                              max_rollback=c.num_speculative_tokens,
                              extra_ring_layers=1 if c.num_speculative_tokens else 0, dtype=self.dtype,
                              device=self.device, num_kv_heads=par.kv_heads(self.cfg.num_kv_heads)[1],
                              prefix_caching=c.enable_prefix_caching)


def _worker_main(rank: int, config: EngineConfig, env: envs.Env) -> None:
    """A tensor-parallel rank > 0 (engine/distributed.py): load this rank's shard, report, then serve calls."""
    import torch.distributed as dist
    size = config.tensor_parallel_size
    rendezvous = distributed.Rendezvous(config.master_addr, config.master_port, size, rank)
    try:
        plan = _Plan.of(config, env, rank, verbose=False)
        if plan.device.type == "cpu":
            distributed.set_threads_per_rank(size // config.nnodes)
        par = Parallel(rank, size, config.enable_expert_parallel)
        model = plan.load(config, par)
    except BaseException as e:  # reported on rank 0, which raises it with this rank's number
        rendezvous.report(f"{type(e).__name__}: {e}")
        return
    # its own room for KV (GPUs may differ in what is free): rank 0 sizes every rank's pools by the smallest
    rendezvous.report(kv_budget=plan.default_kv_memory(config) if config.kv_cache_memory is None else None)
    kv_cache_memory = rendezvous.wait_go()
    if kv_cache_memory is None:     # rank 0 failed to start
        return
    control = rendezvous.init_group(plan.device, env.collective_timeout)
    kv = plan.kv_cache(config, kv_cache_memory, par)
    try:
        distributed.serve_calls(model, kv, control, plan.device)
    finally:
        dist.destroy_process_group()


def run_node(config: EngineConfig, env: envs.Env | None = None) -> int:
    """A node other than 0 of a multi-node engine: run this node's ranks until they end (their exit status)."""
    return distributed.run_node(config, env or envs.read(), f"{__name__}:_worker_main")


class EngineCore:
    def __init__(self, config: EngineConfig, env: envs.Env | None = None):
        """config: every engine knob; env: the EXASERVE_* settings (default: read from the environment now)."""
        self.config = c = config
        self.env = env = env or envs.read()
        path = Path(c.model)
        plan = _Plan.of(c, env)
        self.device, self.model_config, self.ops = plan.device, plan.cfg, plan.ops
        self.weight_dtype, self.dtype, self.max_model_len = plan.weight_dtype, plan.dtype, plan.max_model_len
        self.tokenizer = Tokenizer.from_pretrained(path)
        size = c.tensor_parallel_size
        self.par = Parallel(0, size, c.enable_expert_parallel)
        self._workers = self._rendezvous = None
        if size > 1:
            if c.node_rank != 0:
                raise ValueError(f"node_rank {c.node_rank} runs ranks only: use run_node (exaserve serve does)")
            per_node = size // c.nnodes
            if self.device.type == "cpu":
                distributed.set_threads_per_rank(per_node)
            # the ranks meet at rank 0's store: a free local port on one node, --master-addr/port across nodes
            if c.nnodes == 1:
                c = dataclasses.replace(c, master_addr="127.0.0.1", master_port=c.master_port or
                                        distributed.free_port())
            self._rendezvous = distributed.Rendezvous(c.master_addr, c.master_port, size, 0)
            self._workers = distributed.Workers(range(1, per_node), f"{__name__}:_worker_main", (c, env))

        t0 = time.monotonic()
        try:
            self.model = plan.load(c, self.par)
            budgets = self._rendezvous.wait_loaded(self._workers) if self._rendezvous is not None else []
        except BaseException:
            if self._rendezvous is not None:
                self._rendezvous.go(None)          # the other ranks stop instead of waiting
            self._close_workers()
            raise
        self.num_speculative_tokens = c.num_speculative_tokens
        # the one-call C++ layer stack cannot all-reduce inside a layer: ranks run layer by layer on the cpu ops
        cpu_model = CpuModel(self.model, env.argmax_screen) if self.ops.name == "cpu" and size == 1 else None
        self.load_seconds = time.monotonic() - t0
        kv_cache_memory = c.kv_cache_memory
        if kv_cache_memory is None:
            kv_cache_memory = min([plan.default_kv_memory(c), *budgets])
            if budgets:
                log.info("KV budget per rank: %.1f MiB, the smallest any rank has room for",
                         kv_cache_memory / (1 << 20))
        runner_model = self.model
        if self._rendezvous is not None:
            self._rendezvous.go(kv_cache_memory)
            control = self._rendezvous.init_group(self.device, env.collective_timeout)
            runner_model = self._sharded = distributed.ShardedModel(self.model, control, self._workers)
        self.kv = plan.kv_cache(c, kv_cache_memory, self.par)
        self.scheduler = Scheduler(self.kv, max_num_seqs=c.max_num_seqs,
                                   max_num_batched_tokens=c.max_num_batched_tokens, max_model_len=self.max_model_len,
                                   enable_prefix_caching=c.enable_prefix_caching,
                                   window=self.model_config.sliding_window, mtp=c.num_speculative_tokens > 0)
        self.runner = ModelRunner(runner_model, self.kv, self.device, c.num_speculative_tokens,
                                  c.spec_max_batch_size, cpu_model)
        if self.device.type == "cuda" and self.ops.name == "triton" and size == 1 and not c.enforce_eager:
            self.runner.use_cuda_graphs(c.max_num_seqs, self.max_model_len)   # decode steps (engine/cuda_graph.py)
        self.grammars = Grammars(self.tokenizer, self.model_config.vocab_size, self.model_config.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.counters = {"aborted": 0, "failed": 0, "steps": 0}
        # Everything allocated so far (modules, weights' Python objects, imported libraries) lives as long as the
        # engine: moving it out of the collector's generations keeps each collection, which the per-step
        # allocations trigger, from walking it (measured: ~5% of a batch-1 decode step went to gc).
        gc.collect()
        gc.freeze()

    def close(self) -> None:
        """Stop the tensor-parallel workers (a no-op with one rank); the engine cannot step afterwards."""
        self.grammars.close()
        if self._workers is not None:
            # after a failed collective (a dead or hung rank) a stop broadcast could wait for the timeout
            healthy = not self._workers.any_dead() and not self._sharded.broken
            if healthy:
                self._sharded.stop()
            self._close_workers(timeout=10.0 if healthy else 0.0)
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()

    def workers_alive(self) -> bool:
        """Whether every tensor-parallel worker process is running (True with one rank)."""
        return self._workers is None or not self._workers.any_dead()

    def describe_workers(self) -> str:
        return "one rank" if self._workers is None else self._workers.describe_dead()

    def _close_workers(self, timeout: float = 10.0) -> None:
        if self._workers is not None:
            self._workers.close(timeout)
            self._workers = None

    @property
    def generation_defaults(self) -> dict:
        return self.model_config.generation_defaults

    # -- requests -------------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError with a clear message if the request can never run."""
        params.validate(self.model_config.vocab_size)
        if params.n != 1:
            raise ValueError(f"n={params.n}: an engine request is one completion; add n requests (LLM.generate and "
                             f"the HTTP server do) or use n=1")
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) is "
                             f"{n + params.max_tokens} tokens, over max_model_len ({self.max_model_len})")
        blocks = self.kv.paged.blocks_for(n + params.max_tokens)
        if blocks > self.kv.paged.num_blocks:
            raise ValueError(f"the request needs {blocks} KV blocks but the pool has {self.kv.paged.num_blocks}; "
                             f"raise kv_cache_memory")
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)   # cached: add_request finds it compiled

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    validated: bool = False) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        if not validated:
            self.validate(prompt_token_ids, params)
        req = Request(request_id, list(prompt_token_ids), params, self.model_config.eos_token_ids)
        if params.seed is not None:
            req.generator = make_generator(params.seed, self.device)
        if params.structured_outputs is not None:
            req.grammar = self.grammars.state(params.structured_outputs)
        req.detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, params.stop,
                                           params.include_stop_str_in_output)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> DeltaOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req, "abort")
        self.counters["aborted"] += 1
        return self._delta(req)

    def fail(self, request_id: str, error: str) -> None:
        """Finish a request with finish_reason "error" (the step it was in failed as a whole)."""
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.fail(req, error)
            self.counters["failed"] += 1

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix; requests in flight keep what they hold."""
        self.scheduler.reset_prefix_cache()
        log.info("prefix cache reset")

    # -- the step -------------------------------------------------------------------------------------------
    def step(self, before_forward=None) -> list[DeltaOutput]:
        """One scheduler step. `before_forward` (optional) is called once, just before the model runs.

        A fault met by one request (its sampling, stop handling, output) fails that request alone: its delta has
        finish_reason "error" and the message in `error`. A fault of the whole batch (the model) raises."""
        batch = self.scheduler.schedule()
        if not batch.requests:
            return []
        try:
            result = self.runner.execute(batch, before_forward)
            drafts = self.runner.propose(batch, result) if self.num_speculative_tokens else None
        except Exception:
            # the step's snapshot copies may be half done: no later request may read what they wrote
            self.scheduler.reset_prefix_cache()
            raise
        self.counters["steps"] += 1
        deltas = []
        for req in self.scheduler.update(batch, result, drafts):
            deltas.append(self._delta(req))
            if req.finished:
                del self.requests[req.request_id]
        return deltas

    def _delta(self, req: Request) -> DeltaOutput:
        if req.error is None:
            try:
                new_ids = req.output_token_ids[req.num_sent:]
                new_lp = req.logprobs[req.num_sent:] if req.params.logprobs is not None else None
                text = req.detok.delta(req.finished)
                req.num_sent = len(req.output_token_ids)
                return DeltaOutput(req.request_id, new_ids, text, new_lp, req.finished, req.finish_reason,
                                   req.stop_reason, len(req.prompt_token_ids), len(req.output_token_ids),
                                   num_cached_tokens=req.num_cached_tokens)
            except Exception as e:  # a bug met by one request fails that request alone
                log.exception("request %s: building its output failed", req.request_id)
                self.scheduler.fail(req, f"building the output failed: {type(e).__name__}: {e}")
        self.counters["failed"] += 1
        return DeltaOutput(req.request_id, [], "", None, True, "error", None, len(req.prompt_token_ids),
                           len(req.output_token_ids), error=req.error, num_cached_tokens=req.num_cached_tokens)

    def stats(self) -> dict:
        kv = self.kv
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "blocks_used": kv.paged.num_used, "blocks_total": kv.paged.num_blocks,
                "ring_slots_used": kv.ring.num_used, "ring_slots_total": kv.ring.num_slots,
                "preemptions": self.scheduler.num_preemptions, "prompt_tokens": self.scheduler.num_prompt_tokens,
                "generation_tokens": self.scheduler.num_generation_tokens, "finished": self.scheduler.num_finished,
                "prefix_cache_queries": self.scheduler.prefix_cache_queries,
                "prefix_cache_hits": self.scheduler.prefix_cache_hits, "cached_blocks": kv.paged.num_cached,
                "cached_snapshots": len(kv.ring.snapshots),
                **self.counters, **(self.runner.spec_stats.as_dict() if self.num_speculative_tokens else {})}
