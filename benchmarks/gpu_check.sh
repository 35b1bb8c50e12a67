#!/usr/bin/env bash
# One-shot GPU check for a bare CUDA machine (built for an H200) with torch + triton installed and no network.
# Sized for a 15-minute lease: about 5 minutes, every step under its own timeout.
#   1. versions and the device, first;
#   2. in parallel, one process per file with a timeout each: every Triton kernel test on CUDA, compiled (no
#      interpreter; tests/test_kernels.py, tests/test_triton_fp8.py), the engine's greedy equality Triton vs
#      torch path (tests/test_triton_engine.py), the CUDA-graph logic (tests/test_cuda_graph.py), and real CUDA
#      graphs: greedy tokens and logprobs with graphs on and off (fp32, must be equal);
#   3. the kernel table (benchmarks/kernels.py --quick: time, TB/s and % of the copy bandwidth, TFLOP/s and % of
#      the bf16 matmul peak, per op and shape);
#   4. decode step time at batch 1/8/32, eager and graphed: the engine on the bench checkpoint and one
#      K-EXAONE-size layer (benchmarks/decode_step.py);
#   5. with -tune: benchmarks/tune_moe.py --quick (about 4 minutes more; its table goes to the logs folder);
#   6. with -tp N (a machine with N GPUs): greedy tokens of a tiny model at tensor parallel N (NCCL) against
#      one GPU, plain and with expert parallel.
# Logs go to $OUT if set, else ./gpu_check_logs. Exit status 0 only if all passed.
#   bash benchmarks/gpu_check.sh [-tp N] [-tune]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${OUT:-gpu_check_logs}
TP=1
TUNE=0
while [ $# -gt 0 ]; do
    case "$1" in
        -tp) TP=${2:?-tp needs a number}; shift 2 ;;
        -tune) TUNE=1; shift ;;
        *) echo "gpu_check: unknown option $1 (use -tp N, -tune)" >&2; exit 2 ;;
    esac
