"""Worker processes for tensor/expert parallelism over torch.distributed (gloo on CPU, NCCL on CUDA).

The engine process is rank 0: it runs the scheduler, the sampler and the API, and holds shard 0 of the model.
Ranks 1..N-1 are worker processes it starts (`Workers`), each holding its shard and its share of the KV pools
(its kv heads). Every model call on rank 0 goes through `ShardedModel`, which first broadcasts the call (its
name and its inputs: token ids, positions, attention metadata, hidden rows) on a gloo group, then runs its
own shard; each worker runs the same call on its shard, so the collectives inside the layers meet. Only rank
0 gets the logits (an all-gather inside compute_logits) and samples; the others learn the tokens as inputs of
the next call. Per step the workers wait on one broadcast, never on rank 0's event loop.

Start-up: each worker loads its shard, then reports ("ok" or the error) on a pipe; rank 0 raises the first
error with its rank, so a failure on any rank surfaces where the user looks. Only then do the ranks form the
process group (a worker that died early cannot leave rank 0 waiting in a rendezvous). Workers die with the
engine process (PR_SET_PDEATHSIG), and a worker that dies or a collective that fails marks the engine dead
(`WorkerError`): the server then fails its requests and exits non-zero.
"""
from __future__ import annotations

import ctypes
import datetime
import importlib
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
COLLECTIVE_TIMEOUT_S = 600.0    # a collective that waits longer means a hung rank


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


def init_group(rank: int, size: int, addr: str, port: int, device: torch.device):
    """The default process group (NCCL on CUDA, gloo on CPU) and a gloo group for the control broadcasts."""
    import torch.distributed as dist
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=size,
                            timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return control


class ShardedModel:
    """Rank 0's model under tensor parallelism: quacks like ExaoneMoeModel for the runner; each call runs on
    every rank."""

    def __init__(self, local, control_group, workers: "Workers"):
        self.local, self.control, self.workers = local, control_group, workers
        self.ops, self.cfg, self.mtp, self.par = local.ops, local.cfg, local.mtp, local.par

    def _broadcast(self, call) -> None:
        try:
            torch.distributed.broadcast_object_list([call], src=0, group=self.control)
        except Exception as exc:
            raise WorkerError(f"a worker stopped answering ({self.workers.describe_dead()}): {exc}") from exc

    def _run(self, fn, *args):
        try:
            return fn(*args)
        except WorkerError:
            raise
        except RuntimeError as exc:   # gloo/NCCL report a peer that is gone as a RuntimeError
            if self.workers.any_dead() or "Connection" in str(exc) or "timed out" in str(exc).lower():
                raise WorkerError(f"tensor-parallel collective failed ({self.workers.describe_dead()}): {exc}") \
                    from exc
            raise

    def forward(self, input_ids, positions, meta, kv, before_compute=None):
        self._broadcast(("forward", _cpu((input_ids, positions, meta))))
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


def _cpu(args):
    """Tensors (also inside the metadata dataclass) moved to the host for pickling on the gloo control group."""
    import dataclasses
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a.cpu())
        elif dataclasses.is_dataclass(a):
            out.append(dataclasses.replace(a, **{f.name: getattr(a, f.name).cpu() for f in dataclasses.fields(a)
                                                  if isinstance(getattr(a, f.name), torch.Tensor)}))
        else:
            out.append(a)
    return tuple(out)


def _to(args, device):
    import dataclasses
    if device.type == "cpu":
        return args
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a.to(device))
        elif dataclasses.is_dataclass(a):
            out.append(dataclasses.replace(a, **{f.name: getattr(a, f.name).to(device)
                                                  for f in dataclasses.fields(a)
                                                  if isinstance(getattr(a, f.name), torch.Tensor)}))
        else:
            out.append(a)
    return tuple(out)


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
                model.forward(*args, kv)
            elif name == "compute_logits":
                model.compute_logits(*args)
            elif name == "mtp_forward":
                model.mtp_forward(*args, kv)
            else:
                raise RuntimeError(f"unknown call {name!r}")


class Workers:
    """Ranks 1..size-1, each a `python -m exaserve.engine.worker` process running `target(rank, conn, *args)`
    (target: "module:function"). Plain subprocesses rather than multiprocessing's spawn, which would re-run the
    user's main script in every worker (a script without an `if __name__ == "__main__"` guard would start
    engines recursively)."""

    def __init__(self, size: int, target: str, args: tuple):
        self.procs, self.conns = [], []
        try:
            for rank in range(1, size):
                ours, theirs = socket.socketpair()
                with theirs:
                    proc = subprocess.Popen([sys.executable, "-m", "exaserve.engine.worker", str(theirs.fileno())],
                                            pass_fds=[theirs.fileno()])
                self.procs.append(proc)
                self.conns.append(Connection(ours.detach()))
                self.conns[-1].send((target, rank, args))
        except BaseException:
            self.close(0)
            raise

    def wait_loaded(self) -> list:
        """Each worker's start-up report; raises RuntimeError with the first failing rank's message."""
        reports = [None] * len(self.procs)
        deadline = time.monotonic() + START_TIMEOUT_S
        while any(r is None for r in reports):
            for i, (proc, conn) in enumerate(zip(self.procs, self.conns)):
                if reports[i] is not None:
                    continue
                if conn.poll(0.05):
                    kind, value = conn.recv()
                    if kind == "error":
                        raise RuntimeError(f"rank {i + 1}: {value}")
                    reports[i] = value
                elif proc.poll() is not None:
                    raise RuntimeError(f"rank {i + 1} exited with status {proc.returncode} while loading")
            if time.monotonic() > deadline:
                raise RuntimeError(f"a worker did not load within {START_TIMEOUT_S:.0f} s")
        return reports

    def send(self, message) -> None:
        for conn in self.conns:
            conn.send(message)

    def any_dead(self) -> bool:
        return any(p.poll() is not None for p in self.procs)

    def describe_dead(self) -> str:
        dead = [f"rank {i + 1} exited with status {p.returncode}" for i, p in enumerate(self.procs)
                if p.poll() is not None]
        return ", ".join(dead) or "every worker process is alive"

    def close(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []


def set_threads_per_rank(size: int) -> None:
    """On a CPU, ranks share the cores: each gets its share, or their OpenMP teams oversubscribe them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // size))


def worker_entry(fd: int) -> None:
    die_with_parent()
    conn = Connection(fd)
    target, rank, args = conn.recv()
    module, _, function = target.partition(":")
    getattr(importlib.import_module(module), function)(rank, conn, *args)
