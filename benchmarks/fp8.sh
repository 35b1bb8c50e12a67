#!/usr/bin/env bash
# FP8 on CPU, side by side in one run on the bench checkpoint (bf16 weights): exaserve with the bf16 weights,
# exaserve with them quantized to block FP8 at load (--quantization fp8, as the K-EXAONE FP8 release is made),
# and llama.cpp's llama-server on a Q8_0 GGUF of the same weights (the 8-bit CPU peer). Same workload as
# compare.sh: 64 prompts of 256 random tokens, 128 output tokens, ignore_eos, concurrency 1, 8 and 32.
#
#   benchmarks/fp8.sh                  # all three (llama.cpp: built per ../shared/peers/README.md)
#   NO_LLAMA=1 benchmarks/fp8.sh       # exaserve bf16 and FP8 only
#
# Every level sends fresh prompts (CLIENT_ARGS=--fresh-prompts: no prefix-cache hits from an earlier level).
# Environment: as compare.sh, plus PEERS (llama.cpp build and converter; default ~/.cache/exaserve-peers),
# LLAMA_SERVER (default $PEERS/llama-server-build/bin/llama-server), PEERS_SCRIPTS (the peers/ folder with
# to_gguf.sh; default ../shared/peers beside the repo).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RESULTS=$ROOT/benchmarks/results/fp8
# shellcheck source=benchmarks/bench_lib.sh
. "$ROOT/benchmarks/bench_lib.sh"   # settings; bench NAME LOG CMD..., llama_setup, make_bench_checkpoint
mkdir -p "$RESULTS" "$LOGS"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
make_bench_checkpoint
"$BENCH_PYTHON" -m exaserve.cli build-kernels >/dev/null
export CLIENT_ARGS=${CLIENT_ARGS:---fresh-prompts}

exaserve=("$BENCH_PYTHON" -m exaserve.cli serve --model "$CKPT" --dtype bfloat16 --host 127.0.0.1 --port "$PORT"
          --served-model-name bench --max-num-seqs 32 --max-num-batched-tokens 2048 --max-model-len "$MAX_MODEL_LEN"
          --kv-cache-memory "${KV_GIB}GiB")
bench exaserve-bf16 "$LOGS/exaserve-bf16.log" "${exaserve[@]}" || echo "!! exaserve bf16 run failed"
bench exaserve-fp8 "$LOGS/exaserve-fp8.log" "${exaserve[@]}" --quantization fp8 || echo "!! exaserve fp8 run failed"

if [[ -z ${NO_LLAMA:-} ]] && llama_setup q8_0; then
  bench llama-q8_0 "$LOGS/llama-q8_0.log" "${llama_serve[@]}" || echo "!! llama-server run failed"
fi

"$BENCH_PYTHON" - "$RESULTS" <<'PY'
import json, sys
from pathlib import Path

results = Path(sys.argv[1])
runs = {}
for name in ("exaserve-bf16", "exaserve-fp8", "llama-q8_0"):
    path = results / f"{name}.json"
    if path.exists():
        doc = json.loads(path.read_text())
        runs[name] = {r["max_concurrency"]: r for r in doc["runs"]}
levels = sorted({c for r in runs.values() for c in r})
print(f"\n{'output tok/s':<16}" + "".join(f"{n:>16}" for n in runs) + f"{'fp8/bf16':>10}{'fp8/llama':>10}")
rows = []
for c in levels:
    tps = {n: r[c]["output_throughput"] if c in r and r[c]["completed"] else None for n, r in runs.items()}
    fp8, bf16, llama = tps.get("exaserve-fp8"), tps.get("exaserve-bf16"), tps.get("llama-q8_0")
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "n/a"
    print(f"{f'c={c}':<16}" + "".join(f"{'n/a' if v is None else f'{v:.1f}':>16}" for v in tps.values())
          + f"{ratio(fp8, bf16):>10}{ratio(fp8, llama):>10}")
    rows.append({"concurrency": c, **tps})
(results / "fp8.json").write_text(json.dumps(rows, indent=1))
PY
