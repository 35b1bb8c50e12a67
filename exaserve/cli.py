"""`exaserve` command line: `serve` runs the OpenAI-compatible server, `make-tiny` writes a test checkpoint."""

import argparse
import asyncio
import dataclasses
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("exaserve")

STATS_INTERVAL_S = 10.0
ENGINE_WATCH_INTERVAL_S = 0.5
TINY_MODEL_NAME = "exaserve-tiny"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def _bytes(text: str) -> int:
    """A size such as 40GiB or 512M (binary multiples), or a plain number of bytes."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8GiB, 512MiB, 1073741824)")
    number, unit = float(match[1]), match[2].upper()
    return int(number * 1024 ** "_KMGT".index(unit)) if unit else int(number)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with each option's default (where it has one and its help does not already say it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _serve_parser() -> argparse.ArgumentParser:
    from exaserve.engine import envs
    from exaserve.engine.config import DTYPES, KERNEL_BACKENDS, MAX_SPECULATIVE_TOKENS
    from exaserve.server.app import DEFAULT_MAX_N, DEFAULT_MAX_REQUEST_BYTES

    parser = argparse.ArgumentParser(prog="exaserve serve", description="Serve an EXAONE-MoE checkpoint over the "
                                     "OpenAI API. Without --model: a built-in tiny random checkpoint.",
                                     epilog="environment variables:\n" + envs.describe(),
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (Hugging Face layout)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights and KV cache; auto: the checkpoint's")
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--kernels", choices=KERNEL_BACKENDS,
                        help="kernel backend (default: $EXASERVE_KERNELS, else auto: triton on CUDA, the C++ kernels "
                        "on a CPU)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run decode steps eagerly: no CUDA graphs (captured at start-up on CUDA otherwise)")
    parser.add_argument("--max-model-len", type=_positive, help="longest prompt + output (default: the model's)")
    parser.add_argument("--max-num-seqs", type=_positive, default=64, help="requests in one batch")
    parser.add_argument("--max-num-batched-tokens", type=_positive, default=2048, help="tokens in one step")
    parser.add_argument("--block-size", type=_positive, default=16, help="tokens per KV block (global layers)")
    parser.add_argument("--kv-cache-memory", type=_bytes,
                        help="bytes for both KV pools per rank, e.g. 40GiB (default: what --gpu-memory-utilization "
                        "leaves after the weights; 2GiB on CPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="share of each GPU's memory for the weights and the KV pools")
    parser.add_argument("--served-model-name", help="the name clients send as `model` (default: --model)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $EXASERVE_API_KEY)")
    parser.add_argument("--chat-template", type=Path, help="a Jinja2 file that replaces the checkpoint's template")
    parser.add_argument("--num-speculative-tokens", type=int, default=0, choices=range(MAX_SPECULATIVE_TOKENS + 1),
                        help="MTP draft tokens per step, 0 = off (needs the checkpoint's mtp.* weights)")
    parser.add_argument("--spec-max-batch-size", type=_positive, default=32,
                        help="no drafting in steps with more running requests than this")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the KV cache of prompt prefixes computed before, exactly (sliding-window rings "
                        "included); --no-enable-prefix-caching turns it off")
    parser.add_argument("-tp", "--tensor-parallel-size", type=_positive, default=1,
                        help="split the model over this many ranks (GPUs; processes on a CPU)")
    parser.add_argument("--enable-expert-parallel", action="store_true",
                        help="with -tp N: whole experts per rank instead of a slice of every expert")
    parser.add_argument("--quantization", choices=["fp8"],
                        help="fp8: quantize the checkpoint's linear weights to block FP8 at load (an FP8 checkpoint "
                             "is read as FP8 without it)")
    parser.add_argument("--nnodes", type=_positive, default=1, help="nodes the -tp ranks are spread over")
    parser.add_argument("--node-rank", type=int, default=0,
                        help="this node (0 serves the API; the others only run their ranks)")
    parser.add_argument("--master-addr", default="127.0.0.1", help="node 0's address, where the ranks meet")
    parser.add_argument("--master-port", type=int, help="node 0's port for that (needed with --nnodes > 1)")
    parser.add_argument("--max-queue", type=_positive,
                        help="answer 429 while this many requests wait for their first token (default: no limit)")
    parser.add_argument("--max-request-size", type=_bytes, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="larger request bodies get 413 (e.g. 8MiB)")
    parser.add_argument("--max-n", type=_positive, default=DEFAULT_MAX_N,
                        help="the most choices one request may ask for (n)")
    parser.add_argument("--shutdown-timeout", type=_seconds, default=30.0,
                        help="on SIGTERM/SIGINT, how long requests in flight may run on; then they end with an "
                        "error (a second signal exits at once)")
    parser.add_argument("--request-timeout", type=_seconds, default=30.0,
                        help="how long a client may take to send a request's headers and body")
    parser.add_argument("--timeout-keep-alive", type=_seconds, default=5.0,
                        help="close a kept-alive connection idle this long between requests")
    return parser


def builtin_tiny_checkpoint() -> Path:
    """The tiny random checkpoint, made once per version into the user's cache directory."""
    from exaserve import __version__
    from exaserve.engine.tiny import make_tiny_checkpoint

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "exaserve"
    path = root / f"tiny-{__version__}"
    if (path / "model.safetensors").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    # Build beside it and rename, so a concurrent or interrupted start never sees half a checkpoint.
    scratch = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    make_tiny_checkpoint(scratch)
    try:
        scratch.rename(path)
    except OSError:  # another process finished first
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def _describe_pools(info: dict) -> str:
    mib = 1 << 20
    spec, tp = info["num_speculative_tokens"], info["tensor_parallel_size"]
    ranks = (f"tensor parallel {tp}{' with expert parallel' if info['expert_parallel'] else ''}; per rank: "
             if tp > 1 else "")
    return (f"{ranks}KV pools: {info['num_blocks']} blocks x {info['block_size']} tokens for global layers "
            f"({info['paged_bytes'] / mib:.1f} MiB), {info['ring_slots']} ring slots x {info['ring_len']} tokens "
            f"for sliding layers ({info['ring_bytes'] / mib:.1f} MiB)"
            + (f"; prefix caching with {info['snapshot_blocks']} ring snapshot blocks "
               f"({info['snapshot_bytes'] / mib:.1f} MiB)" if info["prefix_caching"] else "; prefix caching off")
            + f"; max_model_len {info['max_model_len']}"
            + (f"; MTP speculative decoding with {spec} draft tokens" if spec else ""))


