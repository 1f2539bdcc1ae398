import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# tests/helpers/ (tiny.py builds the tiny models every test uses) and the repository root (harness/,
# the vLLM test and benchmark helpers that are not in the wheel) are importable from every test.
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS / "helpers"))
sys.path.insert(0, str(TESTS.parent))
# Every server and engine script started through harness/processes.py is stopped when this run is
# killed (SIGTERM / SIGHUP) or exits (tests/vllm/test_nothing_left_behind.py).
from harness import processes  # noqa: E402

processes.install_signal_handlers()
# Step-rate curves learned by the servers the tests start go to a directory of this run, not to the
# user's ~/.cache/dspark (and a curve left by an earlier run does not steer this one).
os.environ.setdefault("DSPARK_CACHE_DIR", tempfile.mkdtemp(prefix="dspark-test-cache-"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-model tests: one intra-op thread (on a shared 2-core box, two stall on tiny ops)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
