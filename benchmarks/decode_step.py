"""Decode step time on a GPU, eager and with CUDA graphs (engine/cuda_graph.py), at several batch sizes.

    python benchmarks/decode_step.py                       # both below, batches 1 8 32
    python benchmarks/decode_step.py --only bench --batch 1 8

- bench: the engine on the bench checkpoint (`make_tiny_checkpoint(preset="bench")`, bf16, 8 layers): a whole
  engine step (schedule, inputs, forward, logits, greedy sampling, update) of `batch` requests with 256-token
  prompts; also reports whether the greedy tokens are the same with graphs on and off (bf16: a graph's fixed
  block-table width may pick another split-K count for long-context attention, which can flip a near tie).
- layer: the model forward alone (no engine, no logits) of K-EXAONE-size layers with random weights: hidden
  6144, 64 q / 8 kv heads of 128, 128 experts of width 2048, top-8 plus a shared expert; one sliding layer
  (window 128) and one global layer (pages of 16), each sequence at a context of --context tokens. Reported
  per layer (the step's time / 2).

Times are medians of --steps steps after a warm-up, with the GPU synchronised around each run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_ms(fn, steps: int) -> float:
    for _ in range(3):
        fn()
    _sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# K-EXAONE's shapes, two MoE layers: one sliding, one global
LAYER = dict(
    model_type="exaone_moe", vocab_size=1024, hidden_size=6144, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=2, num_attention_heads=64, num_key_value_heads=8, head_dim=128, sliding_window=128,
    layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["sparse", "sparse"], num_experts=128,
    num_experts_per_tok=8, num_shared_experts=1, routed_scaling_factor=2.5, rope_theta=1e6)


def bench_engine(batches, steps, graphs: bool, path: Path) -> tuple[dict, dict]:
    """({batch: ms per engine step}, {batch: greedy tokens of the timed steps})."""
    from exaserve.engine import LLM, SamplingParams
    llm = LLM(str(path), dtype="bfloat16", kernels="triton", max_num_seqs=max(batches), max_num_batched_tokens=8192,
              enable_prefix_caching=False)
    engine = llm.engine
    if graphs:
        engine.runner.use_cuda_graphs(max(batches), engine.max_model_len)
    times, tokens = {}, {}
    try:
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            for i in range(batch):
                prompt = torch.randint(100, engine.model_config.vocab_size, (256,), generator=gen).tolist()
                engine.add_request(f"{batch}-{i}", prompt, SamplingParams(max_tokens=steps + 40, temperature=0.0,
                                                                          ignore_eos=True))
            while any(not r.output_token_ids for r in engine.requests.values()):
                engine.step()
            times[batch] = _median_ms(engine.step, steps)
            tokens[batch] = {r.request_id: list(r.output_token_ids) for r in engine.requests.values()}
            for rid in list(engine.requests):
                engine.abort(rid)
    finally:
        engine.close()
    return times, tokens


def bench_layer(batches, steps, graphs: bool, context: int, device="cuda", layer=None) -> dict:
    """{batch: ms per layer} of the K-EXAONE-size two-layer forward (one sliding, one global)."""
    from exaserve import kernels
    from exaserve.engine.config import ModelConfig
    from exaserve.engine.cuda_graph import DecodeGraphs
    from exaserve.engine.kv_cache import KVCache
    from exaserve.engine.model import AttnMetadata, ExaoneMoeModel
    cfg = ModelConfig.from_dict(dict(layer or LAYER, max_position_embeddings=context + 64))
    dev, dtype = torch.device(device), torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device("meta"):
        model = ExaoneMoeModel(kernels.select("triton", dev), cfg, dtype=dtype)
    model = model.to_empty(device=dev)
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.init_rope(context + 64, dev)
    B = max(batches)
    bs = 16
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    kv = KVCache.create(cfg, kv_cache_memory=2 * B * (context + 64) * per_token * 2 + (1 << 28),
                        max_num_seqs=B, max_model_len=context + 64, block_size=bs, dtype=dtype, device=dev)
    width = -(-(context + 64) // bs)
    ring_len = kv.ring.ring_len
    eager = model.forward
    decode = DecodeGraphs(eager, kv, B, width, dev) if graphs else None
    if decode is not None:
        decode.capture(None if dev.type == "cuda" else _eager_capture(decode))
    times = {}
    for b in batches:
        s = torch.arange(b, device=dev)
        tables = (s[:, None] * width + torch.arange(width, device=dev)).int()
        meta = AttnMetadata(query_start_loc=torch.arange(b + 1, device=dev, dtype=torch.int32),
                            context_lens=torch.full((b,), context, device=dev, dtype=torch.int32),
                            seq_lens=torch.full((b,), context + 1, device=dev, dtype=torch.int32),
                            block_tables=tables, slot_mapping=tables[:, context // bs].long() * bs + context % bs,
                            ring_slots=s, ring_mapping=s * ring_len + context % ring_len)
        ids = torch.randint(0, cfg.vocab_size, (b,), device=dev)
        pos = torch.full((b,), context, device=dev)
        forward = decode.forward if decode is not None else eager
        times[b] = _median_ms(partial(forward, ids, pos, meta, kv), steps) / cfg.num_layers
    return times


def _eager_capture(decode):
    """A smoke test's stand-in for CUDA capture on a CPU: replay = the eager forward over the static inputs."""
    from exaserve.engine.cuda_graph import Captured

    def capture_one(size):
        args = (*decode.static.views(size), decode.kv)
        output = decode.eager(*args).clone()
        return Captured(lambda: output.copy_(decode.eager(*args)), output)
    return capture_one


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--context", type=int, default=1024, help="layer: tokens before the decoded one")
    ap.add_argument("--only", choices=["bench", "layer"])
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("decode_step.py needs a CUDA GPU")
    out = {}
    if args.only in (None, "bench"):
        from exaserve.engine.tiny import make_tiny_checkpoint
        path = make_tiny_checkpoint(Path(tempfile.mkdtemp()), preset="bench", with_mtp=False)
        eager, eager_tokens = bench_engine(args.batch, args.steps, False, path)
        graphed, graphed_tokens = bench_engine(args.batch, args.steps, True, path)
        same = {b: eager_tokens[b] == graphed_tokens[b] for b in args.batch}
        out["bench"] = dict(eager_ms=eager, graphed_ms=graphed, same_greedy_tokens=same)
        for b in args.batch:
            print(f"bench checkpoint  batch {b:3d}: engine step {eager[b]:7.3f} ms eager, {graphed[b]:7.3f} ms "
                  f"graphed ({eager[b] / graphed[b]:.2f}x); greedy tokens graphs on = off: {same[b]}", flush=True)
    if args.only in (None, "layer"):
        eager = bench_layer(args.batch, args.steps, False, args.context)
        graphed = bench_layer(args.batch, args.steps, True, args.context)
        out["layer"] = dict(eager_ms=eager, graphed_ms=graphed, context=args.context)
        for b in args.batch:
            print(f"K-EXAONE layer    batch {b:3d}: {eager[b]:7.3f} ms eager, {graphed[b]:7.3f} ms graphed per layer "
                  f"(context {args.context})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