async def _log_stats(engine) -> None:
    """A line every STATS_INTERVAL_S seconds while there is work, like vLLM's."""
    last, last_time = engine.stats(), time.monotonic()
    while True:
        await asyncio.sleep(STATS_INTERVAL_S)
        stats, now = engine.stats(), time.monotonic()
        prompt = stats["prompt_tokens"] - last["prompt_tokens"]
        generated = stats["generation_tokens"] - last["generation_tokens"]
        queries = stats["prefix_cache_queries"] - last["prefix_cache_queries"]
        if prompt or generated or queries or stats["running"] or stats["waiting"]:
            elapsed = now - last_time
            hits = stats["prefix_cache_hits"] - last["prefix_cache_hits"]
            log.info("Running: %d reqs, Waiting: %d reqs, Prompt: %.1f tokens/s, Generation: %.1f tokens/s, "
                     "KV blocks: %.1f%% (%d/%d), Ring slots: %.1f%% (%d/%d), Preemptions: %d, "
                     "Prefix cache hit rate: %.1f%%",
                     stats["running"], stats["waiting"], prompt / elapsed, generated / elapsed,
                     100 * stats["blocks_used"] / max(1, stats["blocks_total"]), stats["blocks_used"],
                     stats["blocks_total"], 100 * stats["ring_slots_used"] / max(1, stats["ring_slots_total"]),
                     stats["ring_slots_used"], stats["ring_slots_total"], stats["preemptions"],
                     100 * hits / max(1, queries))
            if "acceptance_per_position" in stats:
                log.info("Speculative decoding: acceptance per position %s, mean emitted per verify %.2f, "
                         "drafting off in %d steps (batch too large)",
                         " ".join(f"{r:.2f}" for r in stats["acceptance_per_position"]),
                         stats["mean_emitted_per_verify"], stats["spec_disabled_steps"])
        last, last_time = stats, now


def _run_loop(main) -> None:
    """Run on uvloop's event loop when installed (a default dependency on Linux): less CPU per streamed token,
    which on a small CPU host is taken from the model's threads."""
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed: serving on the default asyncio event loop")
        asyncio.run(main)
    else:
        uvloop.run(main)


async def _watch_engine(server, engine, failed: list) -> None:
    """If the engine thread dies, /health already answers 503; stop serving too, so the process exits non-zero
    and an orchestrator restarts it."""
    while engine.is_healthy():
        await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
    log.error("the engine stopped: %s; shutting down", engine.problem())
    failed.append(True)
    server.should_exit = True


async def _run(server, engine, sock, failed: list) -> None:
    tasks = [asyncio.create_task(_log_stats(engine)), asyncio.create_task(_watch_engine(server, engine, failed))]
    try:
        await server.serve(sockets=[sock])
    finally:
        for task in tasks:
            task.cancel()


