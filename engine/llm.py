"""Offline batch API: `LLM(model=DIR).generate(prompts, params)`."""
from __future__ import annotations

import itertools

from exaserve.engine.config import EngineConfig
from exaserve.engine.engine_core import EngineCore
from exaserve.engine.outputs import CompletionOutput, RequestOutput
from exaserve.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | EngineConfig, **engine_args):
        """model: a checkpoint directory, with EngineConfig's options as keyword arguments; or an EngineConfig."""
        self.engine = EngineCore(EngineConfig.of(model, engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """prompts: a string, a token-id list, or a list of either. Returns one RequestOutput per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        param_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(param_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(param_list)} SamplingParams")
        reqs = []
        try:
            for prompt, p in zip(prompts, param_list):
                ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
                reqs.append(self.engine.add_request(str(next(self._ids)), ids, p))
            while self.engine.has_unfinished():
                self.engine.step()
        except BaseException:  # a bad prompt, a fault of a whole step, Ctrl-C: nothing stays in the engine
            for r in reqs:
                self.engine.abort(r.request_id)
            raise
        return [RequestOutput(r.request_id, r.prompt_token_ids, [CompletionOutput(
            0, r.detok.text, list(r.output_token_ids), r.logprobs if r.params.logprobs is not None else None,
            r.finish_reason, r.stop_reason)]) for r in reqs]
