"""Run by ``torchrun`` in tests/engine/test_distributed_reliability.py (two "nodes" on this machine): a few
Trainer steps with RS@k + SiMix, each rank seeded differently before building the loss; rank 0 writes the
weights to ``<out>/weights.pt``. ``python -m tests.engine.multinode_train OUT --single`` (the repository on the
path) is the one-process run."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from recallk.engine import Trainer, freeze_batchnorm
from recallk.losses import RecallAtKSurrogate
from tests.helpers.engine import NoisyImages, make_net


def train(out: Path, distributed: bool, rank: int) -> Trainer:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = freeze_batchnorm(make_net(dropout=0.0))
    torch.manual_seed(100 + rank)  # the usual per-rank seeding, before the loss is built
    criterion = RecallAtKSurrogate(ks=(1, 2, 4), simix=True, memory="matrix")
    trainer = Trainer(model, criterion, NoisyImages(noise=0.0), out / "run", batch_size=8, chunk_size=3,
                      per_class=2, epochs=1, optimizer="sgd", lr=0.5, device="cpu", progress=False,
                      tensorboard=False, max_steps_per_epoch=3, distributed=distributed,
                      eval_fn=lambda m, e: {"map@r": 0.0})  # fmt: skip
    trainer.fit()
    return trainer


if __name__ == "__main__":
    import os

    out = Path(sys.argv[1])
    single = "--single" in sys.argv
    rank = 0 if single else int(os.environ["RANK"])
    trainer = train(out, distributed=not single, rank=rank)
    if rank == 0:
        torch.save(trainer.model.state_dict(), out / "weights.pt")
