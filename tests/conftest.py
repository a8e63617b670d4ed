import os
import subprocess
import tempfile

import pytest

# The shared helpers' asserts (tests/helpers/) explain their failures as a test's own do.
pytest.register_assert_rewrite("helpers")

# Keep each test process to one thread: pytest-xdist already uses every core.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The measured-matmul-peak cache of the tests (subprocesses included) is never the user's.
os.environ.setdefault("LLAMA_PRETRAIN_CACHE_DIR", tempfile.mkdtemp(prefix="llama-pretrain-test-cache-"))


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root or CAP_SYS_ADMIN, as in this project's CI container)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)
