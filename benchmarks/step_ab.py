"""Offline decode-step time of the engine, A/B between settings, interleaved (this host is shared and noisy).

    python benchmarks/step_ab.py --batch 1 8 32 --rounds 3 --variant screen= --variant full=EXASERVE_ARGMAX_SCREEN=0

Each (round, variant, batch) runs in a fresh process: `batch` greedy requests with 256-token random prompts
on the bench checkpoint (`exaserve make-tiny --preset bench`), prefilled, then `--repeats` timed runs of
`--steps` decode steps each; the process reports its median ms per step. Variants run alternately, so a
change in the host's load hits both; the table gives each variant's median over rounds and the ratio to
the first variant. A variant is NAME=ENV where ENV is space-separated VAR=VALUE settings (may be empty), or
NAME@DIR=ENV to run the code of the checkout in DIR instead of this one (the child imports it through a shadow
package and reports where its code came from), which compares commits in one interleaved run.
STEP_AB_ENGINE=KEY=VALUE[,KEY=VALUE...] in ENV sets engine options (EngineConfig's names; integers and
true/false parsed), e.g. tensor parallel against one rank:

    python benchmarks/step_ab.py --batch 1 8 --variant tp1= --variant tp2=STEP_AB_ENGINE=tensor_parallel_size=2

and checkouts:

    git worktree add /tmp/base COMMIT
    python benchmarks/step_ab.py --batch 1 8 32 --variant new= --variant base@/tmp/base=
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CKPT = Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "exaserve-bench")) / "bench"


def child(args) -> None:
    from exaserve.engine.config import EngineConfig
    from exaserve.engine.engine_core import EngineCore
    from exaserve.engine.sampling_params import SamplingParams
    extra = {}
    for item in filter(None, os.environ.get("STEP_AB_ENGINE", "").split(",")):
        key, _, value = item.partition("=")
        extra[key] = int(value) if value.isdigit() else {"true": True, "false": False}.get(value.lower(), value)
    engine = EngineCore(EngineConfig(str(args.model), max_num_seqs=max(args.batch), max_num_batched_tokens=2048,
                                     **extra))
    rng = random.Random(0)
    batch, vocab = args.batch[0], engine.model_config.vocab_size
    total = (args.repeats * args.steps + 20) * 2
    for i in range(batch):
        engine.add_request(str(i), [rng.randrange(vocab) for _ in range(256)],
                           SamplingParams(max_tokens=total, ignore_eos=True, temperature=0.0))
    while any(not r.output_token_ids for r in engine.requests.values()):
        engine.step()
    for _ in range(10):
        engine.step()
    runs = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        runs.append((time.perf_counter() - t) / args.steps * 1e3)
    engine.close()
    import exaserve.engine
    engine_dir = Path(exaserve.engine.__file__).resolve().parent  # the code that ran (see shadow_package)
    print(json.dumps({"ms": statistics.median(runs), "engine": str(engine_dir)}))


def parse_variant(text: str) -> tuple[str, Path, dict]:
    """(name, the checkout to run, environment settings) of NAME[@DIR]=ENV."""
    label, _, env = text.partition("=")
    name, _, checkout = label.partition("@")
    if not name or "=" not in text:
        raise SystemExit(f"--variant {text!r}: use NAME=ENV or NAME@DIR=ENV (ENV may be empty)")
    root = Path(checkout).resolve() if checkout else ROOT
    if not (root / "engine").is_dir():
        raise SystemExit(f"--variant {text!r}: {root} has no engine/ (make a checkout of another "
                         f"commit with `git worktree add DIR COMMIT`)")
    bad = [kv for kv in env.split() if "=" not in kv]
    if bad:
        raise SystemExit(f"--variant {text!r}: {bad[0]!r} is not VAR=VALUE")
    return name, root, dict(kv.split("=", 1) for kv in env.split())


def shadow_package(root: Path, into: Path) -> str:
    """A folder for PYTHONPATH whose `exaserve` package maps `root`'s folders as pip's install does (engine/ ->
    exaserve.engine, ...), so a child imports that checkout and not the installed one (an editable install's
    finder comes after sys.path)."""
    pkg = into / "exaserve"
    pkg.mkdir(parents=True)
    for f in (root / "exaserve").glob("*.py"):
        (pkg / f.name).symlink_to(f)
    for d in ("engine", "kernels", "server"):
        (pkg / d).symlink_to(root / d)
    return str(into)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_CKPT, help="checkpoint (default: the bench one)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--variant", action="append", default=[], help="NAME=ENV; repeat for each variant")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    variants = [parse_variant(v) for v in args.variant] or [("current", ROOT, {})]
    if not args.model.exists():
        raise SystemExit(f"no checkpoint at {args.model}: make it with `exaserve make-tiny "
                         f"{args.model} --preset bench`")
    times: dict[tuple[str, int], list[float]] = {}
    shadows = tempfile.TemporaryDirectory()
    path = {root: shadow_package(root, Path(shadows.name) / str(i)) for i, root in enumerate({v[1] for v in variants})}
    for r in range(args.rounds):
        for batch in args.batch:
            for name, root, env in variants:
                cmd = [sys.executable, str(ROOT / "benchmarks" / "step_ab.py"), "--child", "--model", str(args.model),
                       "--batch", str(batch), "--steps", str(args.steps), "--repeats", str(args.repeats)]
                pythonpath = os.pathsep.join(filter(None, (path[root], os.environ.get("PYTHONPATH"))))
                done = subprocess.run(cmd, env={**os.environ, **env, "PYTHONPATH": pythonpath}, capture_output=True,
                                      text=True, cwd=root)
                if done.returncode != 0:
                    raise SystemExit(f"{name} batch {batch} failed:\n{done.stderr[-2000:]}")
                report = json.loads(done.stdout.strip().splitlines()[-1])
                if Path(report["engine"]) != (root / "engine").resolve():
                    raise SystemExit(f"{name} ran the code in {report['engine']}, not {root / 'engine'}")
                ms = report["ms"]
                times.setdefault((name, batch), []).append(ms)
                print(f"round {r + 1} batch {batch:3d} {name:>12s} {ms:7.3f} ms/step", flush=True)
    base = variants[0][0]
    print(f"\n{'batch':>5s} {'variant':>12s} {'median ms':>10s} {'runs':>30s} {'vs ' + base:>10s}")
    for batch in args.batch:
        ref = statistics.median(times[(base, batch)])
        for name, _, _ in variants:
            runs = times[(name, batch)]
            med = statistics.median(runs)
            print(f"{batch:5d} {name:>12s} {med:10.3f} {' '.join(f'{t:.2f}' for t in runs):>30s} "
                  f"{med / ref:9.2f}x")


if __name__ == "__main__":
    main()
