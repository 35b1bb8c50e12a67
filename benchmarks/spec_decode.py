"""MTP speculative decoding benchmark: emitted tokens per step, acceptance per position and output throughput
for k = 0..3 drafts, on a chain checkpoint whose MTP block agrees with the model on a known fraction of tokens.

    python benchmarks/spec_decode.py [--agree 0.7] [--vocab 512] [--requests 16] [--max-tokens 128]

The model's next token depends only on the current one (exaserve.testing.make_chain_checkpoint), and its MTP
block predicts the token after next correctly for the fraction `agree` of tokens, so position-1 acceptance
should be near `agree`, position 2 near agree^2, and so on. All k run in one process, one after the other.
"""
import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from exaserve.engine import LLM, SamplingParams
from exaserve.testing import make_chain_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agree", type=float, default=0.7)
    ap.add_argument("--vocab", type=int, default=512, help="also the hidden size (one-hot embeddings)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        layer_types = (["sliding_attention"] * 3 + ["full_attention"]) * (args.layers // 4)
        path, _ = make_chain_checkpoint(Path(tmp) / "chain", vocab=args.vocab, agree=args.agree,
                                        num_hidden_layers=len(layer_types), layer_types=layer_types,
                                        num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                        intermediate_size=4 * args.vocab, moe_intermediate_size=args.vocab // 2,
                                        num_experts=32, num_experts_per_tok=4, sliding_window=128,
                                        max_position_embeddings=4096)
        rng = random.Random(0)
        prompts = [[rng.randrange(args.vocab) for _ in range(rng.randint(16, 64))] for _ in range(args.requests)]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        rows = []
        for k in range(4):
            llm = LLM(str(path), dtype="float32", max_num_seqs=args.requests, num_speculative_tokens=k)
            llm.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
            start_steps = llm.engine.counters["steps"]
            t = time.perf_counter()
            outs = llm.generate(prompts, params)
            seconds = time.perf_counter() - t
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            steps = llm.engine.counters["steps"] - start_steps
            s = llm.engine.stats()
            rows.append({"k": k, "output_tokens_per_s": tokens / seconds, "steps": steps,
                         "tokens_per_request_step": tokens / args.requests / steps * args.requests
                         if steps else 0.0,
                         "mean_emitted_per_verify": s.get("mean_emitted_per_verify", 1.0),
                         "acceptance_per_position": s.get("acceptance_per_position", [])})
            print(f"k={k}: {tokens / seconds:8.1f} output tok/s, {steps} steps, "
                  f"{s.get('mean_emitted_per_verify', 1.0):.2f} tokens per verify, acceptance "
                  f"{' '.join(f'{a:.2f}' for a in s.get('acceptance_per_position', [])) or '-'}", flush=True)
    base = rows[0]["output_tokens_per_s"]
    print("\n| k | output tok/s | speed-up | tokens per verify | acceptance per position |\n|---|---|---|---|---|")
    for r in rows:
        rates = " / ".join(f"{a:.2f}" for a in r["acceptance_per_position"]) or "-"
        print(f"| {r['k']} | {r['output_tokens_per_s']:.0f} | {r['output_tokens_per_s'] / base:.2f}x | "
              f"{r['mean_emitted_per_verify']:.2f} | {rates} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
