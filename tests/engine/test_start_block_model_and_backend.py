"""The start block names the model (pretrained or random weights, BatchNorm frozen or not) and, under torchrun,
the torch.distributed backend; the backend follows the training device (gloo on the CPU even where CUDA exists,
nccl for CUDA) (issue 24, items 9b and 9e)."""

from __future__ import annotations

import pytest
import torch

from recallk.engine import Trainer
from recallk.engine import distributed as distributed_module
from recallk.engine.distributed import distributed_backend, init_distributed
from recallk.engine.run_log import start_block
from recallk.models import build_model
from tests.helpers.engine import RandomRGBImages


def model_line(model, tmp_path) -> str:
    trainer = Trainer(model, lambda e, y: e.sum(), RandomRGBImages(), tmp_path, batch_size=8, chunk_size=4, per_class=2,
                      epochs=1, device="cpu", progress=False, tensorboard=False)
    (line,) = [x for x in start_block(trainer, resumed=False).splitlines() if x.startswith("model ")]
    return line


def test_the_own_data_model_is_named_random_with_frozen_batchnorm(tmp_path):
    # the README's own-data command: model.pretrained=false (build_model freezes BatchNorm by default)
    line = model_line(build_model("resnet10t", embed_dim=8, pretrained=False), tmp_path)
    assert line == ("model        resnet10t (8-d), random weights (model.pretrained: false: trained from scratch), "
                    "BatchNorm frozen")


def test_batchnorm_that_trains_is_named_so(tmp_path):
    line = model_line(build_model("resnet10t", embed_dim=8, pretrained=False, freeze_bn=False), tmp_path)
    assert line.endswith("random weights (model.pretrained: false: trained from scratch), BatchNorm trained "
                         "(model.freeze_bn: false)")


def test_a_model_not_built_by_build_model_is_named_by_its_class(tmp_path):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8))
    assert model_line(net, tmp_path) == "model        Sequential, no BatchNorm"


@pytest.mark.parametrize(("device", "backend"), [("cpu", "gloo"), (torch.device("cpu"), "gloo"), ("cuda", "nccl"),
                                                  ("cuda:1", "nccl"), (torch.device("cuda", 0), "nccl"),
                                                  ("mps", "gloo")])
def test_the_backend_follows_the_training_device(device, backend):
    assert distributed_backend(device) == backend


@pytest.mark.parametrize(("cuda", "backend"), [(True, "nccl"), (False, "gloo")])
def test_auto_picks_nccl_only_where_cuda_exists(monkeypatch, cuda, backend):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert distributed_backend("auto") == backend
    assert distributed_backend(None) == backend


def test_a_cpu_run_under_torchrun_joins_with_gloo_where_cuda_exists(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    joined = {}
    monkeypatch.setattr(distributed_module.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed_module.dist, "init_process_group", lambda **kw: joined.update(kw))
    context = init_distributed(device="cpu")
    assert joined["backend"] == "gloo" and context.device == torch.device("cpu")


def test_an_unreadable_device_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown training device 'gpu0'.*cpu, cuda, cuda:N or auto"):
        distributed_backend("gpu0")


def test_the_start_block_names_the_backend_of_a_cpu_run_under_torchrun(monkeypatch, tmp_path):
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    trainer = Trainer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8)), lambda e, y: e.sum(),
                      RandomRGBImages(), tmp_path, batch_size=8, chunk_size=4, per_class=2, epochs=1, device="cpu",
                      progress=False, tensorboard=False, distributed=True)
    try:
        block = start_block(trainer, resumed=False).splitlines()
    finally:
        dist.destroy_process_group()
    assert "device       cpu, 1 process(es) (torch.distributed backend gloo)" in block


@pytest.mark.parametrize(("epochs", "said"), [(1, "1 epoch"), (2, "2 epochs")])
def test_the_train_data_line_counts_in_words(tmp_path, epochs, said):
    # 16 images, batches of 8: 2 steps per epoch
    trainer = Trainer(build_model("resnet10t", embed_dim=8), lambda e, y: e.sum(), RandomRGBImages(), tmp_path,
                      batch_size=8, chunk_size=4, per_class=2, epochs=epochs, device="cpu", progress=False,
                      tensorboard=False)
    (line,) = [x for x in start_block(trainer, resumed=False).splitlines() if x.startswith("train data")]
    assert line.endswith(f"; 2 steps per epoch, {said}"), line
