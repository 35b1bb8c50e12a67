"""Worker processes for tensor/expert parallelism over torch.distributed (gloo on CPU, NCCL on CUDA).

The engine process is rank 0: it runs the scheduler, the sampler and the API, and holds shard 0 of the model.
Ranks 1..N-1 are worker processes it starts (`Workers`), each holding its shard and its share of the KV pools
(its kv heads). Every model call on rank 0 goes through `ShardedModel`, which first broadcasts the call (its
name and its inputs: token ids, positions, attention metadata, hidden rows) on a gloo group, then runs its
own shard; each worker runs the same call on its shard, so the collectives inside the layers meet. Only rank
0 gets the logits (an all-gather inside compute_logits) and samples; the others learn the tokens as inputs of
the next call. Per step the workers wait on one broadcast, never on rank 0's event loop.

Start-up goes through a TCPStore that rank 0 hosts (`Rendezvous`; on one node at a free local port, across
nodes at --master-addr/--master-port): each rank loads its shard, then sets its report ("ok" or its error)
in the store; rank 0 raises the first error with its rank, so a failure on any rank, on any node, surfaces
where the user looks. Only then does rank 0 say "go" (with the KV budget every rank sizes its pools from) and
the ranks form the process group, so a rank that died early cannot leave the others waiting in a
rendezvous. Other nodes run no engine: `run_node` starts their ranks and waits on them. Workers die with the
process that started them (PR_SET_PDEATHSIG), and a worker that dies or a collective that fails marks the
engine dead (`WorkerError`): the server then fails its requests and exits non-zero.
"""
from __future__ import annotations

import ctypes
import datetime
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection

import torch

log = logging.getLogger("exaserve.engine")

START_TIMEOUT_S = 1800.0        # loading a shard of a large checkpoint from a slow disk


