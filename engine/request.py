"""A request's state as it moves through the scheduler."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from exaserve.engine.sampling_params import SamplingParams
from exaserve.engine.structured import GrammarState


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int]
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0        # tokens whose KV is in the cache
    block_ids: list[int] = field(default_factory=list)
    ring_slot: int = -1
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    error: str | None = None            # why it failed, with finish_reason "error"
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    detok: object = None                # IncrementalDetokenizer
    num_sent: int = 0                   # output tokens already handed out in deltas
    spec_token_ids: list[int] = field(default_factory=list)   # MTP drafts to verify in the next step
    # prefix caching (engine/kv_cache.py): the names of its full prompt blocks, how many of its blocks are
    # registered in the cache, the snapshot blocks it is writing (block index -> snapshot block), and the prompt
    # tokens its first admission found cached
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    snapshot_targets: dict[int, int] = field(default_factory=dict)
    num_cached_tokens: int = 0
    grammar: GrammarState | None = None          # the matcher of params.structured_outputs
    token_ids: list[int] = field(init=False)   # prompt + output, appended as tokens are sampled

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
