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
MAX_MODEL_LEN=2048
READY_TIMEOUT_S=900

# The bench checkpoint (exaserve make-tiny --preset bench) in $CKPT, made once.
make_bench_checkpoint() {
  if [[ ! -f $CKPT/model.safetensors ]]; then
    echo "== making the bench checkpoint in $CKPT"
    "$BENCH_PYTHON" -m exaserve.cli make-tiny "$CKPT.tmp" --preset bench && mv "$CKPT.tmp" "$CKPT"
  fi
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

# bench NAME LOG CMD...: start a server, time it to healthy, run the sweep, stop it, record startup/RSS.
bench() {
  local name=$1 log=$2; shift 2
  local result=$RESULTS/$name.json mem=$RESULTS/.$name-mem.json
  rm -f "$result" "$mem"
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
    "$BENCH_PYTHON" "$ROOT/benchmarks/serve.py" --base-url "http://127.0.0.1:$PORT" --model bench \
      --tokenizer "$CKPT" --dataset random --input-len 256 --output-len 128 --num-prompts "$NUM_PROMPTS" \
      --sweep-concurrency "$LEVELS" --label "$name" --result-file "$result" ${CLIENT_ARGS:-} || status=$?
  fi
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
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
    echo "{\"failed\": true, \"log\": \"$log\"}" > "$RESULTS/$name.failed.json"
  fi
  rm -f "$mem"
  return $status
}