def _raise_open_file_limit(want: int = 65536) -> None:
    """Each connection is a file descriptor; the common soft limit of 1024 would refuse clients long before the
    engine is busy (vLLM raises it too). Up to the hard limit, never down."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)


def serve(argv: list[str]) -> int:
    args = _serve_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _raise_open_file_limit()
    _nodes_from_torchrun(args)
    if args.node_rank != 0:
        return _serve_node(args)
    import uvicorn

    from exaserve.engine import AsyncEngine, envs
    from exaserve.engine.config import EngineConfig
    from exaserve.server import http
    from exaserve.server.app import build_app

    try:
        # The port first: a busy one fails the start now, not after the model has loaded.
        sock = http.bind(args.host, args.port)
    except OSError as exc:
        sys.exit(f"exaserve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    try:
        env = envs.read()
    except ValueError as exc:
        sys.exit(f"exaserve: {exc}")
    api_key = args.api_key or env.api_key

    chat_template = None
    if args.chat_template is not None:
        try:
            chat_template = args.chat_template.read_text(encoding="utf-8")
        except OSError as exc:
            sys.exit(f"exaserve: cannot read --chat-template: {exc}")
    if args.model is None:
        model = builtin_tiny_checkpoint()
        name = args.served_model_name or TINY_MODEL_NAME
        log.info("No --model given: serving the built-in tiny random checkpoint at %s (its output is random text)",
                 model)
    else:
        model, name = Path(args.model), args.served_model_name or args.model
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    try:
        engine = AsyncEngine(EngineConfig(**{**options, "model": str(model)}), env=env)
    except (OSError, ValueError) as exc:  # no checkpoint, a config we cannot serve, a backend or pools that do not fit
        sys.exit(f"exaserve: cannot serve {model}: {exc}")
    info = engine.describe()
    threads = f", {info['threads']} threads" if info["threads"] else ""
    log.info("Loaded %s in %.1f s on %s: %s weights (%.1f MiB%s), %s activations and KV cache, %s kernels%s", model,
             info["load_seconds"], info["device"], info["weight_dtype"], info["weight_bytes"] / (1 << 20),
             " on rank 0" if info["tensor_parallel_size"] > 1 else "", info["dtype"], info["kernels"], threads)
    log.info(_describe_pools(info))
    app = build_app(engine, served_model_name=name, api_key=api_key, chat_template=chat_template,
                    max_queue=args.max_queue, max_request_bytes=args.max_request_size, max_n=args.max_n)
    config = uvicorn.Config(app, log_config=None, http=http.protocol(args.request_timeout),
                            timeout_keep_alive=args.timeout_keep_alive)
    server = http.Server(config, shutdown_timeout=args.shutdown_timeout,
                         on_deadline=app.state.server.fail_in_flight)
    log.info("Serving %r on http://%s:%d (OpenAI API under /v1)%s", name, args.host, args.port,
             "; API key required" if api_key else "")
    failed: list = []
    try:
        _run_loop(_run(server, engine, sock, failed))
    finally:
        engine.shutdown()
        sock.close()
    return 1 if failed else 0


def _nodes_from_torchrun(args) -> None:
    """Under torchrun (one process per node: --nproc-per-node 1), the nodes come from its environment, unless
    the flags set them."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env or args.nnodes != 1:
        return
    if env.get("LOCAL_WORLD_SIZE", "1") != "1":
        sys.exit("exaserve: run it under torchrun with --nproc-per-node 1; it starts the ranks of its node itself")
    args.nnodes, args.node_rank = int(env["WORLD_SIZE"]), int(env.get("GROUP_RANK", env["RANK"]))
    args.master_addr, args.master_port = env["MASTER_ADDR"], int(env["MASTER_PORT"])


def _serve_node(args) -> int:
    """Node > 0 of a multi-node engine: this node's ranks only (no engine, no API), until they end."""
    from exaserve.engine import envs
    from exaserve.engine.config import ConfigError, EngineConfig
    from exaserve.engine.engine_core import run_node

    if args.model is None:
        sys.exit("exaserve: --node-rank > 0 needs --model (the same checkpoint path as on node 0)")
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    try:
        config = EngineConfig(**{**options, "model": args.model})
        env = envs.read()
    except (ConfigError, ValueError) as exc:
        sys.exit(f"exaserve: {exc}")
    return run_node(config, env)


def build_kernels(argv: list[str]) -> int:
    """Compile the C++ CPU kernels now (otherwise the first CPU server or engine does it, ~30-60 s once)."""
    argparse.ArgumentParser(prog="exaserve build-kernels", description=build_kernels.__doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from exaserve.engine import envs
    from exaserve.kernels import cpu
    module = cpu.load(envs.read().cpu_ext_cflags)
    if module is None:
        print("exaserve: the C++ CPU kernels did not build (see the warning above); the torch path will be used",
              file=sys.stderr)
        return 1
    print(f"C++ CPU kernels ready: {module.__file__}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from exaserve import __version__, plan
    from exaserve.engine.tiny import main_make_tiny

    argv = sys.argv[1:] if argv is None else argv
    commands = {"serve": serve, "make-tiny": main_make_tiny, "build-kernels": build_kernels, "plan": plan.main}
    usage = ("usage: exaserve {serve,plan,make-tiny,build-kernels} [options]   (exaserve COMMAND --help lists the "
             "options); exaserve --version")
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if argv[:1] in (["-V"], ["--version"]):
        print(f"exaserve {__version__}")
        return 0
    if not argv or argv[0] not in commands:
        if argv:
            print(f"exaserve: unknown command {argv[0]!r}", file=sys.stderr)
        print(usage, file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
