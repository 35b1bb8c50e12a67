"""Load generator for any OpenAI-compatible server (exaserve, vLLM, llama-server, ...).

Sends a fixed-seed workload over streaming HTTP and measures what users feel:

    python benchmarks/serve.py --base-url http://127.0.0.1:8000 --tokenizer CKPT_DIR \
        --dataset random --input-len 256 --output-len 128 --num-prompts 64 --max-concurrency 8

Datasets: "random" (random token ids of the vocabulary sent as token-id prompts to /v1/completions,
or decoded to text with --text) and "chat" (synthetic messages of words to /v1/chat/completions); two that
measure prefix caching, both chat: "shared-prefix" (every request starts with the same system prompt of
--shared-len tokens, then a user message of --input-len of its own) and "multi-turn" (--num-prompts
conversations of --turns turns; each turn resends the whole history, the server's earlier answers included,
so a turn can start only when the previous one has ended). --reset-prefix-cache asks the server (POST
/reset_prefix_cache; exaserve, vLLM in its dev mode) to drop its cache before each level, so levels do not
reuse each other's prompts. The cached share of the prompt tokens comes from usage.prompt_tokens_details.
Lengths are fixed ("256") or uniform over a range ("128:512"). Requests arrive as a Poisson process at
--request-rate (gaps drawn from a gamma distribution; --burstiness < 1 is burstier, > 1 more regular)
or all at once (inf), at most --max-concurrency in flight.

Output tokens are counted from the usage chunk (stream_options.include_usage), else taken as max_tokens
(ignore_eos is always sent); streamed text is never re-tokenised. TTFT runs to the first chunk carrying
generated tokens; ITL is the gap between such chunks (a chunk may carry several tokens, and a server that
holds back tokens which decode to no text yet sends fewer chunks); TPOT is (latency - TTFT) / (output
tokens - 1).

--json-schema FILE sends that JSON schema as response_format (type json_schema) with every request, to measure
structured-output decoding against the same run without it; a schema that cannot end before --output-len (e.g.
benchmarks/schema_records.json, a long array of records) keeps every request constrained to its last token.
With a reasoning chat template the constraint starts after `</think>`, which a random model never writes: send
--chat-template-kwargs '{"enable_thinking": false}' so that it starts at the first token.

--sweep-concurrency 1,8,32 runs the workload at each level and plots TTFT and TPOT p50 against output
throughput; --plot A.json B.json ... draws the runs of several result files (e.g. two servers) in one PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import ssl
import string
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import httpx

try:
    import orjson

    _loads, _dumps = orjson.loads, orjson.dumps
except ImportError:  # plain json does the same, a little slower
    _loads = json.loads

    def _dumps(obj):
        return json.dumps(obj).encode()

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None

PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft", "tpot", "e2el")
# Filler words for the chat dataset (any fixed list works; these keep the text readable).
WORDS = ("the of and to in is it you that he was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do "
         "their time if will way about many then them write would like so these her long make thing see him two "
         "has look more day could go come did number sound no most people my over know water than call first who "
         "may down side been now find any new work part take get place made live where after back little only "
         "round man year came show every good me give our under name very through just form sentence great think "
         "say help low line differ turn cause much mean before move right boy old too same tell does set three "
         "want air well also play small end put home read hand port large spell add even land here must big high "
         "such follow act why ask men change went light kind off need house picture try us again animal point "
         "mother world near build self earth father head stand own page should country found answer school grow "
         "study still learn plant cover food sun four between state keep eye never last let thought city tree "
         "cross farm hard start might story saw far sea draw left late run while press close night real life few "
         "north open seem together next white children begin got walk example ease paper group always music those "
         "both mark often letter until mile river car feet care second book carry took science eat room friend "
         "began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl "
         "usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song "
         "measure door product black short numeral class wind question happen complete ship area half rock order "
         "fire south problem piece told knew pass since top whole king space heard best hour better true during "
         "hundred five remember step early hold west ground interest reach fast verb sing listen six table travel "
         "less morning ten simple several vowel toward war lay against pattern slow center love person money serve "
         "appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry "
         "dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood "
         "contain front teach week final gave green quick develop ocean warm free minute strong special mind behind "
         "clear tail produce fact street inch multiply nothing course stay wheel full force blue object decide "
         "surface deep moon island foot system busy test record boat common gold possible plane stead dry wonder "
         "laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill east "
         "paint language among").split()


# ------------------------------------------------------------------------------------------ workload

@dataclass
class Length:
    """A token count, fixed (low == high) or uniform over [low, high]."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> "Length":
        low, _, high = text.partition(":")
        length = cls(int(low), int(high or low))
        if not 1 <= length.low <= length.high:
            raise argparse.ArgumentTypeError(f"bad length {text!r}: want N or LOW:HIGH with 1 <= LOW <= HIGH")
        return length

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclass
class Prompt:
    body: dict  # the JSON request minus model/stream fields
    input_len: int  # tokens, as built (the server's usage.prompt_tokens wins when it sends one)
    output_len: int


