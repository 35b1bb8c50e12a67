#!/usr/bin/env bash
# One-shot GPU check for a bare CUDA machine (built for an H200) with torch + triton installed and no network:
#   1. versions and the device;
#   2. every kernel test on CUDA, compiled (no interpreter), and the engine greedy-equality test (Triton vs
#      torch path) on a tiny and a mid-size random model (tests/test_kernels.py, tests/test_triton_engine.py);
#   3. the kernel benchmark table (benchmarks/kernels.py --quick; the full one: drop --quick);
#   4. with -tp N (a machine with N GPUs): greedy tokens of a tiny model at tensor parallel N (NCCL) against
#      one GPU, plain and with expert parallel.
# Under 5 minutes. Logs go to $OUT if set, else ./gpu_check_logs. Exit status 0 only if all passed.
#   bash benchmarks/gpu_check.sh [-tp N]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${OUT:-gpu_check_logs}
TP=1
if [ "${1:-}" = "-tp" ]; then TP=${2:?-tp needs a number}; fi
mkdir -p "$LOGS"
unset TRITON_INTERPRET EXASERVE_KERNELS
# The checkout is not installed there: a shadow `exaserve` package maps its folders as pip's install does
# (engine/ -> exaserve.engine, ...).
SHADOW=$(mktemp -d)
mkdir "$SHADOW/exaserve"
ln -s "$PWD"/exaserve/*.py "$SHADOW/exaserve/"
for d in engine kernels server; do ln -s "$PWD/$d" "$SHADOW/exaserve/$d"; done
export PYTHONPATH="$SHADOW:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$PY" - <<'EOF' 2>&1 | tee "$LOGS/versions.txt"
import torch, triton
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, device: {name}")
EOF
if ! "$PY" -c 'import torch, triton; assert torch.cuda.is_available()' 2>/dev/null; then
    echo "gpu_check: needs torch and triton importable and a CUDA device" >&2
    exit 2
fi

timeout 210 "$PY" -m pytest -p no:cacheprovider -rfE tests/test_kernels.py tests/test_triton_engine.py \
    2>&1 | tee "$LOGS/tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 150 "$PY" benchmarks/kernels.py --quick --json "$LOGS/bench.json" 2>&1 | tee "$LOGS/bench.log"
bench_rc=${PIPESTATUS[0]}

tp_rc=0
if [ "$TP" -gt 1 ]; then
    timeout 240 "$PY" - "$TP" <<'EOF' 2>&1 | tee "$LOGS/tp.log"
import sys, tempfile
from pathlib import Path
from exaserve.engine import LLM, SamplingParams
from exaserve.engine.tiny import make_tiny_checkpoint
tp = int(sys.argv[1])
path = make_tiny_checkpoint(Path(tempfile.mkdtemp()), preset="bench")   # 8 q / 2 kv heads, 32 experts
prompts = [[5 + i, 17, 300 + 7 * i] * (2 + i) for i in range(8)]
params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
def run(**kw):
    llm = LLM(str(path), dtype="bfloat16", **kw)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.engine.close()
one = run()
for kw in (dict(tensor_parallel_size=tp), dict(tensor_parallel_size=tp, enable_expert_parallel=True)):
    same = sum(a == b for a, b in zip(one, run(**kw)))
    print(f"tp={tp} {kw}: {same}/{len(one)} sequences identical to one GPU (bf16: rounding may differ)")
EOF
    tp_rc=${PIPESTATUS[0]}
fi

echo
echo "================ gpu_check summary ================"
cat "$LOGS/versions.txt"
echo "tests (rc=$tests_rc): $(grep -E '(passed|failed|error)' "$LOGS/tests.log" | tail -1)"
echo "benchmark (rc=$bench_rc):"
grep -E '^(# |op |fused_moe|paged_attn|ring_attn|add_rms_norm|qk_norm_rope)' "$LOGS/bench.log"
if [ "$TP" -gt 1 ]; then echo "tensor parallel (rc=$tp_rc):"; grep "sequences identical" "$LOGS/tp.log"; fi
rm -rf "$SHADOW"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$tp_rc" -eq 0 ]
