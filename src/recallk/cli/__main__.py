"""``python -m recallk.cli`` runs the command line, as ``python -m recallk`` and the ``recallk`` script do."""

import sys

from recallk.cli.main import main

sys.exit(main())
