"""Shared pieces of the attention kernels: argument checks, tile maths, page rules.

Cache layouts (every function in this package takes them all):

* per-layer, rank 4: one layer's K (or V) is ``[MB, S, Hkv, D]`` token-major,
  ``MB`` slots of ``S`` tokens each (``CacheConfig.layers_per_group == 1``);
* interleaved, rank 6: the group tensor ``[MB, S, g, 2, Hkv, D]`` that
  ``layers_per_group = g > 1`` reserves for g layers (per token: layer 0's K,
  layer 0's V, layer 1's K, ...), passed as *both* ``k_cache`` and ``v_cache``
  with the static entries ``k_entry = 2 * (layer % g)`` and
  ``v_entry = k_entry + 1`` (``CacheConfig.locate``);
* entries, rank 5: ``[MB, S, E, Hkv, D]``, the same with the ``g x 2`` axes
  flattened (``E = 2g``), or any other tensor of ``E`` entries per token.

``k_entry``/``v_entry`` index the flattened entry axes, ``[0, E)``. A layer's K is
then an ordinary strided tensor (token stride ``E * Hkv * D * itemsize``, 128 KiB
for Llama-3-8B with ``g = 32``); the kernels read it in place and never touch the
other entries.

Pass views as they are: no function here reshapes a cache, and callers should
not either. Inside jit a reshape of row-major axes is usually a bitcast, but one
that adds, drops or moves past a unit axis (``E = 1``; ``Hkv = 1``; ``MB = 1``)
leaves XLA free to lay the unit axis out differently from what its consumer
wants, and it then copies the whole cache (on CPU it does: a 6-D -> 5-D reshape
of an MQA group copies it, which on a sparse cache reads every unmapped page).
A slot is backed by physical pages only up to its mapped capacity; everything
past it is unmapped and must never be touched.

Read contract of the kernels. Row ``b`` reads slot ``slots[b]`` at token
positions ``[0, lengths[b])`` only, in tiles of ``block_k`` tokens:

* On the GPU (Pallas/Triton) every KV tile load is row-masked with
  ``position < length``; masked rows issue no memory access, so nothing past
  ``lengths[b]`` is read at all, whatever ``block_k`` and the page size.
* In interpret mode (CPU) a masked load is emulated by reading the whole tile
  and selecting, so reads reach ``ceil(length / block_k) * block_k``.

The conservative requirement, which we document for every backend, is therefore:
**tokens ``[0, ceil(length / block_k) * block_k)`` of each slot must be mapped**.
The vAttention manager maps whole pages, so this holds whenever no tile straddles
a page boundary, i.e. ``block_k`` divides the tokens per page::

    tokens_per_page = page_bytes // (E * Hkv * D * itemsize)   # exact division
    # 2 MiB pages, Hkv=8, D=128, bf16: 1024 tokens per page per-layer (E=1),
    # 128 with g=4 (E=8), 16 with g=32 (E=64, the whole of Llama-3-8B per token)

Block size rule. The kernels' default ``block_k`` is 64 for D=128 (128 for D=64),
halved (down to 16) until it divides the slot length ``S`` and, when the caller
passes it (``default_block_k(..., tokens_per_page=)``,
``AttentionSpec.kernel_block_k``), the tokens per page. The kernels themselves
do not know the page size: per-layer caches with 2 MiB pages (1024 tokens) always
fit the default, but an interleaved cache in interpret mode needs the caller to
pass a ``block_k`` that divides its tokens per page (``AttentionSpec.block_k``;
``check_block_fits_pages`` validates it). On the GPU the default is safe for any
page size (masked loads), so the page limit there is a conservative choice, not a
correctness requirement. Every block is a power of two >= 16 (Triton dots), so an
interpreted read of a sparse cache needs at least 16 tokens per page.
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


def tokens_per_page(page_bytes: int, kv_heads: int, head_dim: int, dtype, entries: int = 1) -> int:
    """Tokens of one slot that one physical page backs: ``page_bytes // token_bytes`` with
    ``token_bytes = entries * kv_heads * head_dim * itemsize`` (``entries``: ``[Hkv, D]`` entries per token of the
    reserved tensor, 1 per-layer, ``2 * layers_per_group`` interleaved; ``CacheConfig.entries_per_token``)."""
    return page_bytes // (entries * kv_heads * head_dim * jnp.dtype(dtype).itemsize)


def check_block_fits_pages(block_k: int, page_bytes: int, kv_heads: int, head_dim: int, dtype,
                           entries: int = 1) -> None:
    """Raise unless a ``block_k``-token tile never straddles a page boundary (see the module docstring).

    That is ``page_bytes % (block_k * token_bytes) == 0``: ``block_k`` divides a whole number of
    tokens per page. ``entries`` as in ``tokens_per_page``.
    """
    if isinstance(entries, bool) or not isinstance(entries, int) or entries < 1:
        raise ValueError(f"entries (per token) must be an int >= 1, got {entries!r}")
    token_bytes = entries * kv_heads * head_dim * jnp.dtype(dtype).itemsize
    if page_bytes % (block_k * token_bytes):
        tpp = page_bytes / token_bytes
        raise ValueError(
            f"block_k={block_k} does not divide the {tpp:g} tokens per page "
            f"(page_bytes={page_bytes}, {entries} entries of Hkv={kv_heads} x D={head_dim} "
            f"{jnp.dtype(dtype).name} per token = {token_bytes} bytes); "
            "a KV tile could straddle into an unmapped page"
        )


def default_block_k(head_dim: int, seq_len: int | None = None, tokens_per_page: int | None = None) -> int:
    """64 tokens for D=128 (32 KiB of K+V per bf16 tile pair), 128 for D=64; halved (down to 16) until it
    divides the slot length ``S`` and ``tokens_per_page`` when they are given (module docstring)."""
    block_k = 64 if head_dim == 128 else 128
    while block_k > 16 and any(n and n % block_k for n in (seq_len, tokens_per_page)):
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


def check_entry(name: str, entry, entries: int) -> int:
    """A static entry index in ``[0, entries)`` (a Python or numpy int, not a bool or an array)."""
    if isinstance(entry, (bool, np.bool_)) or not isinstance(entry, (int, np.integer)) or not 0 <= entry < entries:
        layout = "a rank-4 cache has one entry per token" if entries == 1 else f"the cache has E={entries}"
        raise ValueError(f"{name} must be a static int in [0, {entries}) ({layout}), got {entry!r}")
    return int(entry)


def check_layout(k_cache, v_cache, k_entry=0, v_entry=0) -> int:
    """Entries per token ``E`` of a K/V cache pair (module docstring): rank 4 ``[MB, S, Hkv, D]`` (E = 1),
    rank 5 ``[MB, S, E, Hkv, D]`` or rank 6 ``[MB, S, g, 2, Hkv, D]`` (E = 2g), the same shape for K and V (they
    may be the same array), and ``k_entry``/``v_entry`` static ints in ``[0, E)``. Shapes only: dtypes are the
    callers' business."""
    k_shape, v_shape = tuple(k_cache.shape), tuple(v_cache.shape)
    if len(k_shape) not in (4, 5, 6) or k_shape != v_shape:
        raise ValueError("k_cache and v_cache must each be [MB, S, Hkv, D], [MB, S, E, Hkv, D] or "
                         f"[MB, S, g, 2, Hkv, D], the same shape for both; got {k_shape} and {v_shape}")
    entries = math.prod(k_shape[2:-2])
    check_entry("k_entry", k_entry, entries)
    check_entry("v_entry", v_entry, entries)
    return entries


