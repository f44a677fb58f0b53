"""Suite-wide set-up: without a GPU, Triton kernels run in Triton's interpreter (it must be chosen before triton
is first imported, so it is set here, before any test module loads); the fixtures ``device`` and ``dtype`` of the
device-aware tests (``RECALLK_TEST_DEVICE``, ``RECALLK_TEST_DTYPES``: tests/helpers/device_settings.py)."""

import os

import pytest
import torch

from tests.helpers.device_settings import TEST_DEVICE, TEST_DTYPES, dtype_id

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture()
def device() -> torch.device:
    """The device of the device-aware tests: ``RECALLK_TEST_DEVICE`` (default cpu)."""
    return TEST_DEVICE


@pytest.fixture(params=TEST_DTYPES, ids=dtype_id)
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """Each dtype of ``RECALLK_TEST_DTYPES`` (default float32, float64) in turn; a test's own
    ``@pytest.mark.parametrize("dtype", ...)`` takes precedence."""
    return request.param


@pytest.fixture()
def one_thread():
    """One torch thread for the test, restored after it: faster on a shared machine, and the same arithmetic in every
    run (for tests that compare weights or metrics bit for bit). Used by a module's
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
