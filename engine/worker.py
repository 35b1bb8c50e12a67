"""Entry point of a tensor-parallel worker process: `python -m exaserve.engine.worker FD` (started by
engine/distributed.py's Workers; FD is its end of a socket pair to the engine process)."""
import sys

from exaserve.engine.distributed import worker_entry

if __name__ == "__main__":
    worker_entry(int(sys.argv[1]))
