"""Cost of the per-step stop check with several processes: ``StopSignals.requested(distributed=True)`` is one
all-reduce (MAX) of one int64, which every rank makes after each optimiser update (recallk.engine.stop).

    python benchmarks/stop_check.py            # 2 gloo processes on the CPU, 1 thread each
"""

import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CALLS = 2000


def work(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from recallk.engine.stop import StopSignals

    signals, cpu = StopSignals(), torch.device("cpu")
    for _ in range(50):  # warm-up
        signals.requested(True, cpu)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(CALLS):
        signals.requested(True, cpu)
    per_call = (time.perf_counter() - start) / CALLS
    if rank == 0:
        print(f"stop check (all-reduce MAX of one int64), 2 gloo ranks, 1 thread each: {per_call * 1e6:.1f} us a step")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(work, args=(int(sys.argv[1]) if len(sys.argv) > 1 else 29533,), nprocs=2)
