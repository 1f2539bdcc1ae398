"""Which kernel test files need TRITON_INTERPRET=1 from interpreter start-up.

tests/kernels/test_kernels.py runs them in such a subprocess; the main pytest process does not collect
them. test_kernels_bench.py starts its own subprocess and test_kernels_compile.py compiles for
the GPU (JIT mode), so both run in the main process.
"""
from pathlib import Path

KERNEL_TESTS = Path(__file__).resolve().parents[1] / "kernels"
MAIN_PROCESS = {"test_kernels_bench.py", "test_kernels_compile.py"}


def interpreted_kernel_files() -> list[Path]:
    return sorted(p for p in KERNEL_TESTS.glob("test_kernels_*.py") if p.name not in MAIN_PROCESS)