class WorkerError(RuntimeError):
    """A worker died, or a collective failed: the engine cannot go on."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so a killed engine leaves no orphan worker."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


class Rendezvous:
    """The start-up exchange of all ranks through a TCPStore hosted by rank 0."""

    def __init__(self, addr: str, port: int, size: int, rank: int):
        self.size, self.rank = size, rank
        # Under torchrun its agent on node 0 already hosts a store at MASTER_PORT: every rank is a client there
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = torch.distributed.TCPStore(addr, port, world_size=size, is_master=rank == 0 and not agent_store,
                                           timeout=datetime.timedelta(seconds=START_TIMEOUT_S),
                                           wait_for_workers=False)
        self.store = torch.distributed.PrefixStore("exaserve", store)

    def report(self, error: str | None = None, kv_budget: int | None = None) -> None:
        """This rank has loaded its shard (error=None; kv_budget: the KV bytes its device has room for) or failed
        to (the message)."""
        status = f"ok {json.dumps(kv_budget)}" if error is None else f"error: {error}"
        self.store.set(f"loaded/{self.rank}", status)

    def wait_loaded(self, local: "Workers | None") -> list[int]:
        """Rank 0: until every rank has reported; the KV budgets they reported (the smallest bounds every rank's
        pools); RuntimeError naming the first rank that failed or died."""
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = set(range(1, self.size))
        budgets = []
        while pending:
            for rank in sorted(pending):
                if self.store.check([f"loaded/{rank}"]):
                    status = self.store.get(f"loaded/{rank}").decode()
                    if not status.startswith("ok "):
                        raise RuntimeError(f"rank {rank}: {status.removeprefix('error: ')}")
                    budget = json.loads(status[3:])
                    if budget is not None:
                        budgets.append(budget)
                    pending.discard(rank)
            dead = local.first_dead() if local is not None else None
            if dead in pending and not self.store.check([f"loaded/{dead}"]):
                raise RuntimeError(f"rank {dead} exited while loading ({local.describe_dead()})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ranks {sorted(pending)} did not load within {START_TIMEOUT_S:.0f} s")
            if pending:
                time.sleep(0.05)
        return budgets

    def go(self, kv_cache_memory: int | None) -> None:
        """Rank 0: start (with the KV budget every rank sizes its pools from), or kv_cache_memory=None: stop."""
        self.store.set("go", json.dumps(kv_cache_memory))

    def wait_go(self) -> int | None:
        return json.loads(self.store.get("go"))

    def init_group(self, device: torch.device, timeout_s: float):
        """The default process group (NCCL on CUDA, gloo on CPU) and a gloo group for the control broadcasts;
        a collective that waits longer than timeout_s fails (a hung rank: EXASERVE_COLLECTIVE_TIMEOUT)."""
        import torch.distributed as dist
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, store=dist.PrefixStore("group", self.store), rank=self.rank,
                                world_size=self.size, timeout=timeout)
        return dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD


class ShardedModel:
    """Rank 0's model under tensor parallelism: quacks like ExaoneMoeModel for the runner; each call runs on
    every rank."""

    def __init__(self, local, control_group, workers: "Workers"):
        self.local, self.control, self.workers = local, control_group, workers
        self.ops, self.cfg, self.mtp, self.par = local.ops, local.cfg, local.mtp, local.par
        self.broken = False     # a collective failed: the ranks are out of step for good

    def _broadcast(self, call) -> None:
        try:
            torch.distributed.broadcast_object_list([call], src=0, group=self.control)
        except Exception as exc:
            self.broken = True
            raise WorkerError(f"a worker stopped answering ({self.workers.describe_dead()}): {exc}") from exc

    def _run(self, fn, *args):
        try:
            return fn(*args)
        except WorkerError:
            raise
        except Exception as exc:
            # A peer that is gone (gloo/NCCL raise RuntimeError), or rank 0 failing between two collectives:
            # either way the other ranks wait in a collective rank 0 will never join, so the group is done.
            self.broken = True
            if self.workers.any_dead() or "Connection" in str(exc) or "timed out" in str(exc).lower():
                raise WorkerError(f"tensor-parallel collective failed ({self.workers.describe_dead()}): {exc}") \
                    from exc
            raise WorkerError(f"rank 0 failed in the middle of a tensor-parallel step, which leaves the ranks out "
                              f"of step: {type(exc).__name__}: {exc}") from exc

    def forward(self, input_ids, positions, meta, kv, before_compute=None, ring_copies=None):
        """ring_copies: (src, dst) rows copied in every ring layer before the forward, on every rank (the
        prefix cache's snapshot saves and restores; each rank's pools hold its kv heads)."""
        self._broadcast(("forward", _cpu((input_ids, positions, meta, *(ring_copies or ())))))
        if ring_copies is not None:
            kv.ring.copy_rows(*ring_copies)
        return self._run(self.local.forward, input_ids, positions, meta, kv, before_compute)

    def compute_logits(self, hidden):
        self._broadcast(("compute_logits", _cpu((hidden,))))
        return self._run(self.local.compute_logits, hidden)

    def mtp_forward(self, next_ids, hidden, positions, meta, kv):
        self._broadcast(("mtp_forward", _cpu((next_ids, hidden, positions, meta))))
        return self._run(self.local.mtp_forward, next_ids, hidden, positions, meta, kv)

    def stop(self) -> None:
        try:
            torch.distributed.broadcast_object_list([("stop", ())], src=0, group=self.control)
        except Exception:   # a worker already gone: Workers.close() ends the rest
            pass


def _map_tensors(args: tuple, fn) -> tuple:
    """args with fn applied to each tensor, also to the tensors inside a dataclass (the attention metadata)."""
    import dataclasses
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = fn(a)
        elif dataclasses.is_dataclass(a):
            a = dataclasses.replace(a, **{f.name: fn(getattr(a, f.name)) for f in dataclasses.fields(a)
                                          if isinstance(getattr(a, f.name), torch.Tensor)})
        out.append(a)
    return tuple(out)


def _cpu(args: tuple) -> tuple:
    """On the host, for pickling on the gloo control group."""
    return _map_tensors(args, lambda t: t.cpu())


def _to(args: tuple, device: torch.device) -> tuple:
    return args if device.type == "cpu" else _map_tensors(args, lambda t: t.to(device))


def serve_calls(model, kv, control_group, device) -> None:
    """A worker's loop: run each broadcast call on this rank's shard until "stop"."""
    import torch.distributed as dist
    with torch.inference_mode():
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=control_group)
            name, args = box[0]
            args = _to(args, device)
            if name == "stop":
                return
            if name == "forward":
                if len(args) > 3:           # the step's ring copies come first
                    kv.ring.copy_rows(*args[3:])
                model.forward(*args[:3], kv)
            elif name == "compute_logits":
                model.compute_logits(*args)
            elif name == "mtp_forward":
                model.mtp_forward(*args, kv)
            else:
                raise RuntimeError(f"unknown call {name!r}")


class Workers:
    """Ranks `ranks` of this node, each a `python -m exaserve.engine.worker` process running
    `target(rank, *args)` (target: "module:function"). Plain subprocesses rather than multiprocessing's spawn,
    which would re-run the user's main script in every worker (a script without an `if __name__ ==
    "__main__"` guard would start engines recursively)."""

    def __init__(self, ranks, target: str, args: tuple):
        self.ranks, self.procs = list(ranks), []
        try:
            for rank in self.ranks:
                ours, theirs = socket.socketpair()
                with theirs:
                    proc = subprocess.Popen([sys.executable, "-m", "exaserve.engine.worker", str(theirs.fileno())],
                                            pass_fds=[theirs.fileno()])
                self.procs.append(proc)
                with Connection(ours.detach()) as conn:
                    conn.send((target, rank, args))
        except BaseException:
            self.close(0)
            raise

    def any_dead(self) -> bool:
        return self.first_dead() is not None

    def first_dead(self) -> int | None:
        return next((r for r, p in zip(self.ranks, self.procs) if p.poll() is not None), None)

    def describe_dead(self) -> str:
        dead = [f"rank {r} exited with status {p.returncode}" for r, p in zip(self.ranks, self.procs)
                if p.poll() is not None]
        return ", ".join(dead) or "every worker process is alive"

    def wait(self) -> int:
        """Until every worker has exited; the first non-zero status (0 if none)."""
        codes = [p.wait() for p in self.procs]
        return next((c for c in codes if c), 0)

    def close(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


def run_node(config, env, target: str) -> int:
    """Another node of a multi-node engine: start this node's ranks, wait on them, return their exit status.
    SIGTERM or SIGINT stops them."""
    per_node = config.tensor_parallel_size // config.nnodes
    first = config.node_rank * per_node
    workers = Workers(range(first, first + per_node), target, (config, env))
    log.info("node %d: ranks %d-%d started; waiting for rank 0 at %s:%d", config.node_rank, first,
             first + per_node - 1, config.master_addr, config.master_port)

    def stop(signum, frame):
        for proc in workers.procs:
            proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return workers.wait()


def set_threads_per_rank(size: int) -> None:
    """On a CPU, ranks share the cores: each gets its share, or their OpenMP teams oversubscribe them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // size))


def worker_entry(fd: int) -> None:
    die_with_parent()
    with Connection(fd) as conn:
        target, rank, args = conn.recv()
    module, _, function = target.partition(":")
    getattr(importlib.import_module(module), function)(rank, *args)
