"""Triton kernels for semi-parallel drafting (installed as dspark_plugin.kernels), each with a PyTorch twin."""