def load_tokenizer(path: str | None):
    if path is None:
        return None
    from tokenizers import Tokenizer

    file = Path(path)
    return Tokenizer.from_file(str(file / "tokenizer.json" if file.is_dir() else file))


def token_pool(tokenizer, vocab_size: int, min_token_id: int) -> list[int]:
    """Ids a random prompt may use: the tokenizer's ordinary tokens (no special or added ones), else a range."""
    if tokenizer is None:
        return list(range(min_token_id, vocab_size))
    added = set(tokenizer.get_added_tokens_decoder())
    return [i for i in range(min_token_id, tokenizer.get_vocab_size(with_added_tokens=False)) if i not in added]


def build_prompts(args, tokenizer) -> list[Prompt]:
    """The requests of the workload; for multi-turn, each conversation's first turn (build_conversations)."""
    rng = random.Random(args.seed)
    prompts = []
    if args.dataset == "shared-prefix":
        system = chat_text(random.Random(args.seed - 1), args.shared_len, tokenizer)
        for _ in range(args.num_prompts):
            n_in, n_out = args.input_len.draw(rng), args.output_len.draw(rng)
            messages = [{"role": "system", "content": system},
                        {"role": "user", "content": chat_text(rng, n_in, tokenizer)}]
            prompts.append(Prompt({"messages": messages}, args.shared_len + n_in, n_out))
    elif args.dataset == "multi-turn":
        return [turns[0] for turns in build_conversations(args, tokenizer)]
    elif args.dataset == "random":
        pool = token_pool(tokenizer, args.vocab_size, args.min_token_id)
        for _ in range(args.num_prompts):
            n_in, n_out = args.input_len.draw(rng), args.output_len.draw(rng)
            ids = rng.choices(pool, k=n_in)
            prompt = tokenizer.decode(ids, skip_special_tokens=False) if args.text else ids
            prompts.append(Prompt({"prompt": prompt}, n_in, n_out))
    else:
        for _ in range(args.num_prompts):
            n_in, n_out = args.input_len.draw(rng), args.output_len.draw(rng)
            prompts.append(Prompt({"messages": [{"role": "user", "content": chat_text(rng, n_in, tokenizer)}]},
                                  n_in, n_out))
    return prompts


def build_conversations(args, tokenizer) -> list[list[Prompt]]:
    """multi-turn: per conversation, its user messages (one Prompt per turn, body {"user": text})."""
    rng = random.Random(args.seed)
    return [[Prompt({"user": chat_text(rng, (n_in := args.input_len.draw(rng)), tokenizer)}, n_in,
                    args.output_len.draw(rng)) for _ in range(args.turns)] for _ in range(args.num_prompts)]


def chat_text(rng: random.Random, n_tokens: int, tokenizer) -> str:
    """About n_tokens of word salad (exactly n_tokens of the tokenizer's, when one is given)."""
    topic = "".join(rng.choices(string.ascii_lowercase, k=6))  # keeps prompts from sharing a prefix
    words = [topic] + [rng.choice(WORDS) for _ in range(n_tokens)]
    text = " ".join(words)
    if tokenizer is None:
        return " ".join(words[:n_tokens])
    ids = tokenizer.encode(text, add_special_tokens=False).ids[:n_tokens]
    return tokenizer.decode(ids)


def arrival_gaps(rng: random.Random, n: int, rate: float, burstiness: float) -> list[float]:
    """Seconds to wait before each request: gamma gaps with mean 1/rate (burstiness 1 = Poisson)."""
    if math.isinf(rate):
        return [0.0] * n
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n)]


