"""`exaserve plan`: will a checkpoint fit on N GPUs, and how much context is left for the KV cache?

Builds each tensor-parallel rank's model on the meta device (shapes only: no memory, no weights, no GPU) with
the engine's own modules and `Parallel`, so a size that does not divide fails with the engine's error, and
counts per rank:
- weight bytes (tied parameters once). `--dtype fp8`: the published FP8 checkpoint (or `--quantization fp8`)
  as the engine holds it (kernels/fp8.py): the linears it quantizes count one byte per weight (float8 e4m3)
  plus one fp32 scale per 32 rows x 128 columns; the router, embeddings, lm_head and the MTP block stay bf16
  (the router fp32, as the engine keeps it); the KV cache stays bf16;
- KV cache bytes, as KVCache.create (engine/kv_cache.py) sizes its pools: global layers store K and V of this
  rank's kv heads for every token (paged), sliding layers a ring of `sliding_window + num_speculative_tokens`
  tokens per sequence (one more ring layer for the MTP block when drafting); with prefix caching (on, as in
  the engine; --no-enable-prefix-caching) the rings' block snapshots take 1/8 of what the rings leave;
- how many sequences of 32K / 128K / 256K tokens fit in `gpu_memory * utilization - weights - reserve`, where
  the reserve (default 2 GiB) stands for activations, workspace and CUDA graphs: an estimate, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from exaserve import kernels
from exaserve.engine.config import MAX_SPECULATIVE_TOKENS, ModelConfig
from exaserve.engine.kv_cache import SNAPSHOT_SHARE
from exaserve.engine.model import MLP, ExaoneMoeModel, MoE
from exaserve.engine.parallel import Parallel
from exaserve.kernels import fp8 as fp8_layout

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CONTEXTS = (32 * 1024, 128 * 1024, 256 * 1024)
FP8_BLOCK = 128                 # columns per fp32 scale of a quantized weight, as the release's blocks
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_config(path: str | Path) -> ModelConfig:
    """A checkpoint directory (its config.json and generation_config.json) or a config.json file."""
    path = Path(path)
    if path.is_dir():
        return ModelConfig.from_pretrained(path)
    return ModelConfig.from_dict(json.loads(path.read_text()))


def _fp8_linears(model: ExaoneMoeModel):
    """Every linear the FP8 checkpoint quantizes: attention and MLP/expert projections of the main layers (not
    the router, embeddings, lm_head or MTP block)."""
    for layer in model.layers:
        yield layer.attn.qkv
        yield layer.attn.o
        mlp = layer.mlp
        if isinstance(mlp, MoE):
            yield mlp.w13
            yield mlp.w2
            mlp = mlp.shared
        if isinstance(mlp, MLP):
            yield mlp.gate_up
            yield mlp.down


def weight_bytes(model: ExaoneMoeModel, fp8: bool = False) -> int:
    """Bytes of the model's parameters as the engine holds them, a tied one once; fp8: the FP8 linears with
    their scale grids, as ExaoneMoeModel.materialize makes them (here on the meta device: no memory)."""
    if fp8:
        model.materialize("meta", {p: FP8_BLOCK for p in _fp8_linears(model)})
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        if fp8_layout.parts(p) is not None:
            total += fp8_layout.parts(p)[0].numel() * 4
    return total


def kv_bytes(cfg: ModelConfig, par: Parallel, dtype: torch.dtype, num_speculative_tokens: int) -> tuple[int, int]:
    """(paged bytes per token, ring bytes per sequence) on this rank, as KVCache.create sizes its pools."""
    per_token_layer = 2 * par.kv_heads(cfg.num_kv_heads)[1] * cfg.head_dim * dtype.itemsize
    ring_layers = len(cfg.sliding_layers) + (1 if num_speculative_tokens else 0)
    ring_len = (cfg.sliding_window or 0) + num_speculative_tokens
    return len(cfg.full_layers) * per_token_layer, ring_layers * ring_len * per_token_layer


def plan(cfg: ModelConfig, *, tp: int = 1, expert_parallel: bool = False, dtype: str = "bfloat16",
         mtp: bool = False, gpu_memory: int = 141 * GiB, utilization: float = 0.9, reserve: int = 2 * GiB,
         max_num_seqs: int = 64, block_size: int = 16, num_speculative_tokens: int = 0,
         prefix_caching: bool = True) -> dict:
    """The memory plan of every rank and the totals, as plain data (what --json prints). ValueError when a size
    does not divide (the engine's message) or the options contradict the config."""
    if num_speculative_tokens and not mtp:
        raise ValueError(f"num_speculative_tokens={num_speculative_tokens} needs the MTP block, and the plan has "
                         f"none (the config's num_nextn_predict_layers is {cfg.num_mtp_layers}; or --no-mtp)")
    fp8 = dtype == "fp8"
    weight_dtype = torch.bfloat16 if fp8 else DTYPES[dtype]
    kv_dtype = torch.bfloat16 if fp8 else weight_dtype
    usable = int(gpu_memory * utilization) - reserve
    ops = kernels.select("torch", torch.device("cpu"))
    ranks = []
    for rank in range(tp):
        par = Parallel(rank, tp, expert_parallel)
        with torch.device("meta"):
            model = ExaoneMoeModel(ops, cfg, dtype=weight_dtype, with_mtp=mtp, par=par)
        weights = weight_bytes(model, fp8)
        per_token, ring = kv_bytes(cfg, par, kv_dtype, num_speculative_tokens)
        budget = usable - weights
        # what KVCache.create makes of this budget: rings for every seat first, then blocks, never more blocks
        # than max_num_seqs sequences of max_model_len (serve's default: max_position_embeddings) could use
        block_bytes = block_size * per_token
        useful = max_num_seqs * -(-cfg.max_position_embeddings // block_size)
        # (with prefix caching, the rings' block snapshots take up to 1/SNAPSHOT_SHARE of what the rings leave)
        share = SNAPSHOT_SHARE if prefix_caching and cfg.sliding_layers else 0
        blocks = min(useful, _block_room(budget - max_num_seqs * ring, share) // block_bytes) if block_bytes else 0
        ranks.append({
            "rank": rank, "weight_bytes": weights, "kv_budget_bytes": budget, "fits": budget > 0,
            "kv_bytes_per_token": per_token, "ring_bytes_per_seq": ring,
            "max_seqs": {str(n): _sequences(budget, ring, per_token, block_size, n, share) for n in CONTEXTS},
            "engine_pool": {"ring_bytes": max_num_seqs * ring, "num_blocks": blocks},
        })
    return {
        "model": {"layers": cfg.num_layers, "global_layers": len(cfg.full_layers),
                  "sliding_layers": len(cfg.sliding_layers), "sliding_window": cfg.sliding_window,
                  "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                  "experts": cfg.num_experts, "top_k": cfg.top_k, "vocab_size": cfg.vocab_size,
                  "max_position_embeddings": cfg.max_position_embeddings, "mtp": mtp},
        "tensor_parallel_size": tp, "expert_parallel": expert_parallel and tp > 1, "dtype": dtype,
        "kv_dtype": str(kv_dtype).removeprefix("torch."), "gpu_memory_bytes": gpu_memory,
        "gpu_memory_utilization": utilization, "reserve_bytes": reserve, "usable_bytes_per_gpu": usable,
        "block_size": block_size, "max_num_seqs": max_num_seqs, "num_speculative_tokens": num_speculative_tokens,
        "ranks": ranks,
        "total": {
            "weight_bytes": sum(r["weight_bytes"] for r in ranks),
            "kv_budget_bytes": sum(r["kv_budget_bytes"] for r in ranks),
            "kv_bytes_per_token": sum(r["kv_bytes_per_token"] for r in ranks),
            "ring_bytes_per_seq": sum(r["ring_bytes_per_seq"] for r in ranks),
            "fits": all(r["fits"] for r in ranks),
            # a sequence keeps K/V on every rank (each holds its own heads), so the fullest rank decides
            "max_seqs": {str(n): min(r["max_seqs"][str(n)] for r in ranks) for n in CONTEXTS},
        },
    }


def _block_room(rest: int, share: int) -> int:
    """Bytes for blocks out of what the rings leave, as KVCache.create splits it (share: SNAPSHOT_SHARE, or 0
    without ring snapshots)."""
    rest = max(0, rest)
    return rest - (rest // share if share else 0)


def _sequences(budget: int, ring: int, per_token: int, block_size: int, context: int, share: int = 0) -> int:
    """Sequences of `context` tokens whose KV (a ring slot each, plus whole blocks) fits in budget."""
    need = per_token * block_size * -(-context // block_size)
    n = max(0, budget) // (ring + need)
    while n > 0 and _block_room(budget - n * ring, share) < n * need:
        n -= 1
    return n


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _row(label: str, r: dict) -> str:
    room = f"{r['kv_budget_bytes'] / GiB:12.2f}" if r["fits"] else f"{'does not fit':>12}"
    return (f"{label:>5} {r['weight_bytes'] / GiB:12.2f} {room} {r['ring_bytes_per_seq'] / MiB:13.2f} "
            f"{r['kv_bytes_per_token'] / KiB:13.2f}" + "".join(f" {r['max_seqs'][str(n)]:10d}" for n in CONTEXTS))


def format_plan(p: dict, source: str) -> str:
    """The plain-text report: ranks with equal numbers share one row (e.g. `0-3`: each of ranks 0 to 3)."""
    m, tp, bs, seats = p["model"], p["tensor_parallel_size"], p["block_size"], p["max_num_seqs"]
    split = ("whole experts per rank (expert parallel)" if p["expert_parallel"] else
             "each expert split across ranks") if tp > 1 else "one rank"
    spec = p["num_speculative_tokens"]
    lines = [
        f"model: {source}",
        f"  {m['layers']} layers ({m['global_layers']} global, {m['sliding_layers']} sliding, window "
        f"{m['sliding_window']}); {m['heads']} q / {m['kv_heads']} kv heads x {m['head_dim']}; {m['experts']} "
        f"experts, top-{m['top_k']};",
        f"  vocab {m['vocab_size']}; MTP block {'included' if m['mtp'] else 'not counted'}",
        f"layout: tensor parallel {tp}, {split}; weights {p['dtype']}, KV cache {p['kv_dtype']}"
        + (f", {spec} MTP draft tokens" if spec else ""),
    ]
    if p["dtype"] == "fp8":
        lines += ["  fp8: the published FP8 checkpoint (or --quantization fp8) as the engine holds it: e4m3",
                  "  linears + an fp32 scale per 32 rows x 128 columns; router, embeddings, lm_head and MTP block",
                  "  unquantized"]
    lines += [
        f"per GPU: {p['gpu_memory_bytes'] / GiB:.2f} GiB x {p['gpu_memory_utilization']:.2f} - "
        f"{p['reserve_bytes'] / GiB:.2f} GiB reserve (activations, workspace: an estimate, not measured)",
        f"  = {p['usable_bytes_per_gpu'] / GiB:.2f} GiB for weights and KV cache",
        "",
        f"{'rank':>5} {'weights GiB':>12} {'KV room GiB':>12} {'ring MiB/seq':>13} {'KV KiB/token':>13}"
        + "".join(f" {'seqs@' + _k(n):>10}" for n in CONTEXTS),
    ]
    groups: list[list[dict]] = []
    for r in p["ranks"]:
        if groups and {**groups[-1][0], "rank": 0} == {**r, "rank": 0}:
            groups[-1].append(r)
        else:
            groups.append([r])
    for g in groups:
        lines.append(_row(str(g[0]["rank"]) if len(g) == 1 else f"{g[0]['rank']}-{g[-1]['rank']}", g[0]))
    lines += [
        _row("total", p["total"]),
        "",
        f"seqs@N: sequences of N tokens whose KV fits in the KV room (a ring slot each + blocks of {bs} tokens);",
        "  total: sums over the ranks, but the seqs of the fullest rank (a sequence keeps K/V on every rank)",
    ]
    longer = [n for n in CONTEXTS if n > m["max_position_embeddings"]]
    if longer:
        lines.append(f"  {', '.join(map(_k, longer))}: above the model's max_position_embeddings "
                     f"({m['max_position_embeddings']})")
    if not p["total"]["fits"]:
        worst = max(p["ranks"], key=lambda r: r["weight_bytes"])
        lines.append(f"does not fit: rank {worst['rank']} holds {worst['weight_bytes'] / GiB:.2f} GiB of weights, "
                     f"more than the {p['usable_bytes_per_gpu'] / GiB:.2f} GiB usable per GPU")
    else:
        pool = p["ranks"][0]["engine_pool"]
        capped = pool["num_blocks"] == seats * -(-m["max_position_embeddings"] // bs)
        lines += [f"fits on {tp} GPU{'s' if tp > 1 else ''}; with --kv-cache-memory set to the KV room, serve "
                  f"--max-num-seqs {seats} makes {seats} ring",
                  f"  slots ({pool['ring_bytes'] / MiB:.1f} MiB) and {pool['num_blocks']} blocks "
                  f"({pool['num_blocks'] * bs} tokens shared by the running sequences) per rank"
                  + (f",\n  capped at what {seats} sequences of {m['max_position_embeddings']} tokens can use" if capped
                     else "")]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from exaserve.cli import _bytes, _HelpFormatter, _positive  # here: cli imports this module

    def fraction(text: str) -> float:
        value = float(text)
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
        return value

    def speculative(text: str) -> int:
        value = int(text)
        if not 0 <= value <= MAX_SPECULATIVE_TOKENS:
            raise argparse.ArgumentTypeError(f"must be 0..{MAX_SPECULATIVE_TOKENS}, got {value}")
        return value

    parser = argparse.ArgumentParser(prog="exaserve plan", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory or config.json file")
    parser.add_argument("-tp", "--tensor-parallel-size", type=_positive, default=1, help="ranks (GPUs)")
    parser.add_argument("--enable-expert-parallel", action="store_true",
                        help="with -tp N: whole experts per rank instead of a slice of every expert")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES, "fp8"),
                        help="weights; auto: the checkpoint's; fp8: the FP8 checkpoint's (or --quantization fp8)")
    parser.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=None,
                        help="count the MTP block (default: when the config has num_nextn_predict_layers)")
    parser.add_argument("--gpu-memory", type=_bytes, default=141 * GiB, help="bytes per GPU, e.g. 141GiB "
                        "(default: 141GiB, an H200)")
    parser.add_argument("--gpu-memory-utilization", type=fraction, default=0.9, help="fraction of --gpu-memory used")
    parser.add_argument("--reserve", type=_bytes, default=2 * GiB,
                        help="per GPU, kept for activations, workspace and CUDA graphs (default: 2GiB, an estimate)")
    parser.add_argument("--max-num-seqs", type=_positive, default=64, help="seats of serve's ring pool")
    parser.add_argument("--block-size", type=_positive, default=16, help="tokens per KV block (global layers)")
    parser.add_argument("--num-speculative-tokens", type=speculative, default=0, help="MTP draft tokens per step")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="as serve's: the ring snapshots of cached prefixes take 1/8 of the KV room")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.model)
        dtype = cfg.checkpoint_dtype if args.dtype == "auto" else args.dtype
        mtp = cfg.num_mtp_layers > 0 if args.mtp is None else args.mtp
        p = plan(cfg, tp=args.tensor_parallel_size, expert_parallel=args.enable_expert_parallel, dtype=dtype,
                 mtp=mtp, gpu_memory=args.gpu_memory, utilization=args.gpu_memory_utilization, reserve=args.reserve,
                 max_num_seqs=args.max_num_seqs, block_size=args.block_size,
                 num_speculative_tokens=args.num_speculative_tokens,
                 prefix_caching=args.enable_prefix_caching)
    except (OSError, ValueError) as exc:   # no such file, a config we cannot serve, a size that does not divide
        print(f"exaserve plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(p, indent=2) if args.json else format_plan(p, args.model))
    return 0
