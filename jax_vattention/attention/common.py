"""Shared pieces of the attention kernels: argument checks, tile maths, page rules.

Cache layout (every function in this package): one layer's K (and V) is
``[MB, S, Hkv, D]`` token-major, ``MB`` slots of ``S`` tokens each. A slot is
backed by physical pages only up to its mapped capacity; everything past it is
unmapped and must never be touched.

Read contract of the kernels. Row ``b`` reads slot ``slots[b]`` at token
positions ``[0, lengths[b])`` only, in tiles of ``block_k`` tokens:

* On the GPU (Pallas/Triton) every KV tile load is row-masked with
  ``position < length``; masked rows issue no memory access, so nothing past
  ``lengths[b]`` is read at all.
* In interpret mode (CPU) a masked load is emulated by reading the whole tile
  and selecting, so reads reach ``ceil(length / block_k) * block_k``.

The conservative requirement, which we document for every backend, is therefore:
**tokens ``[0, ceil(length / block_k) * block_k)`` of each slot must be mapped**.
The vAttention manager maps whole pages, so this holds whenever ``block_k``
divides the tokens per page::

    tokens_per_page = page_bytes // (Hkv * D * itemsize)
    # 2 MiB pages, Hkv=8, D=128, bf16 -> 1024 tokens per page

Every block size the kernels pick is a power of two <= 128, which divides any
power-of-two tokens-per-page >= 128. ``check_block_fits_pages`` validates a
configuration explicitly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

# Finite "minus infinity": exp(MASK_VALUE - m) underflows to exactly 0 while
# MASK_VALUE - MASK_VALUE stays 0 (no inf - inf = nan).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
SUPPORTED_HEAD_DIMS = (64, 128)


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tokens_per_page(page_bytes: int, kv_heads: int, head_dim: int, dtype) -> int:
    """Tokens of one slot that one physical page backs (per K or V tensor)."""
    return page_bytes // (kv_heads * head_dim * jnp.dtype(dtype).itemsize)


def check_block_fits_pages(block_k: int, page_bytes: int, kv_heads: int, head_dim: int, dtype) -> None:
    """Raise unless ``block_k`` divides tokens-per-page (see the module docstring)."""
    tpp = tokens_per_page(page_bytes, kv_heads, head_dim, dtype)
    if tpp <= 0 or tpp % block_k:
        raise ValueError(
            f"block_k={block_k} does not divide the {tpp} tokens per page "
            f"(page_bytes={page_bytes}, Hkv={kv_heads}, D={head_dim}, {jnp.dtype(dtype).name}); "
            "a KV tile could straddle into an unmapped page"
        )


def default_block_k(head_dim: int, seq_len: int | None = None) -> int:
    """64 tokens for D=128 (32 KiB of K+V per bf16 tile pair), 128 for D=64; halved
    (down to 16) until it divides the slot length ``S`` when that is given."""
    block_k = 64 if head_dim == 128 else 128
    while seq_len and seq_len % block_k and block_k > 16:
        block_k //= 2
    return block_k


def check_tiles_fit_slot(seq_len: int, block_k: int, masked_loads: bool) -> None:
    """Unmasked tile reads (interpret mode) need ``S % block_k == 0``.

    A plain tile read near the end of a slot whose length is not a multiple of the
    block would be clamped (shifted) by ``dynamic_slice`` and misalign rows with
    their mask. Row-masked GPU loads have no such constraint.
    """
    if not masked_loads and seq_len % block_k:
        raise ValueError(
            f"max_seq={seq_len} is not a multiple of block_k={block_k}; pick a block_k that divides it "
            "(the vAttention manager rounds max_seq to whole pages, so this only affects plain arrays)"
        )


def default_sm_scale(head_dim: int, sm_scale: float | None) -> float:
    return float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(head_dim)


def check_cache(k_cache, v_cache, *, kernel: bool = True):
    """``(MB, S, Hkv, D)`` of a K/V cache pair. The kernels need bf16/fp16 and head_dim 64/128;
    the references (``kernel=False``) take any float dtype (e.g. the CPU's fp32 caches) and head_dim."""
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must both be [MB, S, Hkv, D], got {k_cache.shape} and {v_cache.shape}")
    dtypes = [jnp.dtype(d) for d in (SUPPORTED_DTYPES if kernel else (*SUPPORTED_DTYPES, jnp.float32))]
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in dtypes:
        raise ValueError(f"cache dtype must be one of {[d.name for d in dtypes]} (same for K and V), got "
                         f"{k_cache.dtype}, {v_cache.dtype}" + ("; the jnp references also take float32" if kernel
                                                                 else ""))
    mb, s, hkv, d = k_cache.shape
    if kernel and d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    return mb, s, hkv, d


def check_rows(name: str, x, batch: int):
    if jnp.ndim(x) != 1 or jnp.shape(x)[0] != batch or jnp.result_type(x) != jnp.int32:
        raise ValueError(f"{name} must be int32 [B={batch}], got {jnp.result_type(x)} {jnp.shape(x)}")


def check_row_values(mb: int, seq: int, slots, *, padding_rows: bool = True, **lengths) -> None:
    """Refuse rows that would read outside the cache: a slot past ``mb`` or a length outside ``[0, seq]``.

    Checked where the values are known (concrete arrays, outside jit). Inside jit the
    lengths come from the cache's ``write`` (checked against each slot's backed pages
    natively); slots below 0 are padding rows everywhere.
    """
    arrays = (slots, *lengths.values())
    if any(isinstance(x, jax.core.Tracer) for x in arrays):
        return
    s = np.asarray(slots)
    if s.size and s.max() >= mb:
        raise ValueError(f"slots must be < max_batch={mb} (negative: padding rows), got {s.tolist()}")
    if s.size and not padding_rows and s.min() < 0:
        raise ValueError(f"slots must be in [0, {mb}) here (no padding rows), got {s.tolist()}")
    for name, x in lengths.items():
        v = np.asarray(x)
        if v.size and (v.min() < 0 or v.max() > seq):
            raise ValueError(f"{name} must be in [0, {seq}] (the cache's tokens per slot), got {v.tolist()}")


def check_heads(hq: int, hkv: int):
    if hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hkv})")
    return hq // hkv


