"""Two gloo processes on this machine, for the tests of ``torch.distributed`` support."""

import socket

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(worker, *args) -> None:
    """Run ``worker(rank, init_method, *args)`` for ranks 0 and 1 and wait for both.

    ``init_method`` is for ``dist.init_process_group("gloo", init_method=..., rank=rank,
    world_size=2)``. The processes are spawned and meet over loopback TCP: forked processes
    meeting in a file failed on a GPU machine (torch 2.11, a test process that had used CUDA),
    where this variant passed.
    """
    mp.spawn(worker, args=(f"tcp://127.0.0.1:{free_port()}", *args), nprocs=2, join=True)
