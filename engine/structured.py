"""Structured outputs: grammars a request's output must match, compiled with xgrammar, and their matchers.

A request names its constraint in a StructuredOutput (a JSON schema, any JSON object, a regex, a choice of
strings, an EBNF grammar, or an xgrammar structural tag: the server's forced tool calls). Grammars compile in a
small thread pool, off the step loop, cached by what they say; admission waits for the compile, bounded by a
timeout, so an invalid or too slow grammar is refused (ValueError, the library's message) before the request
runs. Each admitted request gets a GrammarState: a matcher that has accepted the request's output so far.

Each step the runner fills one token bitmask row per constrained position and applies it to that position's
logits before sampling (masked tokens get -inf). MTP drafts are checked against the matcher while their masks
are filled: the first draft the grammar rejects gets a mask that forbids it, so verification rejects it and the
run of accepted drafts ends there; the probe is rolled back, and only the tokens the scheduler appends advance the
matcher. A state with `start_after` (the token ids of `</think>` when the request reasons) leaves the output free
until those tokens appear in it; the constraint applies from the next token on.
"""
from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch


def _xgr():
    """xgrammar, imported on first use: it imports transformers (~2 s), which no unconstrained run needs."""
    import xgrammar
    return xgrammar


# A compile that takes longer is refused (a 400 over HTTP): no request waits on it, and the pool is small.
COMPILE_TIMEOUT_S = 10.0
# Whitespace characters the JSON grammars allow in one place: unbounded, a model may loop on blanks inside an
# object; 8 still lets pretty-printed JSON indent (a newline and 4 spaces, or 2 spaces 3 levels deep).
MAX_JSON_WHITESPACE = 8


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match: exactly one of json (a JSON schema, as text or a dict), json_object (any JSON
    object), regex, choice (one of these strings), grammar (EBNF, root rule `root`) or structural_tag (xgrammar's
    structural-tag JSON). start_after: token ids after which the constraint starts (empty: at the first token)."""
    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: str | None = None
    start_after: tuple[int, ...] = ()

    def __post_init__(self):
        if isinstance(self.json, dict):
            # key order kept: the output lists properties in the schema's order
            object.__setattr__(self, "json", json.dumps(self.json))
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        kinds = [k for k in ("json", "regex", "choice", "grammar", "structural_tag") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise ValueError(f"structured output needs exactly one of json, json_object, regex, choice, grammar, "
                             f"structural_tag; got {kinds or 'none'}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("structured output choice must be a non-empty list of strings")

    @property
    def key(self) -> tuple:
        """What the compiled grammar depends on (start_after does not: it is per request)."""
        return (self.json, self.json_object, self.regex, self.choice, self.grammar, self.structural_tag)


def _library_message(exc: BaseException) -> str:
    """xgrammar's message without its log prefix ("[12:00:00] /project/cpp/file.cc:123: ")."""
    return re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", str(exc).strip())


def tokenizer_info(tokenizer, vocab_size: int, stop_token_ids: list[int]):
    """xgrammar's view of the checkpoint's tokenizer, over the model's vocabulary (padding ids never match).
    Special tokens (<|endofturn|>, <|system|>, ...) get no text: a grammar never produces them (the stop tokens
    end a complete output); the non-special tags (<tool_call>, </think>) stay text."""
    xgr = _xgr()
    backend = tokenizer.backend
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
    vocab_type = (xgr.VocabType.BYTE_LEVEL if "ByteLevel" in kinds else
                  xgr.VocabType.BYTE_FALLBACK if "ByteFallback" in kinds else xgr.VocabType.RAW)
    encoded = [""] * vocab_size
    for token, i in backend.get_vocab(with_added_tokens=True).items():
        if i < vocab_size and i not in tokenizer.special_ids:
            encoded[i] = token
    return xgr.TokenizerInfo(encoded, vocab_type, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))