def capped_logits(s, soft_cap: float | None):
    """``soft_cap * tanh(s / soft_cap)`` (Gemma-style logit soft-capping), fp32."""
    if soft_cap is None:
        return s
    return soft_cap * jnp.tanh(s / soft_cap)


def online_softmax_step(carry, s, v, valid):
    """One flash-attention block update, shared by the decode and prefill kernels.

    carry: (acc [M, D] f32, m [M] f32, l [M] f32); ``s``: [M, N] f32 logits already
    scaled (and capped) in the natural-log domain; ``v``: [N, D] tile whose
    invalid rows are zero; ``valid``: [M, N] bool or None (all valid).
    Every row must see at least one valid column in its first block; the
    kernels guarantee it (their first tile always starts at a valid token).
    """
    acc, m_prev, l_prev = carry
    s = s * LOG2E
    if valid is not None:
        s = jnp.where(valid, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - m_next[:, None])
    l_next = alpha * l_prev + jnp.sum(p, axis=1)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return acc * alpha[:, None] + pv, m_next, l_next


def qk_logits(q, k, sm_scale: float, soft_cap: float | None):
    """``q [M, D] . k [N, D]^T`` in fp32, scaled and optionally soft-capped."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return capped_logits(s * sm_scale, soft_cap)


def gpu_core_count(default: int = 132) -> int:
    """Streaming multiprocessors of the first GPU (132 on H100 SXM), else ``default``."""
    try:
        for d in jax.devices():
            if d.platform == "gpu":
                return int(getattr(d, "core_count", default) or default)
    except RuntimeError:
        pass
    return default


def load_kv_tile(ref, slot, pos0, kv_head, row_ok, masked: bool):
    """Load the ``[block_k, D]`` tile ``ref[slot, pos0:pos0+block_k, kv_head, :]``.

    Rows with ``row_ok == False`` (positions at or past the row's length) come
    back as zeros: they may hold stale or never-written bytes (even NaN) and
    would otherwise poison ``p @ V`` through ``0 * nan``.

    ``masked=True`` (GPU): a row-masked Triton load; masked rows issue no memory
    access, so nothing past the length is read. ``masked=False`` (interpret
    mode): a plain tile read, then a select. The interpreter's masked load pads
    (copies) the *whole* ref first, which would read the unmapped part of a
    vAttention cache; a plain read is an in-place ``dynamic_slice`` instead. It
    touches ``[pos0, pos0 + block_k)``, i.e. up to the length rounded up to the
    block, the bound ``check_block_fits_pages`` guarantees is mapped. The GPU
    reads a subset of what the interpreter reads, so the CPU segfault test
    bounds the GPU's access set too.
    """
    bk, head_dim = row_ok.shape[0], ref.shape[-1]
    tile_ok = jnp.broadcast_to(row_ok[:, None], (bk, head_dim))
    if masked:
        from jax.experimental.pallas import triton as pl_triton

        return pl_triton.load(ref.at[slot, pl.ds(pos0, bk), kv_head, :], mask=tile_ok, other=0.0)
    tile = ref[slot, pl.ds(pos0, bk), kv_head, :]
    return jnp.where(tile_ok, tile, jnp.zeros_like(tile))
