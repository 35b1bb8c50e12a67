"""The synchronous engine: scheduler + runner + per-request detokenization and stop conditions."""
from __future__ import annotations

import atexit
import gc
import logging
import time
from pathlib import Path

import torch

from exaserve import kernels

from exaserve.engine.config import ModelConfig
from exaserve.engine.detokenizer import IncrementalDetokenizer
from exaserve.engine.kv_cache import KVCache
from exaserve.engine.loader import load_model, resolve_dtype
from exaserve.engine.model_runner import ModelRunner
from exaserve.engine.outputs import DeltaOutput
from exaserve.engine.request import Request
from exaserve.engine.sampler import make_generator
from exaserve.engine.sampling_params import SamplingParams
from exaserve.engine.scheduler import Scheduler
from exaserve.engine.tokenizer import Tokenizer

log = logging.getLogger("exaserve.engine")
# Engines freeze the gc generations (see EngineCore.__init__); the final collection at exit must see those
# objects again, or native bindings report them as leaked.
atexit.register(gc.unfreeze)

GiB = 1 << 30


class EngineCore:
    def __init__(self, model: str | Path, *, dtype: str = "auto", device: str = "auto", max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 kv_cache_memory: int | None = None, block_size: int = 16, num_speculative_tokens: int = 0,
                 spec_max_batch_size: int = 32):
        path = Path(model)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model_config = cfg = ModelConfig.from_pretrained(path)
        self.tokenizer = Tokenizer.from_pretrained(path)
        stored = resolve_dtype(cfg.checkpoint_dtype if dtype == "auto" else dtype)
        self.weight_dtype = self.dtype = stored
        cpu_kernels = self.device.type == "cpu" and kernels.backend(torch.empty(0)) == "cpu"
        if self.device.type == "cpu" and self.dtype != torch.float32:
            # CPUs without native bf16/fp16 matrix units run half-precision torch GEMMs 5-40x slower than fp32, so
            # activations are fp32 (self.dtype: activations and KV cache). The C++ kernels read bf16 weights
            # as they are (half the bytes per step, exact widening in registers); otherwise the weights are
            # upcast once at load, which is exact and costs only memory.
            self.dtype = torch.float32
            if not (self.weight_dtype == torch.bfloat16 and cpu_kernels):
                self.weight_dtype = torch.float32
            log.info("CPU: %s weights kept as %s, computed in float32", str(stored).removeprefix("torch."),
                     str(self.weight_dtype).removeprefix("torch."))
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")

        if not 0 <= num_speculative_tokens <= 4:
            raise ValueError(f"num_speculative_tokens must be 0..4, got {num_speculative_tokens}")
        t0 = time.monotonic()
        self.model = load_model(path, self.weight_dtype, self.device, cfg, act_dtype=self.dtype)
        if num_speculative_tokens and self.model.mtp is None:
            raise ValueError(f"num_speculative_tokens={num_speculative_tokens} needs the checkpoint's MTP block "
                             f"(mtp.* tensors), and {path} has none; use num_speculative_tokens=0")
        self.num_spec_tokens = num_speculative_tokens
        if cpu_kernels:
            self.model.pack_for_cpu()
        self.model.init_rope(self.max_model_len, self.device)
        self.load_seconds = time.monotonic() - t0
        if kv_cache_memory is None:
            kv_cache_memory = self._default_kv_memory()
        self.kv = KVCache.create(cfg, kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs,
                                 max_model_len=self.max_model_len, block_size=block_size,
                                 max_rollback=num_speculative_tokens,
                                 extra_ring_layers=1 if num_speculative_tokens else 0, dtype=self.dtype,
                                 device=self.device)
        self.scheduler = Scheduler(self.kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.kv, self.device, num_speculative_tokens, spec_max_batch_size)
        self.requests: dict[str, Request] = {}
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "finished": 0, "aborted": 0, "steps": 0}
        # Everything allocated so far (modules, weights' Python objects, imported libraries) lives as long as the
        # engine: moving it out of the collector's generations keeps each collection, which the per-step
        # allocations trigger, from walking it (measured: ~5% of a batch-1 decode step went to gc).
        gc.collect()
        gc.freeze()

    def _default_kv_memory(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * 0.9)
        return 2 * GiB

    @property
    def generation_defaults(self) -> dict:
        return self.model_config.generation_defaults

    # -- requests -------------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError with a clear message if the request can never run."""
        params.validate(self.model_config.vocab_size)
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

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    validated: bool = False) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        if not validated:
            self.validate(prompt_token_ids, params)
        req = Request(request_id, list(prompt_token_ids), params, self.model_config.eos_token_ids)
        if params.seed is not None:
            req.generator = make_generator(params.seed, self.device)
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

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step -------------------------------------------------------------------------------------------
    def step(self, before_forward=None) -> list[DeltaOutput]:
        """One scheduler step. `before_forward` (optional) is called once, just before the model runs."""
        batch = self.scheduler.schedule()
        if not batch.requests:
            return []
        result = self.runner.execute(batch, before_forward)
        self.counters["steps"] += 1
        deltas = []
        for s, (req, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            # rejected drafts roll back: their KV positions are overwritten by later steps
            req.num_computed_tokens += n - result.num_rejected[s]
            if req.num_computed_tokens <= len(req.prompt_token_ids):
                self.counters["prompt_tokens"] += n
            if not result.tokens[s]:
                continue
            for token, lp in zip(result.tokens[s], result.logprobs[s]):
                self._append(req, token, lp)
                if req.finished:              # a stop inside accepted drafts drops the tokens after it
                    break
            deltas.append(self._delta(req))
            if req.finished:
                del self.requests[req.request_id]
        if self.num_spec_tokens:
            self.runner.propose(batch, result)
        return deltas

    def _append(self, req: Request, token: int, logprobs: dict | None) -> None:
        p = req.params
        req.append_token(token)
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        if logprobs is not None:
            req.logprobs.append(logprobs)
        self.counters["generation_tokens"] += 1
        n_out = len(req.output_token_ids)
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in req.eos_token_ids:
                return self._finish(req, "stop", None)
            if p.stop_token_ids and token in p.stop_token_ids:
                return self._finish(req, "stop", token)
        stop_str = req.detok.add(token)
        if stop_str is not None and n_out >= p.min_tokens:
            return self._finish(req, "stop", stop_str)
        if n_out >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return self._finish(req, "length", None)

    def _finish(self, req: Request, reason: str, stop_reason) -> None:
        self.scheduler.finish(req, reason, stop_reason)
        self.counters["finished"] += 1

    def _delta(self, req: Request) -> DeltaOutput:
        new_ids = req.output_token_ids[req.num_sent:]
        new_lp = req.logprobs[req.num_sent:] if req.params.logprobs is not None else None
        req.num_sent = len(req.output_token_ids)
        return DeltaOutput(req.request_id, new_ids, req.detok.delta(req.finished), new_lp, req.finished,
                           req.finish_reason, req.stop_reason, len(req.prompt_token_ids), len(req.output_token_ids))

    def stats(self) -> dict:
        kv = self.kv
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "blocks_used": kv.paged.num_used, "blocks_total": kv.paged.num_blocks,
                "ring_slots_used": kv.ring.num_used, "ring_slots_total": kv.ring.num_slots,
                "preemptions": self.scheduler.num_preemptions, **self.counters,
                **(self.runner.spec_stats.as_dict() if self.num_spec_tokens else {})}
