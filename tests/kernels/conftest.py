import os

from interpreted import interpreted_kernel_files

# The Triton kernel files need TRITON_INTERPRET=1 from interpreter start-up; test_kernels.py runs
# them in such a subprocess and asserts on its result, so this process does not collect them.
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = [p.name for p in interpreted_kernel_files()]
