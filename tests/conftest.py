import os

import pytest

# Keep each test process to one thread: pytest-xdist already uses every core.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)
    yield
