"""Counter-based RNG shared bit-for-bit by the Triton kernels and their PyTorch twins.

A draft token must be drawn from exactly the probabilities handed to the verifier, and the twin
must draw the same token as the kernel; so noise is a pure function of (seed, step, vocab index),
built from the murmur3 32-bit finaliser on uint32.

Gumbel-max picks the largest y_i + G_i, so what matters is the upper tail of G = -log(E),
E ~ Exp(1), i.e. E near 0. The usual G = -log(-log(u)) with a 23/24-bit u has an absolute
resolution of 2^-24 in 1 - u, which makes the winning G (about log V for a flat row) coarse by a
few percent and biases the sampled distribution. Here w = x1 * 2^-32 + x2 * 2^-64 (two independent
32-bit hashes, float32) has full relative precision near 0, and E = -log(1 - w) is evaluated by its
series for small w, so E keeps ~24 significant bits where the maximum is decided.

The twin keeps uint32 values in int64 tensors and multiplies in 16-bit halves so no product
overflows int64.
"""
from __future__ import annotations

import torch

from dspark_plugin.kernels._triton import HAVE_TRITON, tl, triton

MASK32 = 0xFFFFFFFF
MIX1 = 0x7FEB352D
MIX2 = 0x846CA68B
GOLDEN = 0x9E3779B9
INDEX_SALT = 0x632BE5AB
SECOND_KEY = 0x68E31DA4
TWO_M32 = 2.0 ** -32
TWO_M64 = 2.0 ** -64
SERIES_BELOW = 0.0625


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def fmix32_torch(x: torch.Tensor) -> torch.Tensor:
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX2)
    return x ^ (x >> 16)


def row_key_torch(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """seeds [B] (any int) and a step counter -> per-row key (uint32 held in int64)."""
    seeds = seeds.to(torch.int64) & MASK32
    st = torch.as_tensor(step, dtype=torch.int64, device=seeds.device) & MASK32
    return fmix32_torch(seeds ^ ((fmix32_torch(_mul32(st, GOLDEN) + 1)) & MASK32))


def uniform_torch(row_key: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """row_key [...] x cols [...] (broadcast) -> float32 w in [0, 1], fine near 0."""
    c = fmix32_torch((cols.to(torch.int64) + INDEX_SALT) & MASK32)
    x1 = fmix32_torch(row_key ^ c)
    x2 = fmix32_torch(fmix32_torch(row_key ^ SECOND_KEY) ^ c)
    return x1.to(torch.float32) * TWO_M32 + x2.to(torch.float32) * TWO_M64


def exponential_torch(w: torch.Tensor) -> torch.Tensor:
    """E = -log(1 - w) ~ Exp(1), accurate to float32 relative precision for small w."""
    series = w * (1.0 + w * (0.5 + w * (1.0 / 3.0 + w * (0.25 + w * (0.2 + w * (1.0 / 6.0))))))
    return torch.where(w < SERIES_BELOW, series, -torch.log(1.0 - w))


def gumbel_torch(seeds: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """[B, V] Gumbel noise for one drafting step."""
    rk = row_key_torch(seeds, step)
    cols = torch.arange(vocab_size, device=seeds.device)
    return -torch.log(exponential_torch(uniform_torch(rk[:, None], cols[None, :])))


if HAVE_TRITON:

    @triton.jit
    def fmix32(x):
        x ^= x >> 16
        x *= 0x7FEB352D
        x ^= x >> 15
        x *= 0x846CA68B
        x ^= x >> 16
        return x

    @triton.jit
    def row_key(seeds_i64, step):
        """seeds [BLOCK_B] int64, step (scalar int) -> [BLOCK_B] uint32."""
        s = (seeds_i64 & 0xFFFFFFFF).to(tl.uint32)
        st = ((tl.zeros_like(seeds_i64) + step) & 0xFFFFFFFF).to(tl.uint32)
        return fmix32(s ^ fmix32(st * 0x9E3779B9 + 1))

    @triton.jit
    def uniform(rk, cols):
        """rk uint32 and cols int (broadcastable) -> float32 w in [0, 1], fine near 0."""
        c = fmix32(cols.to(tl.uint32) + 0x632BE5AB)
        x1 = fmix32(rk ^ c)
        x2 = fmix32(fmix32(rk ^ 0x68E31DA4) ^ c)
        return x1.to(tl.float32) * 2.3283064365386963e-10 + x2.to(tl.float32) * 5.421010862427522e-20

    @triton.jit
    def exponential(w):
        series = w * (1.0 + w * (0.5 + w * (0.3333333432674408 + w * (0.25 + w * (0.20000000298023224
                                                                                  + w * 0.1666666716337204)))))
        return tl.where(w < 0.0625, series, -tl.log(1.0 - w))

    @triton.jit
    def gumbel(rk, cols):
        return -tl.log(exponential(uniform(rk, cols)))
