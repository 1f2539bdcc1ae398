"""Triton kernels for semi-parallel drafting (installed as dspark_plugin.kernels), each with a PyTorch twin.

Callers use dspark_plugin.kernels.dispatch: one function per operation, Triton on CUDA, twin elsewhere.
"""
