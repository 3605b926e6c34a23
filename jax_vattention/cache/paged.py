"""PagedAttention baseline: a vLLM-style block-table KV cache on JAX's Pallas ``paged_attention``.

Each layer's K and V live in one pool of fixed-size pages ``[Hkv, total_pages + 1, page_size, D]``
(head-major: the layout ``jax.experimental.pallas.ops.gpu.paged_attention`` wants); a request
owns a *block table* row listing its pages in token order. This is what a framework without
virtual memory does to avoid ``max_batch x max_seq`` preallocation, and it is the baseline
the serving engine compares vAttention against at the same memory budget:

* ``PagedKVPool`` (host, ``paged_pool.py``): slots, a shuffled free list of pages, block tables, accounting.
* ``PagedKVCache`` (jit side): the cache protocol (``cache.protocol``) over the page
  buffers plus the rows' block tables.

What the baseline pays for the indirection: decode goes through JAX's paged kernel (a gather
per page block); a prefill chunk has no paged kernel in JAX (vLLM uses a paged FlashAttention
prefill), so it first gathers each row's pages into a contiguous copy of the prefix.

The last page (index ``total_pages``) is a scratch page: unused block-table entries point at
it, so no kernel ever indexes out of range, and writes never target it (it stays zero).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from ..attention.dispatch import (
    AttentionSpec,
    decode_attention_reference,
    default_platform,
    packed_prefill,
    prefill_attention_reference,
)
from ..attention.prefill import chunked_prefill_attention
from ..packing import PackedRows
from .protocol import CacheRows


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedCacheState:
    """Per-row state (every leaf has B rows, so ``jax.tree.map(lambda a: a[r0:r1], state)`` selects rows)."""

    slots: jax.Array | np.ndarray  # [B] int32, request slot of each row, -1 for padding rows
    lengths: jax.Array | np.ndarray  # [B] int32, tokens in the cache, including the pending ones
    num_new: jax.Array | np.ndarray  # [B] int32, pending tokens each layer's write stores
    block_tables: jax.Array | np.ndarray  # [B, pages_per_seq] int32, page of each token block (scratch page if unused)


def decode_blocking(pages_per_seq: int, page_size: int) -> tuple[int, int, int]:
    """``(pages_per_compute_block, k_splits, table_columns)`` for ``paged_attention``.

    The settings of ``benchmarks/bench_attention.py``: 128-token compute blocks and
    ``k_splits = gcd(16, pages_per_seq)``. The kernel needs each split's page count to be a
    multiple of the compute block (or smaller than it); when it is not, the table is padded
    with scratch entries, which cost nothing (the kernel stops at each row's length).
    """
    ppcb = max(1, 128 // page_size)
    k_splits = math.gcd(16, pages_per_seq)
    per_split = pages_per_seq // k_splits
    if per_split <= ppcb or per_split % ppcb == 0:
        return ppcb, k_splits, pages_per_seq
    return ppcb, k_splits, _round_up(pages_per_seq, k_splits * ppcb)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache(CacheRows):
    """The model's cache interface over paged K/V; writes are functional scatters (new buffers).

    Under a top-level jit that donates the cache, XLA performs the scatters in place.
    """

    k: tuple[jax.Array, ...]  # L x [Hkv, total_pages + 1, page_size, D]
    v: tuple[jax.Array, ...]  # L x [Hkv, total_pages + 1, page_size, D]
    state: PagedCacheState

    @property
    def dtype(self) -> jnp.dtype:
        return self.k[0].dtype

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    def grow(self, new_lengths: jax.Array) -> PagedKVCache:
        """Make tokens up to ``new_lengths [B]`` pending. Pages come from the host pool (``PagedKVPool.grow``):
        a write past a row's block table lands on the scratch page and is dropped."""
        new_lengths = jnp.asarray(new_lengths, jnp.int32)
        return self.with_state(dataclasses.replace(self.state, lengths=new_lengths,
                                                   num_new=new_lengths - self.state.lengths))

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, PagedKVCache]:
        """Store each row's first ``num_new`` tokens of ``k_new/v_new [B, T, Hkv, D]`` through its block table.

        Row b's token t goes to position ``lengths[b] - num_new[b] + t``. Padding tokens,
        padding rows (slot -1) and positions whose table entry is the scratch page are
        dropped by the scatter. Returns ``(lengths [B], new cache)``.
        """
        s = self.state
        t = jnp.arange(k_new.shape[1], dtype=jnp.int32)
        pos = (s.lengths - s.num_new)[:, None] + t[None, :]  # [B, T]
        ok = (t[None, :] < s.num_new[:, None]) & (s.slots[:, None] >= 0)
        rows = jnp.broadcast_to(jnp.arange(pos.shape[0], dtype=jnp.int32)[:, None], pos.shape)
        return self.lengths, self._scatter(layer, jnp.where(ok, rows, -1), pos, k_new, v_new)

    def write_packed(self, layer: int, k_new: jax.Array, v_new: jax.Array, rows: PackedRows
                     ) -> tuple[jax.Array, PagedKVCache]:
        """``write`` for a packed step: ``k_new/v_new [N, Hkv, D]`` laid out as ``rows``."""
        slot_t, pos = rows.token_coords(self.slots, self.lengths - self.state.num_new)  # [N] each; slot -1: none
        return self.lengths, self._scatter(layer, jnp.where(slot_t >= 0, rows.token_rows, -1), pos, k_new, v_new)

    def _scatter(self, layer: int, rows, pos, k_new, v_new) -> PagedKVCache:
        """Store ``k_new/v_new [..., Hkv, D]`` at position ``pos`` of row ``rows`` (same leading shape) through
        the block table; rows < 0, positions past the table and scratch-page entries are dropped."""
        kp = self.k[layer]
        _, npages, page, _ = kp.shape  # npages includes the scratch page
        bt = self.state.block_tables
        pps = bt.shape[1]
        ok = (rows >= 0) & (pos >= 0) & (pos < pps * page)
        pg = bt[jnp.maximum(rows, 0), jnp.clip(pos // page, 0, pps - 1)]
        pg = jnp.where(ok & (pg >= 0) & (pg < npages - 1), pg, npages)  # out of range: dropped
        off = pos % page

        def put(buf, new):  # buf [Hkv, P+1, page, D]; new [..., Hkv, D] -> indexed as [Hkv, ..., D]
            return buf.at[:, pg, off].set(jnp.moveaxis(new.astype(buf.dtype), -2, 0), mode="drop")

        ks = self.k[:layer] + (put(kp, k_new),) + self.k[layer + 1:]
        vs = self.v[:layer] + (put(self.v[layer], v_new),) + self.v[layer + 1:]
        return dataclasses.replace(self, k=ks, v=vs)

    def attention(self, layer: int, q: jax.Array, lengths: jax.Array, spec: AttentionSpec) -> jax.Array:
        """Attention of the pending tokens ``q [B, T, Hq, D]`` after their write; ``[B, T, Hq, D]`` in q's dtype.

        Same contract as ``attention.dispatch.cache_attention``: row b's queries are the
        tokens at ``[lengths - num_new, lengths)``, causal over the row's cache, scale
        ``1/sqrt(D)``; padding queries (and rows of length 0) give 0.
        """
        kp, vp = self.k[layer], self.v[layer]
        num_new = self.num_new
        spec = spec.resolve(kp.dtype, q.shape[-1], default_platform())  # "auto" -> kernel/reference; validates
        b, t = q.shape[:2]
        live = self.slots >= 0
        if t == 1 and spec.impl == "kernel":
            return self._paged_decode(kp, vp, q, jnp.where(live, lengths, 0), spec.interpret)
        # No paged prefill kernel in JAX: copy each row's prefix out of its pages (the baseline's cost).
        page, pps = self.page_size, self.state.block_tables.shape[1]
        window = _round_up(min(spec.max_len or pps * page, pps * page), math.lcm(page, 16))
        kc, vc = self._gather(kp, lengths, window), self._gather(vp, lengths, window)  # [B, W, Hkv, D]
        rows = jnp.arange(b, dtype=jnp.int32)
        starts = lengths - num_new
        if spec.impl == "kernel":
            block_k = spec.block_k if spec.block_k and window % spec.block_k == 0 else None
            return chunked_prefill_attention(q, kc, vc, jnp.where(live, rows, -1), starts, num_new,
                                                   max_len=window, interpret=spec.interpret, block_k=block_k)
        if t == 1:  # rows of length 0 would give NaN (softmax over nothing): masked to 0
            o = decode_attention_reference(q[:, 0], kc, vc, rows, lengths, window=window)[:, None]
            ok = live & (lengths > 0)
        else:
            o = prefill_attention_reference(q, kc, vc, rows, starts, num_new, window=window)
            ok = live
        return jnp.where(ok[:, None, None, None], o, jnp.zeros((), o.dtype))

    def attention_packed(self, layer: int, q: jax.Array, lengths: jax.Array, rows: PackedRows,
                         spec: AttentionSpec) -> jax.Array:
        """``attention`` for a packed step: ``q [N, Hq, D]`` laid out as ``rows``; ``[N, Hq, D]``.

        One-token rows through ``paged_attention`` (the kernel) or the reference; the prefill rows, as in
        ``attention``, over a contiguous copy of their prefixes (``[P, W, Hkv, D]``), through the varlen kernel.
        """
        kp, vp = self.k[layer], self.v[layer]
        num_new = self.num_new
        spec = spec.resolve(kp.dtype, q.shape[-1], default_platform())
        page, pps = self.page_size, self.state.block_tables.shape[1]
        window = _round_up(min(spec.max_len or pps * page, pps * page), math.lcm(page, 16))
        q_dec, is_dec = rows.decode_queries(q, num_new)  # [R, Hq, D]
        live = self.slots >= 0
        if spec.impl == "kernel":
            o_dec = self._paged_decode(kp, vp, q_dec[:, None], jnp.where(live & is_dec, lengths, 0),
                                       spec.interpret)[:, 0]
        else:
            kc, vc = self._gather(kp, lengths, window), self._gather(vp, lengths, window)  # [R, W, Hkv, D]
            o_dec = decode_attention_reference(q_dec, kc, vc, jnp.arange(q_dec.shape[0], dtype=jnp.int32), lengths,
                                               window=window)
        prefill = jnp.maximum(rows.prefill_rows, 0)  # [P]
        sub = self.with_state(jax.tree.map(lambda a: a[prefill], self.state))  # the prefill rows' block tables
        kc, vc = sub._gather(kp, lengths[prefill], window), sub._gather(vp, lengths[prefill], window)  # [P, W, ...]
        _, starts, q_lens, offsets = rows.prefill_coords(self.slots, lengths - num_new, num_new)
        ids = jnp.arange(prefill.shape[0], dtype=jnp.int32)
        if spec.impl == "kernel" and not (spec.block_k and window % spec.block_k == 0):
            spec = dataclasses.replace(spec, block_k=None)
        o_pre = packed_prefill(q, kc, vc, ids, starts, q_lens, offsets, spec.with_max_len(window),
                               max_row_tokens=rows.max_row_tokens, window=window)
        return rows.merge(o_pre, o_dec, is_dec)

    def _gather(self, pages: jax.Array, lengths: jax.Array, window: int) -> jax.Array:
        """``[Hkv, P+1, page, D]`` -> contiguous ``[B, W, Hkv, D]`` of each row's first W tokens.

        A per-call copy of every row's prefix. Block-table columns past a row's length are
        clamped to its last page, so only pages the row holds (below its length) are read.
        """
        bt = self.state.block_tables  # [B, pps]
        hkv, _, page, d = pages.shape
        n = window // page
        last = jnp.minimum(jnp.maximum(-(-lengths // page), 1), bt.shape[1]) - 1  # [B]
        col = jnp.minimum(jnp.arange(n, dtype=jnp.int32)[None, :], last[:, None])  # [B, n]
        idx = jnp.take_along_axis(bt, col, axis=1)  # [B, n]
        g = pages[:, idx]  # [Hkv, B, n, page, D]
        return g.transpose(1, 2, 3, 0, 4).reshape(bt.shape[0], n * page, hkv, d)

    def _paged_decode(self, kp, vp, q, lengths, interpret: bool) -> jax.Array:
        """One query per row through JAX's Pallas ``paged_attention``; q ``[B, 1, Hq, D]``."""
        with warnings.catch_warnings():  # the module warns that it is deprecated (jax 0.11)
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
        page, d = kp.shape[2], kp.shape[3]
        bt = self.state.block_tables  # [B, pps]
        ppcb, k_splits, cols = decode_blocking(bt.shape[1], page)
        bt = jnp.pad(bt, ((0, 0), (0, cols - bt.shape[1])), constant_values=kp.shape[1] - 1)  # scratch
        lengths = jnp.clip(lengths, 0, bt.shape[1] * page).astype(jnp.int32)
        qs = (q[:, 0].astype(jnp.float32) * (1.0 / math.sqrt(d))).astype(kp.dtype)  # the kernel applies no scale
        o = paged_attention(qs, kp, vp, bt, lengths, pages_per_compute_block=ppcb, k_splits=k_splits,
                            interpret=interpret)  # [B, Hq, D]
        return jnp.where((lengths > 0)[:, None, None], o, jnp.zeros((), o.dtype)).astype(q.dtype)[:, None]