def check_cache(k_cache, v_cache, *, kernel: bool = True, k_entry=0, v_entry=0):
    """``(MB, S, Hkv, D)`` of a K/V cache pair of any layout (``check_layout``).
    The kernels need bf16/fp16 and head_dim 64/128; the references (``kernel=False``) take
    any float dtype (e.g. the CPU's fp32 caches) and head_dim."""
    check_layout(k_cache, v_cache, k_entry, v_entry)
    dtypes = [jnp.dtype(d) for d in (SUPPORTED_DTYPES if kernel else (*SUPPORTED_DTYPES, jnp.float32))]
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in dtypes:
        raise ValueError(f"cache dtype must be one of {[d.name for d in dtypes]} (same for K and V), got "
                         f"{k_cache.dtype}, {v_cache.dtype}" + ("; the jnp references also take float32" if kernel
                                                                 else ""))
    shape = tuple(k_cache.shape)
    mb, s, hkv, d = shape[0], shape[1], shape[-2], shape[-1]
    if kernel and d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    return mb, s, hkv, d


def kv_index(cache, slot, tokens, entry: int, *rest, traced: bool = False) -> tuple:
    """The index of ``entry``'s rows in a cache (or ref) of any layout: ``(slot, tokens, *rest)`` for rank 4,
    ``(slot, tokens, entry, *rest)`` for rank 5, ``(slot, tokens, entry // 2, entry % 2, *rest)`` for rank 6
    (``entry`` unravelled over the entry axes ``shape[2:-2]``). ``traced``: the entry indices as int32 scalars
    (the interpreter's masked-load rule rejects Python ints in an index)."""
    shape = tuple(cache.shape)
    ent: tuple = tuple(int(i) for i in np.unravel_index(entry, shape[2:-2])) if len(shape) > 4 else ()
    if traced:
        ent = tuple(jnp.int32(i) for i in ent)
    return (slot, tokens, *ent, *rest)


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


def load_kv_tile(ref, slot, pos0, entry: int, kv_head, row_ok, masked: bool):
    """Load the ``[block_k, D]`` tile ``ref[slot, pos0:pos0+block_k, entry, kv_head, :]`` (any layout: ``kv_index``).

    Rows are ``E * Hkv * D`` elements apart (the token stride); only this entry's and
    head's ``D`` elements of each row are read, never another layer's entries.
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

        idx = kv_index(ref, slot, pl.ds(pos0, bk), entry, kv_head, slice(None), traced=True)
        return pl_triton.load(ref.at[idx], mask=tile_ok, other=0.0)
    tile = ref[kv_index(ref, slot, pl.ds(pos0, bk), entry, kv_head, slice(None))]
    return jnp.where(tile_ok, tile, jnp.zeros_like(tile))


def check_packed_rows(num_tokens: int, offsets, lengths) -> None:
    """Refuse packed rows ``[offsets[p], offsets[p] + lengths[p])`` that leave ``[0, N)`` or overlap (concrete
    arrays only, as ``check_row_values``; rows of length 0 are ignored)."""
    if any(isinstance(x, jax.core.Tracer) for x in (offsets, lengths)):
        return
    o, n = np.asarray(offsets).astype(np.int64), np.asarray(lengths).astype(np.int64)
    real = n > 0
    if real.any() and (o[real].min() < 0 or (o + n)[real].max() > num_tokens):
        raise ValueError(f"packed rows must lie in the {num_tokens} tokens of q: offsets {o.tolist()}, "
                         f"q_lens {n.tolist()}")
    order = np.argsort(o[real], kind="stable")
    starts, ends = o[real][order], (o + n)[real][order]
    if (starts[1:] < ends[:-1]).any():
        raise ValueError(f"packed rows overlap: offsets {o.tolist()}, q_lens {n.tolist()}")
