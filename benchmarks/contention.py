"""Decode speed on a quiet machine against the same with one busy process per core (issue 13).

    python benchmarks/contention.py --rounds 3 --variant new= --variant spin-default=GOMP_SPINCOUNT=300000

A server always shares its cores (its event loop, the clients, other services), so the CPU path must degrade in
proportion when other work runs, not collapse. For each round and variant, one process loads the bench
checkpoint (`exaserve make-tiny --preset bench`) and greedily decodes `--tokens` tokens at batch 1, alternately on
the quiet machine and while `--busy` processes (default: one per core) spin in `while True: pass`; the busy
processes start after the model is loaded, so only decoding is measured. `--http` measures the same through
`exaserve serve` and a streaming `/v1/completions` request (decode tok/s between the first and the last token).
The table gives the median tok/s of each variant quiet and loaded and the slowdown (quiet / loaded; a fair
share of the cores is ~2x with one busy process per core). Variants are NAME=ENV or NAME@DIR=ENV, as in
step_ab.py; variables set in ENV reach the measured process before it imports torch.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from step_ab import DEFAULT_CKPT, parse_variant

BUSY_LOOP = "while True: pass"


def child(args) -> None:
    """Load once, then answer each line on stdin with one timed decode as a JSON line."""
    from exaserve.engine.llm import LLM
    from exaserve.engine.sampling_params import SamplingParams
    llm = LLM(str(args.model), max_num_seqs=4)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    # no progress bar (older checkouts, run as NAME@DIR variants, have none to turn off)
    no_bar = {"use_tqdm": False} if "use_tqdm" in inspect.signature(llm.generate).parameters else {}
    llm.generate([1, 2, 3], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), **no_bar)
    print("ready", flush=True)
    for n, _ in enumerate(sys.stdin):
        t = time.perf_counter()
        llm.generate([5, 6, 7, n % 100 + 8], params, **no_bar)
        print(json.dumps({"tok_s": args.tokens / (time.perf_counter() - t)}), flush=True)


class OfflineTarget:
    def __init__(self, root: Path, env: dict, args):
        cmd = [sys.executable, str(root / "benchmarks" / "contention.py"), "--child", "--model", str(args.model),
               "--tokens", str(args.tokens)]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=root, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the child failed to start (exit {self.proc.wait()})")

    def measure(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["tok_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpTarget:
    def __init__(self, root: Path, env: dict, args):
        self.tokens, port = args.tokens, _free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "exaserve", "serve", "--model", str(args.model), "--port", str(port),
               "--served-model-name", "bench"]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=root, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"the server did not start (exit {self.proc.returncode})")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        self._stream(8)

    def _stream(self, max_tokens: int) -> list[float]:
        """Arrival times of the token-carrying chunks of one streamed greedy completion."""
        body = {"model": "bench", "prompt": [5, 6, 7, 8], "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        request = urllib.request.Request(self.url + "/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        times = []
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                if line.startswith(b"data: {"):
                    times.append(time.perf_counter())
        return times

    def measure(self) -> float:
        times = self._stream(self.tokens)
        return (len(times) - 1) / (times[-1] - times[0])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure_loaded(target, busy: int) -> float:
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        time.sleep(0.5)  # let the scheduler see them as CPU-bound
        return target.measure()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_CKPT, help="checkpoint (default: the bench one)")
    ap.add_argument("--variant", action="append", default=[], help="NAME=ENV; repeat for each variant")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="quiet/loaded pairs per round and variant")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--busy", type=int, default=os.cpu_count(), help="busy processes (default: one per core)")
    ap.add_argument("--http", action="store_true", help="through `exaserve serve` instead of the offline LLM")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if not args.model.exists():
        raise SystemExit(f"no checkpoint at {args.model}: make it with "
                         f"`exaserve make-tiny {args.model} --preset bench`")
    variants = [parse_variant(v) for v in args.variant] or [("current", Path(__file__).resolve().parents[1], {})]
    runs: dict[tuple[str, str], list[float]] = {}
    kind = HttpTarget if args.http else OfflineTarget
    for r in range(args.rounds):
        for name, root, env in variants:
            target = kind(root, env, args)
            try:
                for _ in range(args.repeats):
                    quiet, loaded = target.measure(), measure_loaded(target, args.busy)
                    runs.setdefault((name, "quiet"), []).append(quiet)
                    runs.setdefault((name, "loaded"), []).append(loaded)
                    print(f"round {r + 1} {name:>14s} quiet {quiet:7.1f} tok/s  loaded {loaded:7.1f} tok/s",
                          flush=True)
            finally:
                target.close()
    mode = "http" if args.http else "offline"
    print(f"\n{mode}, {args.busy} busy processes, {args.tokens} tokens at batch 1")
    print(f"{'variant':>14s} {'quiet tok/s':>12s} {'loaded tok/s':>13s} {'slowdown':>9s}")
    for name, _, _ in variants:
        quiet, loaded = statistics.median(runs[(name, "quiet")]), statistics.median(runs[(name, "loaded")])
        print(f"{name:>14s} {quiet:12.1f} {loaded:13.1f} {quiet / loaded:8.2f}x")


if __name__ == "__main__":
    main()
