"""Run a function on N local gloo processes (forked), the way ``torchrun`` would on one CPU machine."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int, *args) -> None:
    """Call ``fn(rank, world, *args)`` in ``world`` processes with a gloo group; re-raises a rank's failure."""
    mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, start_method="fork")
