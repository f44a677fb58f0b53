"""``python -m recallk`` (and ``torchrun -m recallk``) runs the command line."""

import sys

from recallk.cli.main import main

sys.exit(main())
