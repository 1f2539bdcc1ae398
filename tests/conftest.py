import os
import sys
from pathlib import Path

import pytest
import torch

# tests/tiny.py builds the tiny models every test uses.
sys.path.insert(0, str(Path(__file__).parent))

from interpreted import interpreted_kernel_files  # noqa: E402

# The Triton kernel files need TRITON_INTERPRET=1 from interpreter start-up; tests/test_kernels.py
# runs them in such a subprocess and asserts on its result, so this process does not collect them.
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = [p.name for p in interpreted_kernel_files()]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-model tests: one intra-op thread (on a shared 2-core box, two stall on tiny ops)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
