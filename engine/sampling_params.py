"""Per-request sampling settings: the OpenAI / vLLM knobs and their validation."""

from dataclasses import dataclass

from exaserve.engine.structured import StructuredOutput

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs
MAX_LOGIT_BIAS = 100.0  # OpenAI's limit for logit_bias values
MAX_N = 128  # OpenAI's limit for n


# Temperatures below this decode greedily, as in vLLM: logits divided by a tiny temperature overflow to inf,
# and the softmax of those is NaN (every token then came out as id 0).
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt (LLM.generate runs them as n requests; the engine takes n = 1)
    max_tokens: int = 16
    temperature: float = 1.0  # below GREEDY_TEMPERATURE (0 included) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # top-N logprobs per token; the sampled token is always included
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutput | None = None  # a grammar the output must match (engine/structured.py)

    def __post_init__(self):
        # The OpenAI API accepts a single stop string as well as a list.
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first bad field; vocab_size enables token-id range checks."""

        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(_is_int(self.n) and 1 <= self.n <= MAX_N, f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        check(self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}")
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.top_k == -1 or self.top_k >= 0, f"top_k must be -1 (off), 0 (off) or positive, got {self.top_k}")
        check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(-2 <= value <= 2, f"{name} must be in [-2, 2], got {value}")
        check(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        check(
            self.min_tokens <= self.max_tokens,
            f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
        )
        if self.logprobs is not None:
            check(
                0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
            )
        if self.stop is not None:
            check(all(isinstance(s, str) and s for s in self.stop), "stop must hold non-empty strings")
        check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutput),
              f"structured_outputs must be a StructuredOutput, got {type(self.structured_outputs).__name__}")
        for token_id in self.stop_token_ids or ():
            check(_valid_token_id(token_id, vocab_size), f"stop_token_ids holds an invalid token id: {token_id!r}")
        for token_id, bias in (self.logit_bias or {}).items():
            check(_valid_token_id(token_id, vocab_size), f"logit_bias holds an invalid token id: {token_id!r}")
            check(
                -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS,
                f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                f"got {bias} for token {token_id}",
            )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_token_id(token_id, vocab_size: int | None) -> bool:
    if not _is_int(token_id) or token_id < 0:
        return False
    return vocab_size is None or token_id < vocab_size