# ------------------------------------------------------------------------------------------ client

@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    usage_reported: bool = False
    ttft: float = 0.0  # seconds
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when the server reports it


def _is_token_chunk(choice: dict) -> bool:
    """Whether a streamed choice carries generated tokens (not the chat stream's opening role-only delta).
    A text completion chunk counts even with empty text: some servers send one per step, and a token
    that decodes to nothing yet is still a token."""
    if "text" in choice:
        return True
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
                or delta.get("tool_calls"))


class _Stream(asyncio.Protocol):
    """One streamed HTTP/1.1 POST on its own connection, parsed as bytes arrive.

    The load generator shares the CPU with the server under test (on a small host, the same cores), so its
    per-token work must be small: each arriving segment is split into chunks (chunked transfer encoding, a
    Content-Length body, or a body that runs to the close) and SSE lines in place, with no coroutine switch
    per token. `on_data(payload, t)` gets each `data:` payload and the time its bytes arrived."""

    def __init__(self, on_data):
        self.on_data = on_data
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.buf = bytearray()       # bytes not parsed yet
        self.line = bytearray()      # an SSE line split across chunks
        self.status: int | None = None
        self.body = bytearray()      # the whole body of a non-200 response
        self.chunked = False
        self.remaining: int | None = None  # body bytes left (Content-Length); None: to the close
        self.chunk_left = 0          # bytes left in the current chunk (+2 for its CRLF once read)
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buf += data
        try:
            if self.status is None and not self._head():
                return
            self._body(now)
        except ValueError as exc:
            self._finish(exc)

    def eof_received(self):
        if self.remaining is None and self.status is not None and not self.chunked:
            self._finish(None)       # a body delimited by the close
        return False

    def connection_lost(self, exc) -> None:
        self._finish(exc or ConnectionError("connection closed before the response ended"))

    def _finish(self, exc) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def _head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[:end + 4]
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise ValueError(f"not an HTTP response: {lines[0][:100]!r}")
        self.status = int(parts[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if not self.chunked and "content-length" in headers:
            self.remaining = int(headers["content-length"])
        return True

    def _body(self, now: float) -> None:
        buf = self.buf
        if not self.chunked:
            take = len(buf) if self.remaining is None else min(len(buf), self.remaining)
            self._content(bytes(buf[:take]), now)
            del buf[:take]
            if self.remaining is not None:
                self.remaining -= take
                if self.remaining == 0:
                    self._finish(None)
            return
        pos = 0
        while True:
            if self.chunk_left == 0:          # at a size line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
                pos = eol + 2
                if size == 0:                  # the last chunk (trailers are not used here)
                    del buf[:]
                    self._finish(None)
                    return
                self.chunk_left = size + 2
            if pos >= len(buf):
                break
            take = min(len(buf) - pos, self.chunk_left)
            data_end = pos + min(take, max(0, self.chunk_left - 2))  # leave the chunk's CRLF out
            if data_end > pos:
                self._content(bytes(buf[pos:data_end]), now)
            self.chunk_left -= take
            pos += take
        del buf[:pos]

    def _content(self, data: bytes, now: float) -> None:
        if self.status != 200:
            self.body += data
            return
        line = self.line
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                line += data[start:]
                return
            if line:
                line += data[start:nl]
                text, line[:] = bytes(line), b""
            else:
                text = data[start:nl]
            start = nl + 1
            if text.startswith(b"data:"):
                self.on_data(text[5:].strip(), now)


class Target:
    """Where requests go: scheme, host, port, path prefix and headers, parsed once from --base-url."""

    def __init__(self, base_url: str, api_key: str | None, request_timeout: float):
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise SystemExit(f"--base-url must be http(s)://host[:port][/prefix], got {base_url!r}")
        self.host, self.prefix = u.hostname, u.path.rstrip("/")
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if u.scheme == "https" else None
        host = self.host if u.port is None else f"{self.host}:{u.port}"
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self.head = (f"Host: {host}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n"
                     f"{auth}Connection: close\r\n")
        self.timeout = request_timeout

    def request(self, path: str, body: bytes) -> bytes:
        return (f"POST {self.prefix}{path} HTTP/1.1\r\n{self.head}Content-Length: {len(body)}\r\n\r\n".encode()
                + body)


async def send(target: Target, path: str, payload: dict, prompt: Prompt, text: list[str] | None = None) -> Result:
    """One streamed request; `text` (optional) collects the streamed answer (content, reasoning too)."""
    result = Result(prompt_tokens=prompt.input_len)
    start = time.perf_counter()
    state = {"last": start, "done": False}

    def on_data(data: bytes, now: float) -> None:
        if state["done"] or result.error:
            return
        if data == b"[DONE]":
            state["done"] = True
            return
        chunk = _loads(data)
        if "error" in chunk:
            result.error = f"stream error: {str(chunk['error'])[:300]}"
            return
        if chunk.get("usage"):
            usage = chunk["usage"]
            result.usage_reported = True
            result.output_tokens = usage.get("completion_tokens", 0)
            result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            result.cached_tokens = cached if isinstance(cached, int) else None
        if text is not None:
            for c in chunk.get("choices") or ():
                delta = c.get("delta") or {}
                text.append(delta.get("reasoning_content") or delta.get("reasoning") or "")
                text.append(c.get("text") or delta.get("content") or "")
        if any(_is_token_chunk(c) for c in chunk.get("choices") or ()):
            if result.ttft == 0.0:
                result.ttft = now - start
            else:
                result.itl.append(now - state["last"])
            state["last"] = now

    loop = asyncio.get_running_loop()
    opened = []

    async def exchange() -> None:
        transport, stream = await loop.create_connection(
            lambda: _Stream(on_data), target.host, target.port, ssl=target.ssl,
            server_hostname=target.host if target.ssl else None)
        opened.append((transport, stream))
        transport.write(target.request(path, _dumps(payload)))
        await stream.done

    try:
        await asyncio.wait_for(exchange(), target.timeout)
    except (OSError, ValueError, asyncio.TimeoutError) as exc:
        if not result.error:
            result.error = f"{type(exc).__name__}: {exc or 'no response within --request-timeout'}"[:300]
        return result
    finally:
        for transport, _ in opened:
            transport.close()
    stream = opened[0][1]
    if stream.status != 200:
        result.error = f"HTTP {stream.status}: {bytes(stream.body).decode(errors='replace')[:300]}"
        return result
    if result.error:
        return result
    result.latency = time.perf_counter() - start
    if not state["done"]:
        result.error = "stream ended without [DONE]"
        return result
    if result.ttft == 0.0:  # no visible text at all (e.g. only special tokens): first token ~ the end
        result.ttft = result.latency
    if not result.usage_reported:
        result.output_tokens = prompt.output_len
    result.ok = True
    return result


class Progress:
    """tqdm when it is installed, else a line every 10%."""

    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, mininterval=1.0) if tqdm else None
        self.total, self.desc, self.count = total, desc, 0

    def update(self) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update()
        elif self.count == self.total or self.count % max(1, self.total // 10) == 0:
            print(f"{self.desc}: {self.count}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def reset_prefix_cache(args) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=60.0, headers=headers) as client:
        response = await client.post(args.base_url.rstrip("/") + "/reset_prefix_cache")
    if response.status_code != 200:
        print(f"--reset-prefix-cache: the server answered {response.status_code}; its cache is kept",
              file=sys.stderr)


async def run_level(args, prompts: list[Prompt], model: str, concurrency: int | None,
                    conversations: list[list[Prompt]] | None = None) -> dict:
    endpoint = "/v1/completions" if args.dataset == "random" else "/v1/chat/completions"
    target = Target(args.base_url, args.api_key, args.request_timeout)
    common = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
              "temperature": args.temperature}
    if args.json_schema:
        common["response_format"] = {"type": "json_schema", "json_schema": {
            "name": args.json_schema.stem, "schema": json.loads(args.json_schema.read_text())}}
    if args.chat_template_kwargs is not None and endpoint.endswith("/chat/completions"):
        common["chat_template_kwargs"] = args.chat_template_kwargs
    limit = concurrency or len(prompts)
    # not measured: first-call costs (allocations, lazy imports); a multi-turn warm-up talks of something else
    warmups = [Prompt({"messages": [{"role": "user", "content": "warm up"}]}, 2, 8)] * args.warmup \
        if conversations else prompts[:args.warmup]
    for prompt in warmups:
        warm = await send(target, endpoint, {**common, **prompt.body, "max_tokens": 8}, prompt)
        if not warm.ok:
            raise SystemExit(f"warm-up request failed: {warm.error}")
    if args.reset_prefix_cache:
        await reset_prefix_cache(args)

    semaphore = asyncio.Semaphore(limit)
    total = sum(map(len, conversations)) if conversations else len(prompts)
    progress = Progress(total, f"concurrency {concurrency or 'inf'}")
    if conversations:
        return await _run_conversations(args, target, endpoint, common, conversations, semaphore, progress,
                                        concurrency)

    async def one(prompt: Prompt) -> Result:
        async with semaphore:
            result = await send(target, endpoint, {**common, **prompt.body, "max_tokens": prompt.output_len}, prompt)
        progress.update()
        return result

    gaps = arrival_gaps(random.Random(args.seed + 1), len(prompts), args.request_rate, args.burstiness)
    start = time.perf_counter()
    tasks = []
    for prompt, gap in zip(prompts, gaps):
        if gap:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(prompt)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    progress.close()
    return summarise(args, results, duration, concurrency)


async def _run_conversations(args, target, endpoint, common, conversations, semaphore, progress,
                             concurrency) -> dict:
    """multi-turn: the conversations start together (at most --max-concurrency requests in flight); each
    turn resends the history with the answers the server gave."""
    results: list[Result] = []

    async def conversation(turns: list[Prompt]) -> None:
        messages, sent = [], 0
        for turn in turns:
            messages.append({"role": "user", "content": turn.body["user"]})
            text: list[str] = []
            async with semaphore:
                result = await send(target, endpoint, {**common, "messages": list(messages),
                                                       "max_tokens": turn.output_len},
                                    Prompt({}, sent + turn.input_len, turn.output_len), text)
            progress.update()
            results.append(result)
            if not result.ok:
                return
            sent = result.prompt_tokens + result.output_tokens
            messages.append({"role": "assistant", "content": "".join(text)})

    start = time.perf_counter()
    await asyncio.gather(*(conversation(turns) for turns in conversations))
    duration = time.perf_counter() - start
    progress.close()
    return summarise(args, results, duration, concurrency)


# ------------------------------------------------------------------------------------------ metrics

def _stats(values_s: list[float]) -> dict:
    """mean / median / p90 / p99 in milliseconds (linear interpolation between order statistics)."""
    if not values_s:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    ordered = sorted(v * 1000 for v in values_s)

    def pct(q: float) -> float:
        pos = (len(ordered) - 1) * q / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    out = {"mean": sum(ordered) / len(ordered)}
    out.update({("median" if q == 50 else f"p{q}"): pct(q) for q in PERCENTILES})
    return out


def summarise(args, results: list[Result], duration: float, concurrency: int | None) -> dict:
    ok = [r for r in results if r.ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    reported = [r for r in ok if r.cached_tokens is not None]
    slos = args.goodput or {}

    def meets_slos(r: Result) -> bool:
        tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        measured = {"ttft": r.ttft, "tpot": tpot, "e2el": r.latency}
        return all(measured[k] * 1000 <= limit for k, limit in slos.items())

    errors = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "max_concurrency": concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": [{"error": e, "count": n} for e, n in errors.items()],
        "duration_s": duration,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "output_tokens_from_usage": sum(r.usage_reported for r in ok),
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
        # prompt tokens the server served from its prefix cache, of the requests that report it
        "cached_prompt_share": (sum(r.cached_tokens for r in reported) / max(1, sum(r.prompt_tokens for r in reported))
                                if reported else None),
        "goodput": (sum(map(meets_slos, ok)) / duration) if slos else None,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats(tpots),
        "itl_ms": _stats([gap for r in ok for gap in r.itl]),
        "e2el_ms": _stats([r.latency for r in ok]),
        "per_request": [{"ttft_ms": r.ttft * 1000, "e2el_ms": r.latency * 1000, "prompt_tokens": r.prompt_tokens,
                         "output_tokens": r.output_tokens} for r in ok],
    }


def print_table(run: dict, slos: dict | None) -> None:
    def line(label: str, value, fmt: str = "{:.2f}") -> None:
        print(f"  {label:<34}{'-' if value is None else fmt.format(value):>12}")

    print(f"\n=== max concurrency {run['max_concurrency'] or 'inf'} " + "=" * 30)
    if "loadavg_1m" in run:
        line("load average before / after", "{before:.2f} / {after:.2f}".format(**run["loadavg_1m"]), "{}")
    line("completed / failed requests", f"{run['completed']} / {run['failed']}", "{}")
    for e in run["errors"][:3]:
        print(f"    {e['count']} x {e['error']}")
    line("duration (s)", run["duration_s"])
    line("prompt / output tokens", f"{run['prompt_tokens']} / {run['output_tokens']}", "{}")
    line("request throughput (req/s)", run["request_throughput"])
    line("output token throughput (tok/s)", run["output_throughput"])
    line("total token throughput (tok/s)", run["total_token_throughput"])
    if run.get("cached_prompt_share") is not None:
        line("prompt tokens from the prefix cache", 100 * run["cached_prompt_share"], "{:.1f}%")
    if slos:
        line(f"goodput (req/s) {' '.join(f'{k}<={v:g}ms' for k, v in slos.items())}", run["goodput"])
    print(f"  {'(ms)':<14}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}")
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")):
        s = run[key]
        print(f"  {label:<14}" + "".join(f"{'-' if s[k] is None else format(s[k], '.2f'):>10}"
                                          for k in ("mean", "median", "p90", "p99")))


def print_sweep(runs: list[dict]) -> None:
    print(f"\n{'concurrency':>11}{'req/s':>9}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}"
          f"{'TPOT p99':>10}{'cached':>8}{'failed':>8}")
    for r in runs:
        share = r.get("cached_prompt_share")
        print(f"{str(r['max_concurrency'] or 'inf'):>11}{r['request_throughput']:>9.2f}{r['output_throughput']:>11.1f}"
              f"{r['ttft_ms']['median'] or 0:>10.1f}{r['ttft_ms']['p99'] or 0:>10.1f}"
              f"{r['tpot_ms']['median'] or 0:>10.1f}{r['tpot_ms']['p99'] or 0:>10.1f}"
              f"{'-' if share is None else f'{100 * share:.0f}%':>8}{r['failed']:>8}")


def plot(result_files: list[Path], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plotting needs matplotlib (pip install matplotlib); the results are saved") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for path in result_files:
        doc = json.loads(path.read_text())
        runs = sorted(doc["runs"], key=lambda r: r["output_throughput"])
        label = doc["meta"].get("label") or path.stem
        x = [r["output_throughput"] for r in runs]
        for ax, key in zip(axes, ("ttft_ms", "tpot_ms")):
            y = [r[key]["median"] for r in runs]
            ax.plot(x, y, marker="o", label=label)
            for xi, yi, r in zip(x, y, runs):
                ax.annotate(f"c={r['max_concurrency'] or 'inf'}", (xi, yi), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
    for ax, title in zip(axes, ("TTFT p50 (ms)", "TPOT p50 (ms)")):
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs output throughput")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"plot: {out}")


# ------------------------------------------------------------------------------------------ main

def _rate(text: str) -> float:
    rate = float(text)
    if rate <= 0:
        raise argparse.ArgumentTypeError("request rate must be > 0 (inf: all at once)")
    return rate


def _slos(items: list[str]) -> dict:
    slos = {}
    for item in items:
        key, _, ms = item.partition(":")
        if key not in SLO_KEYS or not ms:
            raise SystemExit(f"--goodput: bad SLO {item!r}; want KEY:MS with KEY in {', '.join(SLO_KEYS)}")
        slos[key] = float(ms)
    return slos


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none or the help already gives it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_Defaults)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server under test")
    ap.add_argument("--model", help="the name to send (default: the first of GET /v1/models)")
    ap.add_argument("--api-key")
    ap.add_argument("--tokenizer", help="checkpoint dir or tokenizer.json: the vocabulary of random prompts, "
                                        "decoding for --text, exact chat prompt lengths")
    ap.add_argument("--dataset", choices=["random", "chat", "shared-prefix", "multi-turn"], default="random")
    ap.add_argument("--text", action="store_true", help="random dataset: send the decoded text, not token ids")
    ap.add_argument("--vocab-size", type=int, default=32000, help="random ids below this when no --tokenizer")
    ap.add_argument("--min-token-id", type=int, default=100, help="random ids from here (skips special tokens)")
    ap.add_argument("--input-len", type=Length.parse, default=Length(256, 256), help="N or LOW:HIGH (uniform)")
    ap.add_argument("--output-len", type=Length.parse, default=Length(128, 128), help="N or LOW:HIGH (uniform)")
    ap.add_argument("--num-prompts", type=int, default=64, help="requests (multi-turn: conversations)")
    ap.add_argument("--shared-len", type=int, default=2000, help="shared-prefix: tokens of the shared system prompt")
    ap.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    ap.add_argument("--reset-prefix-cache", action="store_true",
                    help="POST /reset_prefix_cache before each level (after its warm-up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh-prompts", action="store_true",
                    help="with --sweep-concurrency: other prompts at each level (seed + 1000 per level), so no "
                         "engine's prefix cache serves a level from an earlier one")
    ap.add_argument("--temperature", type=float, default=0.0, help="sent with every request (0: greedy)")
    ap.add_argument("--json-schema", type=Path, metavar="FILE",
                    help="send this JSON schema as response_format with every request (structured outputs)")
    ap.add_argument("--chat-template-kwargs", type=json.loads, metavar="JSON",
                    help='sent with every chat request, e.g. \'{"enable_thinking": false}\' (a reasoning model\'s '
                         'grammar only starts after its reasoning)')
    ap.add_argument("--request-rate", type=_rate, default=math.inf, help="requests/s (Poisson), inf: all at once")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 = Poisson")
    ap.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: no limit)")
    ap.add_argument("--sweep-concurrency", help="comma-separated levels, e.g. 1,8,32 (overrides --max-concurrency)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured short requests before each level")
    ap.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:5000")
    ap.add_argument("--request-timeout", type=float, default=1800.0, help="seconds per request")
    ap.add_argument("--wait-ready", type=float, default=0.0, help="poll /v1/models up to this many seconds first")
    ap.add_argument("--label", help="this server's name in tables and plots")
    ap.add_argument("--result-file", type=Path, help="JSON results (default: <label>-<dataset>-<time>.json in "
                    "$BENCH_CACHE/results, ~/.cache/exaserve-bench/results unless set)")
    ap.add_argument("--plot-file", type=Path, help="PNG (default: beside the result file, when sweeping)")
    ap.add_argument("--plot", nargs="+", type=Path, metavar="RESULT_JSON",
                    help="only draw the given result files into --plot-file, send nothing")
    ap.add_argument("--import-vllm", nargs="+", type=Path, metavar="VLLM_JSON",
                    help="send nothing: convert result files of `vllm bench serve --save-result` (one per "
                         "concurrency level) into one result file of this script's format (--result-file, "
                         "--label), so tables compare either client's runs")
    args = ap.parse_args(argv)
    args.goodput = _slos(args.goodput)
    if args.text and not args.tokenizer:
        ap.error("--text needs --tokenizer")
    if args.burstiness <= 0:
        ap.error("--burstiness must be > 0")
    return args


async def resolve_model(args) -> str:
    deadline = time.monotonic() + args.wait_ready
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=10.0, headers=headers) as client:
        while True:
            try:
                response = await client.get(args.base_url.rstrip("/") + "/v1/models")
                response.raise_for_status()
                models = [m["id"] for m in response.json()["data"]]
                break
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                if time.monotonic() >= deadline:
                    raise SystemExit(f"{args.base_url}: no /v1/models ({exc})") from None
                await asyncio.sleep(0.5)
    if args.model:
        return args.model
    if not models:
        raise SystemExit(f"{args.base_url}: /v1/models lists no model")
    return models[0]


def _run_loop(main):
    """asyncio.run on uvloop when installed: less CPU per streamed token, which the server under test would
    otherwise lose."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def from_vllm(doc: dict) -> dict:
    """One run of this script's format from a `vllm bench serve --save-result` document (its client, its
    prompts; --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 90,99 for every percentile here)."""
    def stats(metric: str) -> dict:
        return {"mean": doc.get(f"mean_{metric}_ms"), "median": doc.get(f"median_{metric}_ms"),
                "p90": doc.get(f"p90_{metric}_ms"), "p99": doc.get(f"p99_{metric}_ms")}

    errors: dict[str, int] = {}
    for e in doc.get("errors") or []:
        if e:
            errors[e] = errors.get(e, 0) + 1
    failed = doc.get("failed", doc.get("num_prompts", doc["completed"]) - doc["completed"])
    if failed > sum(errors.values()):   # vLLM's client records an HTTP error without a reason as ""
        errors["(vLLM's client recorded no message)"] = failed - sum(errors.values())
    return {
        "max_concurrency": doc.get("max_concurrency"),
        "completed": doc["completed"],
        "failed": failed,
        "errors": [{"error": e, "count": n} for e, n in errors.items()],
        "duration_s": doc["duration"],
        "prompt_tokens": doc["total_input_tokens"],
        "output_tokens": doc["total_output_tokens"],
        "request_throughput": doc["request_throughput"],
        "output_throughput": doc["output_throughput"],
        "total_token_throughput": doc["total_token_throughput"],
        "cached_prompt_share": None,   # vLLM's client does not read usage.prompt_tokens_details
        "ttft_ms": stats("ttft"), "tpot_ms": stats("tpot"), "itl_ms": stats("itl"), "e2el_ms": stats("e2el"),
    }


def import_vllm(args) -> int:
    docs = [json.loads(path.read_text()) for path in args.import_vllm]
    runs = sorted((from_vllm(d) for d in docs), key=lambda r: r["max_concurrency"] or math.inf)
    meta = {"label": args.label, "client": "vllm bench serve", "model": docs[0].get("model_id"),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # when imported, after the runs
            "vllm_dates": [d.get("date") for d in docs], "imported_from": [str(p) for p in args.import_vllm],
            "command": " ".join(sys.argv)}
    if not args.result_file:
        raise SystemExit("--import-vllm needs --result-file")
    args.result_file.parent.mkdir(parents=True, exist_ok=True)
    args.result_file.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    for run in runs:
        print_table(run, None)
    print(f"results: {args.result_file}")
    return 1 if any(r["completed"] == 0 for r in runs) else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.import_vllm:
        return import_vllm(args)
    if args.plot:
        plot(args.plot, args.plot_file or Path("benchmarks/results/plot.png"))
        return 0
    levels = ([int(c) for c in args.sweep_concurrency.split(",")] if args.sweep_concurrency
              else [args.max_concurrency])
    model = asyncio.run(resolve_model(args))
    tokenizer = load_tokenizer(args.tokenizer)
    prompts = build_prompts(args, tokenizer)
    conversations = build_conversations(args, tokenizer) if args.dataset == "multi-turn" else None
    label = args.label or model.rstrip("/").rsplit("/", 1)[-1]
    print(f"{label}: {args.num_prompts} x {args.dataset} prompts, input {args.input_len}, output {args.output_len}, "
          f"rate {args.request_rate}, burstiness {args.burstiness}, levels {levels}, endpoint {args.base_url}",
          file=sys.stderr)

    runs = []
    for i, level in enumerate(levels):
        if args.fresh_prompts and i:   # new prompts at each level: no engine reuses an earlier level's prefixes
            args.seed += 1000
            prompts = build_prompts(args, tokenizer)
            conversations = build_conversations(args, tokenizer) if args.dataset == "multi-turn" else None
        load_before = os.getloadavg()[0]
        run = _run_loop(run_level(args, prompts, model, level, conversations))
        # The machine's 1-minute load average around the run: other work on it skews every number.
        run["loadavg_1m"] = {"before": load_before, "after": os.getloadavg()[0]}
        print_table(run, args.goodput)
        runs.append(run)
    if len(runs) > 1:
        print_sweep(runs)

    meta = {"label": label, "model": model, "base_url": args.base_url,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            **{k: (str(v) if isinstance(v, (Length, Path)) else v) for k, v in vars(args).items()
               if k not in ("plot", "plot_file", "result_file", "api_key")}}
    if meta["request_rate"] == math.inf:
        meta["request_rate"] = "inf"  # JSON has no infinity
    cache = Path(os.environ.get("BENCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                 / "exaserve-bench")
    result_file = args.result_file or cache / "results" / (
        f"{label}-{args.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    print(f"results: {result_file}")
    if len(runs) > 1 or args.plot_file:
        try:
            plot([result_file], args.plot_file or result_file.with_suffix(".png"))
        except SystemExit as exc:  # a missing plotting library must not turn a finished run into a failure
            print(f"no plot: {exc}", file=sys.stderr)
    return 1 if any(r["completed"] == 0 for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
