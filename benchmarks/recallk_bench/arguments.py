"""Argument types and the help formatter shared by the benchmarks' parsers: bad values stop the parser (exit 2,
one line naming the option and what it accepts) instead of a traceback deep in a benchmark."""

from __future__ import annotations

import argparse
import difflib
import os

#: the one entry point of the benchmarks (``python benchmarks/bench.py NAME ...``); children run through it too
BENCH_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench.py")


def prog(name: str) -> str:
    """The program name of benchmark ``name`` in its usage lines: ``bench.py name``."""
    return f"bench.py {name}"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with ``(default: X)``, unless its help already states its default; an option
    without a default (None) or a flag (False) says nothing more."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (ArgumentTypeError otherwise)."""
    return int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an int >= 0 (ArgumentTypeError otherwise)."""
    return int_at_least(text, 0)


def int_at_least(text: str, low: int) -> int:
    """``text`` as an int >= ``low``; argparse.ArgumentTypeError saying what was expected otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite float > 0 (ArgumentTypeError otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def timm_model(text: str) -> str:
    """An argparse type: a timm model name (``resnet18``, ``resnet50.a1_in1k``; hub names pass as they are).

    Raises ArgumentTypeError naming close names and how to list them when timm does not know the architecture."""
    import timm

    if text.startswith(_HUB_PREFIXES) or timm.is_model(text.split(".", 1)[0]):
        return text
    close = difflib.get_close_matches(text, timm.list_models(), n=3)
    hint = f" (close: {', '.join(close)})" if close else ""
    raise argparse.ArgumentTypeError(
        f"timm has no model {text!r}{hint}; list the names with "
        "python -c \"import timm; print(timm.list_models('resnet*'))\" (a pattern, or no argument for all)"
    )
