"""Suite-wide set-up: without a GPU, Triton kernels run in Triton's interpreter (it must be chosen before triton
is first imported, so it is set here, before any test module loads)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture()
def one_thread():
    """One torch thread for the test, restored after it: faster on a shared machine, and the same arithmetic in every
    run (for tests that compare weights or metrics bit for bit). Used by a module's
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
