"""Deprecated: moved to :mod:`recallk.testing.rsk`."""

import warnings

from recallk.testing.rsk import *  # noqa: F403
from recallk.testing.rsk import __all__  # noqa: F401

warnings.warn("recallk.losses.reference is deprecated: use recallk.testing.rsk", DeprecationWarning, stacklevel=2)
