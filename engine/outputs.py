"""What the engine hands back: cumulative outputs for the offline API, deltas for streaming."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    num_cached_tokens: int = 0                    # prompt tokens found in the prefix cache (none computed twice)


@dataclass
class DeltaOutput:
    request_id: str
    token_ids: list[int]                          # tokens new since the last delta
    text: str                                     # text new since the last delta (stop strings already cut)
    logprobs: list[dict[int, float]] | None
    finished: bool
    finish_reason: str | None                     # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None                      # with finish_reason "error": what failed this request alone
    num_cached_tokens: int = 0                    # prompt tokens its first admission found in the prefix cache
