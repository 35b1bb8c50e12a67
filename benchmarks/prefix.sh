#!/usr/bin/env bash
# Prefix caching side by side (one server at a time, one run): exaserve with MTP off and on, vLLM-CPU with MTP
# off (both of its CPU settings) and on, and llama.cpp's llama-server, on two chat workloads of the bench
# checkpoint that resend what the server has seen:
#   shared: every request = one shared system prompt of 2,000 tokens + a user message of 100 of its own; 128 out
#   multi:  conversations of 4 turns, each turn resending the whole history (100 new user tokens, 64 out per turn)
# at concurrency 1, 8 and 32, fresh prompts at each level (no level is served from an earlier one's cache).
# Every engine runs with its own defaults (prefix caching is on by default in all three), except what it needs
# to start here: a 4,096-token context, vLLM's KV space (KV_GIB) and llama-server's slots.
#
#   benchmarks/prefix.sh                 # all engines
#   ENGINES="exaserve vllm" benchmarks/prefix.sh
#
# Environment: as compare.sh, plus NUM_PROMPTS (default 32: requests per level of "shared", conversations per
# level of "multi"), ENGINES (any of exaserve exaserve-mtp vllm vllm-mtp llama; default all), PEERS /
# LLAMA_SERVER / PEERS_SCRIPTS (llama.cpp, as fp8.sh). MTP runs draft 1 token (--num-speculative-tokens 1;
# vLLM: --speculative-config method mtp).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RESULTS=$ROOT/benchmarks/results/prefix
export MAX_MODEL_LEN=${MAX_MODEL_LEN:-4096} NUM_PROMPTS=${NUM_PROMPTS:-32}
# shellcheck source=benchmarks/bench_lib.sh
. "$ROOT/benchmarks/bench_lib.sh"   # settings; bench, wants, vllm_setup, llama_setup, make_bench_checkpoint
ENGINES=${ENGINES:-exaserve exaserve-mtp vllm vllm-mtp llama}
mkdir -p "$RESULTS" "$LOGS"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
make_bench_checkpoint
export CLIENT_ARGS=${CLIENT_ARGS:---fresh-prompts}
export CLIENT_RUNS="-shared --dataset shared-prefix --shared-len 2000 --input-len 100 --output-len 128
-multi --dataset multi-turn --turns 4 --input-len 100 --output-len 64 --seed 7"

if wants exaserve || wants exaserve-mtp; then
  "$BENCH_PYTHON" -m exaserve.cli build-kernels >/dev/null   # a one-time compile, not part of the startup
  exaserve=("$BENCH_PYTHON" -m exaserve.cli serve --model "$CKPT" --host 127.0.0.1 --port "$PORT"
            --served-model-name bench --max-model-len "$MAX_MODEL_LEN")
  ! wants exaserve || bench exaserve "$LOGS/prefix-exaserve.log" "${exaserve[@]}" || echo "!! exaserve run failed"
  ! wants exaserve-mtp || bench exaserve-mtp "$LOGS/prefix-exaserve-mtp.log" "${exaserve[@]}" \
    --num-speculative-tokens 1 || echo "!! exaserve (MTP) run failed"
fi
if (wants vllm || wants vllm-mtp) && vllm_setup; then
  if wants vllm; then
    bench vllm-default "$LOGS/prefix-vllm-default.log" "${vllm_env[@]}" "${vllm_serve[@]}" \
      || echo "!! vLLM (default) run failed"
    bench vllm-reserved0 "$LOGS/prefix-vllm-reserved0.log" "${vllm_env[@]}" VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
      "${vllm_serve[@]}" || echo "!! vLLM (VLLM_CPU_NUM_OF_RESERVED_CPU=0) run failed"
  fi
  # MTP with vLLM's setting that uses both cores (the faster one at concurrency 8 and 32 in issue 20's table)
  ! wants vllm-mtp || bench vllm-mtp "$LOGS/prefix-vllm-mtp.log" "${vllm_env[@]}" VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
    "${vllm_serve[@]}" --speculative-config '{"method": "mtp", "num_speculative_tokens": 1}' \
    || echo "!! vLLM (MTP) run failed"
fi
if wants llama && llama_setup bf16; then
  bench llama "$LOGS/prefix-llama.log" "${llama_serve[@]}" || echo "!! llama-server run failed"
fi

# One table per workload: output tok/s, TTFT p50 and the prefix-cache hit share, and exaserve / vLLM ratios
# (MTP off: against the better vLLM setting per level; MTP on: against vLLM with MTP).
"$BENCH_PYTHON" - "$RESULTS" <<'EOF'
import json, sys
from pathlib import Path

results = Path(sys.argv[1])
names = ["exaserve", "exaserve-mtp", "vllm-default", "vllm-reserved0", "vllm-mtp", "llama"]
summary = []
for workload in ("shared", "multi"):
    runs = {}
    for n in names:
        path = results / f"{n}-{workload}.json"
        if path.exists() and not (results / f"{n}-{workload}.failed.json").exists():
            runs[n] = {r["max_concurrency"]: r for r in json.loads(path.read_text())["runs"]}
    if not runs:
        continue
    print(f"\n== {workload}: output tok/s | TTFT p50 ms | cached share of prompt tokens")
    print(f"{'level':<8}" + "".join(f"{n:>24}" for n in runs))
    for c in sorted({c for r in runs.values() for c in r}):
        cell = {}
        for n, r in runs.items():
            x = r.get(c)
            cell[n] = None if not x or not x["completed"] else (
                x["output_throughput"], x["ttft_ms"]["median"], x.get("cached_prompt_share"))
        fmt = lambda v: "n/a" if v is None else f"{v[0]:.1f} | {v[1]:.0f} | " + (
            "n/a" if v[2] is None else f"{100 * v[2]:.0f}%")
        print(f"{f'c={c}':<8}" + "".join(f"{fmt(v):>24}" for v in cell.values()))
        vllm = [cell[n] for n in ("vllm-default", "vllm-reserved0") if cell.get(n)]
        best = max(vllm, key=lambda v: v[0]) if vllm else None
        row = {"workload": workload, "concurrency": c, **{n: v for n, v in cell.items()}}
        for mine, theirs, label in ((cell.get("exaserve"), best, "MTP off"),
                                    (cell.get("exaserve-mtp"), cell.get("vllm-mtp"), "MTP on")):
            if mine and theirs:
                print(f"{'':<8}exaserve / vLLM ({label}): output tok/s {mine[0] / theirs[0]:.2f}x, "
                      f"TTFT p50 {mine[1] / theirs[1]:.2f}x")
                row[f"ratio {label}"] = {"tok_s": mine[0] / theirs[0], "ttft": mine[1] / theirs[1]}
        summary.append(row)
(results / "prefix.json").write_text(json.dumps(summary, indent=1))
EOF
