"""Offline batch API: `LLM(model=DIR).generate(prompts, params)` and `LLM.chat(conversations, params)`."""
from __future__ import annotations

import dataclasses
import itertools
import sys

from tqdm import tqdm

from exaserve.engine.chat_template import encode_chat
from exaserve.engine.config import EngineConfig
from exaserve.engine.engine_core import EngineCore
from exaserve.engine.outputs import CompletionOutput, RequestOutput
from exaserve.engine.request import Request
from exaserve.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | EngineConfig, **engine_args):
        """model: a checkpoint directory, with EngineConfig's options as keyword arguments (enable_prefix_caching=False
        turns the prefix cache off); or an EngineConfig."""
        self.engine = EngineCore(EngineConfig.of(model, engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, a token-id list, or a list of either; sampling_params: one for all, or one per prompt.
        Returns one RequestOutput per prompt, with `n` completions each. use_tqdm: a progress bar on stderr."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        sampling_params = sampling_params or SamplingParams()
        param_list = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(param_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(param_list)} SamplingParams")
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return self._run(ids, param_list, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | list[SamplingParams]
             | None = None, *, tools: list[dict] | None = None, chat_template: str | None = None,
             chat_template_kwargs: dict | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """messages: one conversation (OpenAI-style message dicts) or a list of conversations, each rendered with the
        chat template (the checkpoint's unless `chat_template` is given; chat_template_kwargs such as
        enable_thinking are visible to it) and generated as `generate` does. One RequestOutput per conversation."""
        template = chat_template or self.tokenizer.chat_template
        if template is None:
            raise ValueError("the model has no chat template; pass chat_template=")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [encode_chat(self.tokenizer, template, conversation, tools=tools,
                               add_generation_prompt=add_generation_prompt, template_kwargs=chat_template_kwargs)[1]
                   for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix."""
        self.engine.reset_prefix_cache()

    def _run(self, prompts: list[list[int]], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        """Each prompt's n completions run as n engine requests; stepped until all are done."""
        request_ids, groups = [], []   # per prompt: its id, and its engine requests
        bar = _ProgressBar(len(prompts)) if use_tqdm else None
        try:
            for ids, p in zip(prompts, params):
                p.validate()  # n, before it makes copies (the engine validates each copy)
                request_ids.append(rid := str(next(self._ids)))
                groups.append(group := [])
                for i, copy in enumerate(_completions(p)):
                    group.append(self.engine.add_request(rid if p.n == 1 else f"{rid}-{i}", ids, copy))
            group_of = {r.request_id: k for k, group in enumerate(groups) for r in group}
            left = [len(group) for group in groups]
            while self.engine.has_unfinished():
                deltas = self.engine.step()
                if bar is None:
                    continue
                for d in deltas:
                    bar.output_tokens += len(d.token_ids)
                    if d.finished:
                        k = group_of[d.request_id]
                        left[k] -= 1
                        if not left[k]:
                            bar.prompt_done(len(prompts[k]))
        except BaseException:  # a bad prompt, a fault of a whole step, Ctrl-C: nothing stays in the engine
            for r in itertools.chain(*groups):
                self.engine.abort(r.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        # cached tokens of the prompt: the fewest any of its choices found (the first computes what the rest reuse)
        return [RequestOutput(rid, group[0].prompt_token_ids, [_completion(i, r) for i, r in enumerate(group)],
                              num_cached_tokens=min(r.num_cached_tokens for r in group))
                for rid, group in zip(request_ids, groups)]


def _completions(p: SamplingParams) -> list[SamplingParams]:
    """n requests of one completion each; seeded ones get seed + i, so they differ but reproduce (as the HTTP
    server does)."""
    if p.n == 1:
        return [p]
    return [dataclasses.replace(p, n=1, seed=None if p.seed is None else p.seed + i) for i in range(p.n)]


def _completion(index: int, r: Request) -> CompletionOutput:
    return CompletionOutput(index, r.detok.text, list(r.output_token_ids),
                            r.logprobs if r.params.logprobs is not None else None, r.finish_reason, r.stop_reason)


class _ProgressBar:
    """vLLM's progress bar: prompts done, and the input and output token rates, on stderr."""

    def __init__(self, total: int):
        self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True, file=sys.stderr,
                        postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
        self.input_tokens = self.output_tokens = 0

    def prompt_done(self, num_prompt_tokens: int) -> None:
        self.input_tokens += num_prompt_tokens
        elapsed = self.bar.format_dict["elapsed"] or 1e-9
        self.bar.set_postfix_str(f"est. speed input: {self.input_tokens / elapsed:.2f} toks/s, "
                                 f"output: {self.output_tokens / elapsed:.2f} toks/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
