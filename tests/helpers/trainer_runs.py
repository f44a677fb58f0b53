"""A tiny run made with the Python ``Trainer`` alone (no CLI, no config given), shared by the tests of what such a
run leaves behind (``tests/retrieval/test_load_model.py``, ``tests/report/test_report_trainer_run.py``)."""

from __future__ import annotations

from pathlib import Path

import torch

import recallk
from recallk.data.transforms import transforms_for_model
from recallk.engine import Trainer, TrainSettings
from recallk.losses import RecallAtKSurrogate
from recallk.models import build_model
from tests.helpers.image_folders import write_image_folder


def trainer_api_run(top: Path) -> tuple[Trainer, Path, Path]:
    """(trainer, run folder ``top/run``, data folder ``top/data``): build_model (resnet10t, 8-d, frozen BN) +
    build_dataset ("folder", 6 classes x 4 images, the whole folder, 40 px) + RS@k (ks 1 and 2, tau_rank 0.02,
    SiMix) + Trainer (batch 8, 2 steps, evaluation = leave-one-out recall@1/2 on the same folder)."""
    data = write_image_folder(top / "data", 6, cell=(13, 9))
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model("resnet10t", embed_dim=8, freeze_bn=True)
    train_set = recallk.build_dataset("folder", data, None,
                                      transform=transforms_for_model(model, "train", image_size=40))
    eval_set = recallk.build_dataset("folder", data, None,
                                     transform=transforms_for_model(model, "test", image_size=40))

    def eval_fn(net: torch.nn.Module, epoch: int) -> dict:
        embeddings, labels = recallk.embed_dataset(net, eval_set, batch_size=32, device="cpu", progress=False)
        return recallk.retrieval_metrics(embeddings, labels, (1, 2))

    settings = TrainSettings(batch_size=8, chunk_size=8, per_class=2, epochs=1, lr=1e-3, device="cpu",
                             progress=False, tensorboard=False, max_steps_per_epoch=2)
    trainer = Trainer(model, RecallAtKSurrogate(ks=(1, 2), tau_rank=0.02, simix=True), train_set, top / "run",
                      settings, eval_fn=eval_fn)
    trainer.fit()
    return trainer, top / "run", data
