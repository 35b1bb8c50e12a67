#!/usr/bin/env bash
# exaserve vs vLLM (CPU) on the bench checkpoint, one server at a time, same workload:
# 64 prompts of 256 random tokens, 128 output tokens, ignore_eos, at concurrency 1, 8 and 32.
# Measures startup (process start to /health 200) and peak RSS of the server's process tree, then prints
# exaserve / vLLM ratios against the better of vLLM's two CPU settings (default: one core reserved for
# its scheduler; VLLM_CPU_NUM_OF_RESERVED_CPU=0) at each level.
#
#   benchmarks/compare.sh                 # both servers
#   benchmarks/compare.sh --exaserve-only # no vLLM (the table shows only exaserve)
#   benchmarks/compare.sh --vllm-only     # rerun vLLM, reuse results/exaserve.json
#
# Environment: BENCH_PYTHON (python with exaserve's deps, httpx, matplotlib; default: python3),
# VLLM_VENV (default: a vllm-venv folder beside the repo; made with pip on first use), BENCH_CACHE
# (checkpoint cache; default ~/.cache/exaserve-bench), NUM_PROMPTS, LEVELS, PORT, KV_GIB (KV cache for both).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RESULTS=$ROOT/benchmarks/results
# shellcheck source=benchmarks/bench_lib.sh
. "$ROOT/benchmarks/bench_lib.sh"   # settings; bench NAME LOG CMD..., make_bench_checkpoint

run_exaserve=1 run_vllm=1
case "${1:-}" in
  --exaserve-only) run_vllm=0 ;;
  --vllm-only) run_exaserve=0 ;;
  "") ;;
  *) echo "usage: $0 [--exaserve-only | --vllm-only]" >&2; exit 2 ;;
esac
mkdir -p "$RESULTS" "$LOGS"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
make_bench_checkpoint

if (( run_exaserve )); then
  rm -f "$RESULTS/exaserve.failed.json"
  # A one-time compile per machine (like installing vLLM), not part of the measured startup.
  "$BENCH_PYTHON" -m exaserve.cli build-kernels >/dev/null
  bench exaserve "$LOGS/exaserve.log" "$BENCH_PYTHON" -m exaserve.cli serve --model "$CKPT" \
    --dtype bfloat16 --host 127.0.0.1 --port "$PORT" --served-model-name bench --max-num-seqs 32 \
    --max-num-batched-tokens 2048 --max-model-len "$MAX_MODEL_LEN" --kv-cache-memory "${KV_GIB}GiB" \
    || echo "!! exaserve run failed"
fi

if (( run_vllm )); then
  rm -f "$RESULTS"/vllm-*.failed.json
  if ! vllm_setup; then
    echo '{"failed": true, "reason": "vllm-cpu not importable"}' > "$RESULTS/vllm-default.failed.json"
  else
    vllm_cmd=("${vllm_serve[@]}" --max-num-seqs 32 --max-num-batched-tokens 2048)
    bench vllm-default "$LOGS/vllm-default.log" "${vllm_env[@]}" "${vllm_cmd[@]}" || echo "!! vLLM (default) run failed"
    bench vllm-reserved0 "$LOGS/vllm-reserved0.log" "${vllm_env[@]}" VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
      "${vllm_cmd[@]}" \
      || echo "!! vLLM (VLLM_CPU_NUM_OF_RESERVED_CPU=0) run failed"
  fi
fi

# Side-by-side table (and results/compare.json) from whatever result files exist.
"$BENCH_PYTHON" - "$RESULTS" <<'EOF'
import json, sys
from pathlib import Path

results = Path(sys.argv[1])
def load(name):
    path = results / f"{name}.json"
    if not path.exists() or (results / f"{name}.failed.json").exists():
        return None
    doc = json.loads(path.read_text())
    return {"server": doc["meta"].get("server", {}), "date": doc["meta"]["date"],
            "runs": {r["max_concurrency"]: r for r in doc["runs"]}}

exa = load("exaserve")
vllm = {s: d for s in ("vllm-default", "vllm-reserved0") if (d := load(s))}
if exa is None:
    sys.exit("no exaserve results")
if not vllm:
    print("\nvLLM did not run (see the lines above and the vllm-*.log server logs): exaserve alone.")

def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "n/a"

def fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)

rows = []
print(f"\n{'metric':<30}{'exaserve':>12}{'vLLM best':>12}{'setting':>12}{'exa/vLLM':>10}")
for level in sorted(exa["runs"]):
    e = exa["runs"][level]
    candidates = [(s, d["runs"][level]) for s, d in vllm.items() if level in d["runs"] and d["runs"][level]["completed"]]
    best_s, best = max(candidates, key=lambda c: c[1]["output_throughput"]) if candidates else ("-", None)
    for label, key in (("output tok/s", "output_throughput"), ("TTFT p50 (ms)", "ttft_ms"), ("TPOT p50 (ms)", "tpot_ms")):
        ev = e[key] if key == "output_throughput" else e[key]["median"]
        vv = None if best is None else (best[key] if key == "output_throughput" else best[key]["median"])
        print(f"{f'c={level} {label}':<30}{fmt(ev):>12}{fmt(vv):>12}{best_s.replace('vllm-', ''):>12}{ratio(ev, vv):>10}")
        rows.append({"concurrency": level, "metric": label, "exaserve": ev, "vllm": vv, "vllm_setting": best_s,
                     "ratio": ev / vv if ev and vv else None})
    for s, d in vllm.items():
        r = d["runs"].get(level)
        if r and r["failed"]:
            print(f"   {s}: {r['failed']} failed requests at c={level}")
    if e["failed"]:
        print(f"   exaserve: {e['failed']} failed requests at c={level}")
for label, key, pick in (("startup (s)", "startup_s", min), ("peak RSS (MiB)", "peak_rss_mib", min),
                         ("peak PSS (MiB)", "peak_pss_mib", min)):
    ev = exa["server"].get(key)
    options = [(d["server"].get(key), s) for s, d in vllm.items() if d["server"].get(key) is not None]
    vv, vs = pick(options) if options else (None, "-")
    print(f"{label:<30}{fmt(ev):>12}{fmt(vv):>12}{vs.replace('vllm-', ''):>12}{ratio(ev, vv):>10}")
    rows.append({"metric": label, "exaserve": ev, "vllm": vv, "vllm_setting": vs, "ratio": ev / vv if ev and vv else None})
for s, d in vllm.items():
    print(f"   {s}: startup {fmt(d['server'].get('startup_s'))} s, peak RSS {fmt(d['server'].get('peak_rss_mib'), '.0f')} MiB, "
          + ", ".join(f"c={c} {r['output_throughput']:.1f} tok/s" for c, r in sorted(d["runs"].items())))
import subprocess
commit = subprocess.run(["git", "-C", str(results), "describe", "--always", "--dirty"], capture_output=True,
                        text=True).stdout.strip()
(results / "compare.json").write_text(json.dumps({"date": exa["date"], "exaserve_commit": commit, "rows": rows},
                                                 indent=1))
EOF
files=("$RESULTS/exaserve.json")
for s in vllm-default vllm-reserved0; do
  [[ -f $RESULTS/$s.json && ! -f $RESULTS/$s.failed.json ]] && files+=("$RESULTS/$s.json")
done
"$BENCH_PYTHON" "$ROOT/benchmarks/serve.py" --plot "${files[@]}" --plot-file "$RESULTS/compare.png"