class Grammars:
    """Compiles StructuredOutputs in a thread pool, cached by their key; makes matchers for requests."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_workers: int = 2,
                 compile_timeout: float = COMPILE_TIMEOUT_S):
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.compile_timeout = compile_timeout
        self._tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="exaserve-grammar")
        self._lock = threading.Lock()
        self._compiler = None   # built on first use (a large vocabulary takes a while)
        self._cache: dict[tuple, Future] = {}

    def _compiler_now(self):
        with self._lock:
            if self._compiler is None:
                info = tokenizer_info(self._tokenizer, self.vocab_size, self.stop_token_ids)
                self._compiler = _xgr().GrammarCompiler(info, max_threads=1)
            return self._compiler

    def _compile(self, spec: StructuredOutput):
        compiler = self._compiler_now()
        try:
            if spec.json is not None:
                return compiler.compile_json_schema(spec.json, max_whitespace_cnt=MAX_JSON_WHITESPACE)
            if spec.json_object:
                return compiler.compile_json_schema('{"type": "object"}', max_whitespace_cnt=MAX_JSON_WHITESPACE)
            if spec.regex is not None:
                return compiler.compile_regex(spec.regex)
            if spec.choice is not None:
                return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec.choice))
            if spec.grammar is not None:
                return compiler.compile_grammar(spec.grammar)
            return compiler.compile_structural_tag(spec.structural_tag)
        except Exception as e:
            raise ValueError(f"invalid structured output: {_library_message(e)}") from None

    def submit(self, spec: StructuredOutput) -> Future:
        """The compile of `spec`, started now unless it was already (cached by spec.key)."""
        with self._lock:
            future = self._cache.get(spec.key)
            if future is None:
                future = self._cache[spec.key] = self._pool.submit(self._compile, spec)
        return future

    def compile(self, spec: StructuredOutput):
        """The compiled grammar; ValueError when it is invalid or its compile takes over compile_timeout."""
        try:
            return self.submit(spec).result(timeout=self.compile_timeout)
        except FutureTimeout:
            raise ValueError(f"structured output: compiling the grammar took longer than {self.compile_timeout:g} s; "
                             f"simplify the schema") from None

    def state(self, spec: StructuredOutput) -> GrammarState:
        return GrammarState(_xgr().GrammarMatcher(self.compile(spec)), spec.start_after)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class GrammarState:
    """One request's matcher: it has accepted every output token since the constraint started."""

    def __init__(self, matcher, start_after: tuple[int, ...]):
        self.matcher = matcher
        self.start_after = start_after
        self.active = not start_after
        self._tail: list[int] = []          # the last output tokens, while waiting for start_after

    def _starts_with(self, tail: list[int], token: int) -> tuple[list[int], bool]:
        tail = (tail + [token])[-len(self.start_after):]
        return tail, tuple(tail) == self.start_after

    def accept(self, token: int) -> None:
        """Advance with an output token the scheduler appended; raises if the grammar does not allow it."""
        if not self.active:
            self._tail, self.active = self._starts_with(self._tail, token)
            return
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} does not match the request's structured output")

    @property
    def terminated(self) -> bool:
        return self.active and self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int, drafts: list[int] = ()) -> list[int]:
        """Fill bitmask rows row, row + 1, ... for the positions of one verification (the next token, then after
        each draft), as far as the grammar goes: up to and including the position of the first draft it rejects
        (whose mask then forbids that draft). Returns the rows filled; the matcher is left as it was."""
        filled, accepted = [], 0
        active, tail = self.active, self._tail
        for j in range(len(drafts) + 1):
            if active:
                if self.matcher.is_terminated():
                    break   # nothing may follow: the scheduler stops the request at its stop token
                self.matcher.fill_next_token_bitmask(bitmask, row + j)
                filled.append(row + j)
            if j == len(drafts):
                break
            if not active:
                tail, active = self._starts_with(tail, drafts[j])
            elif self.matcher.accept_token(drafts[j]):
                accepted += 1
            else:
                break
        if accepted:
            self.matcher.rollback(accepted)
        return filled


def token_masks(num_rows: int, vocab_size: int, states: list[tuple[int, GrammarState, list[int]]]):
    """The token bitmask of num_rows logits rows (int32 [num_rows, ceil(vocab_size / 32)], a set bit allows its
    token; rows no grammar constrains allow every token) and the rows a grammar filled. states holds (first
    logits row, state, drafts verified from that row)."""
    bitmask = _xgr().allocate_token_bitmask(num_rows, vocab_size)
    rows = []
    for row, state, drafts in states:
        rows += state.fill(bitmask, row, drafts)
    return bitmask, rows


def apply_masks(logits: torch.Tensor, states: list[tuple[int, GrammarState, list[int]]]) -> None:
    """Mask logits rows in place (masked tokens get -inf): states as in token_masks."""
    bitmask, rows = token_masks(logits.shape[0], logits.shape[1], states)
    if rows:
        _xgr().apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=logits.shape[1],
                                           indices=rows)