done
mkdir -p "$LOGS"
START=$SECONDS
unset TRITON_INTERPRET EXASERVE_KERNELS
# The checkout is not installed there: a shadow `exaserve` package maps its folders as pip's install does
# (engine/ -> exaserve.engine, ...). Triton's kernel cache stays in the logs' scratch space.
SHADOW=$(mktemp -d)
mkdir "$SHADOW/exaserve"
ln -s "$PWD"/exaserve/*.py "$SHADOW/exaserve/"
for d in engine kernels server; do ln -s "$PWD/$d" "$SHADOW/exaserve/$d"; done
export PYTHONPATH="$SHADOW:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="$SHADOW/triton-cache" TRITON_DEFAULT_FP_FUSION=1

"$PY" - <<'EOF' 2>&1 | tee "$LOGS/versions.txt"
import importlib.util, platform, subprocess, torch, triton
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, device: {name}, pytest-xdist: "
      f"{'yes' if importlib.util.find_spec('xdist') else 'no'}")
try:
    print("driver", subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20).stdout.strip())
except Exception as e:
    print("nvidia-smi:", e)
EOF
if ! "$PY" -c 'import torch, triton; assert torch.cuda.is_available()' 2>/dev/null; then
    echo "gpu_check: needs torch and triton importable and a CUDA device" >&2
    exit 2
fi

# -- 2. tests, in parallel ----------------------------------------------------------------------------------
XDIST=()
if "$PY" -c 'import xdist' 2>/dev/null; then XDIST=(-n 4); fi
declare -A PIDS
run_file() {   # name timeout args...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$PY" -m pytest -p no:cacheprovider -q -rfE "$@" > "$LOGS/test_$name.log" 2>&1
}
# test_kernels.py in two processes (each case compiles its own variants); not on the GPU: the check that
# exaserve imports without triton (it builds the C++ CPU kernels)
run_file kernels_moe 170 "${XDIST[@]}" tests/test_kernels.py -k "moe" & PIDS[kernels_moe]=$!
run_file kernels 170 "${XDIST[@]}" tests/test_kernels.py -k "not moe and not import_without_triton" &
PIDS[kernels]=$!
run_file fp8 170 tests/test_triton_fp8.py & PIDS[fp8]=$!
run_file engine 170 tests/test_triton_engine.py & PIDS[engine]=$!
run_file cuda_graph 170 tests/test_cuda_graph.py & PIDS[cuda_graph]=$!
timeout 170 "$PY" - > "$LOGS/graphs.log" 2>&1 <<'EOF' &
# Real CUDA graphs against eager, fp32 (no rounding to hide behind): greedy tokens equal, logprobs within 1e-4,
# decode steps replayed; then the same in bf16, reported (a near tie may flip there).
import random, tempfile
from pathlib import Path
from exaserve.engine import LLM, SamplingParams
from exaserve.engine.tiny import make_tiny_checkpoint
path = make_tiny_checkpoint(Path(tempfile.mkdtemp()), preset="bench", dtype="float32", with_mtp=False)
rng = random.Random(0)
prompts = [[rng.randrange(100, 30000) for _ in range(n)] for n in (40, 7, 300, 90, 12)]
params = [SamplingParams(max_tokens=n, temperature=0.0, logprobs=0, ignore_eos=True) for n in (30, 24, 16, 28, 9)]
def run(dtype, graphs):
    llm = LLM(str(path), dtype=dtype, kernels="triton", max_num_seqs=8, max_num_batched_tokens=256)
    if graphs:
        llm.engine.runner.use_cuda_graphs(8, llm.engine.max_model_len)
    try:
        outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        replays = llm.engine.runner.graphs.replays if graphs else 0
    finally:
        llm.engine.close()
    return [o.token_ids for o in outs], [[lp[t] for lp, t in zip(o.logprobs, o.token_ids)] for o in outs], replays
ok = True
for dtype in ("float32", "bfloat16"):
    (t0, l0, _), (t1, l1, replays) = run(dtype, False), run(dtype, True)
    same = sum(a == b for a, b in zip(t0, t1))
    diff = max(abs(a - b) for x, y in zip(l0, l1) for a, b in zip(x, y))
    print(f"cuda graphs {dtype}: {same}/{len(t0)} sequences identical to eager, max logprob diff {diff:.2e}, "
          f"{replays} decode steps replayed")
    if dtype == "float32":
        ok = ok and same == len(t0) and diff < 1e-4 and replays > 0
print("cuda graphs:", "PASS" if ok else "FAIL")
raise SystemExit(0 if ok else 1)
EOF
PIDS[graphs]=$!
declare -A RCS
for name in "${!PIDS[@]}"; do
    wait "${PIDS[$name]}"
    RCS[$name]=$?
done
echo "tests done at $((SECONDS - START)) s"

# -- 3. kernel table; 4. decode step -------------------------------------------------------------------------
timeout 110 "$PY" benchmarks/kernels.py --quick --json "$LOGS/bench.json" 2>&1 | tee "$LOGS/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "kernel table done at $((SECONDS - START)) s"
timeout 150 "$PY" benchmarks/decode_step.py --batch 1 8 32 --json "$LOGS/decode_step.json" 2>&1 \
    | tee "$LOGS/decode_step.log"
decode_rc=${PIPESTATUS[0]}
echo "decode step done at $((SECONDS - START)) s"

tune_rc=0
if [ "$TUNE" -eq 1 ]; then
    timeout 300 "$PY" benchmarks/tune_moe.py --quick --out "$LOGS/tuned_moe.json" 2>&1 | tee "$LOGS/tune.log"
    tune_rc=${PIPESTATUS[0]}
fi

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
echo "================ gpu_check summary ($((SECONDS - START)) s) ================"
cat "$LOGS/versions.txt"
tests_rc=0
for name in kernels_moe kernels fp8 engine cuda_graph graphs; do
    rc=${RCS[$name]}
    [ "$rc" -eq 0 ] || tests_rc=1
    [ "$rc" -eq 124 ] && note=" (TIMED OUT)" || note=""
    if [ "$name" = graphs ]; then line=$(grep -E '^cuda graphs' "$LOGS/graphs.log" | tr '\n' ';')
    else line=$(grep -E '(passed|failed|error)' "$LOGS/test_$name.log" | tail -1); fi
    echo "$name (rc=$rc$note): $line"
done
echo "kernel table (rc=$bench_rc):"
grep -E '^(# |op |fused_moe|paged_attn|ring_attn|add_rms_norm|qk_norm_rope)' "$LOGS/bench.log"
echo "decode step (rc=$decode_rc):"
grep -E '^(bench checkpoint|K-EXAONE layer)' "$LOGS/decode_step.log"
if [ "$TUNE" -eq 1 ]; then echo "tune_moe --quick (rc=$tune_rc):"; grep -E '^E=' "$LOGS/tune.log"; fi
if [ "$TP" -gt 1 ]; then echo "tensor parallel (rc=$tp_rc):"; grep "sequences identical" "$LOGS/tp.log"; fi
rm -rf "$SHADOW"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$decode_rc" -eq 0 ] && [ "$tune_rc" -eq 0 ] && [ "$tp_rc" -eq 0 ]
