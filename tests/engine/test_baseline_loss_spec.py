"""A baseline loss describes itself (name and arguments, pml's defaults included) like RS@k: the Trainer's
config.yaml, checkpoints and start block name it (new-user trial, item 3)."""

from __future__ import annotations

import yaml

from recallk.engine import Trainer, freeze_batchnorm, load_checkpoint
from recallk.engine.run_config import describe_loss
from recallk.losses import build_loss
from tests.helpers.engine import NoisyImages, make_net


def test_describe_loss_of_a_baseline_is_its_name_and_arguments():
    loss = build_loss("multi_similarity", alpha=2.0, beta=40.0)
    assert describe_loss(loss) == {"name": "multi_similarity", "alpha": 2.0, "beta": 40.0, "base": 0.5}
    proxies = build_loss("proxy_anchor", {"num_classes": 3, "embedding_size": 4, "unused": 1}, margin=0.2)
    assert describe_loss(proxies) == {"name": "proxy_anchor", "margin": 0.2, "alpha": 32}  # not the run's context
    assert proxies.loss.proxies.shape == (3, 4)


def test_trainer_api_run_records_the_baseline_in_config_yaml_checkpoint_and_start_block(tmp_path):
    criterion = build_loss("contrastive", pos_margin=0.1, neg_margin=0.9)
    trainer = Trainer(freeze_batchnorm(make_net()), criterion, NoisyImages(), tmp_path, batch_size=12, chunk_size=6,
                      per_class=3, epochs=1, device="cpu", progress=False, tensorboard=False, max_steps=1)
    trainer.fit()
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["loss"] == {"name": "contrastive", "pos_margin": 0.1, "neg_margin": 0.9}
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["config"]["loss"] == saved["loss"]
    start = next(line for line in (tmp_path / "train.log").read_text().splitlines() if " loss " in line)
    assert "contrastive" in start and "'pos_margin': 0.1" in start and "'neg_margin': 0.9" in start, start
    assert "MetricLearningBaseline" not in start
