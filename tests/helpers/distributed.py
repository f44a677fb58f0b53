"""What the multi-process tests share: a free TCP port on this machine for a process group's rendezvous, and a
counter of the torch.distributed collectives a block of code calls."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import torch
import torch.distributed as dist


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def count_collectives() -> Iterator[list[tuple[str, int]]]:
    """Record every torch.distributed collective called (through the ``torch.distributed`` module) inside the
    block, as ``(name, elements of its tensor arguments)`` in call order; the collectives still run."""
    calls: list[tuple[str, int]] = []
    names = ("all_reduce", "all_gather", "reduce_scatter", "reduce_scatter_tensor", "all_gather_into_tensor",
             "broadcast", "broadcast_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv", "barrier")
    originals = {name: getattr(dist, name) for name in names}

    def counted(name: str, function):
        def call(*args, **kwargs):
            tensor = args[0] if args else None
            if name in ("all_gather", "reduce_scatter") and len(args) > 1:
                tensor = args[1] if name == "reduce_scatter" else args[0]
            if isinstance(tensor, (list, tuple)):
                numel = sum(t.numel() for t in tensor if isinstance(t, torch.Tensor))
            else:
                numel = tensor.numel() if isinstance(tensor, torch.Tensor) else 0
            calls.append((name, numel))
            return function(*args, **kwargs)
        return call

    for name, function in originals.items():
        setattr(dist, name, counted(name, function))
    try:
        yield calls
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)
