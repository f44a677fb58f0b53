"""What the tests share, in one place (conftest.py files hold fixtures only): image folders and dataset trees
written to disk, tiny run configs and runs, nets and losses of the engine tests, data makers and reference checks.
Imported as ``from tests.helpers.<module> import ...`` (the repository root on the path, as ``python -m pytest``
from it puts it)."""
