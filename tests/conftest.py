import os
import sys
from pathlib import Path

# tests/tiny.py builds the tiny models every test uses.
sys.path.insert(0, str(Path(__file__).parent))

from interpreted import interpreted_kernel_files  # noqa: E402

# The Triton kernel files need TRITON_INTERPRET=1 from interpreter start-up; tests/test_kernels.py
# runs them in such a subprocess and asserts on its result, so this process does not collect them.
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = [p.name for p in interpreted_kernel_files()]
