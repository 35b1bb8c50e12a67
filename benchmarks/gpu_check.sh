#!/usr/bin/env bash
# One-shot GPU check for a bare CUDA machine (built for an H200) with torch + triton installed and no network:
#   1. versions and the device;
#   2. every kernel test on CUDA, compiled (no interpreter), and the engine greedy-equality test (Triton vs
#      torch path) on a tiny and a mid-size random model (tests/test_kernels.py, tests/test_triton_engine.py);
#   3. the kernel benchmark table (benchmarks/kernels.py --quick; the full one: drop --quick).
# Under 5 minutes. Logs go to $OUT if set, else ./gpu_check_logs. Exit status 0 only if all passed.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${OUT:-gpu_check_logs}
mkdir -p "$LOGS"
unset TRITON_INTERPRET EXASERVE_KERNELS
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

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

echo
echo "================ gpu_check summary ================"
cat "$LOGS/versions.txt"
echo "tests (rc=$tests_rc): $(grep -E '(passed|failed|error)' "$LOGS/tests.log" | tail -1)"
echo "benchmark (rc=$bench_rc):"
grep -E '^(# |op |fused_moe|paged_attn|ring_attn|add_rms_norm|qk_norm_rope)' "$LOGS/bench.log"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
