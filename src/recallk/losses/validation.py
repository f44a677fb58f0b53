"""Deprecated: moved to :mod:`recallk.checks`."""

import warnings

from recallk.checks import *  # noqa: F403
from recallk.checks import __all__  # noqa: F401

warnings.warn("recallk.losses.validation is deprecated: use recallk.checks", DeprecationWarning, stacklevel=2)
