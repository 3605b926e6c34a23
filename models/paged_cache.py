"""PagedAttention baseline: a vLLM-style block-table KV cache on JAX's Pallas ``paged_attention``.

Each layer's K and V live in one pool of fixed-size pages ``[Hkv, total_pages + 1, page_size, D]``
(head-major: the layout ``jax.experimental.pallas.ops.gpu.paged_attention`` wants); a request
owns a *block table* row listing its pages in token order. This is what a framework without
virtual memory does to avoid ``max_batch x max_seq`` preallocation, and it is the baseline
the serving engine compares vAttention against at the same memory budget:

* ``PagedKVPool`` (host): slots, a shuffled free list of pages, block tables, accounting.
* ``PagedKVCache`` (jit side): the model's cache interface (``write``, ``attention``,
  ``state``, ``with_state``) over the page buffers plus the rows' block tables.

What the baseline pays for the indirection: decode goes through JAX's paged kernel (a gather
per page block); a prefill chunk has no paged kernel in JAX (vLLM uses a paged FlashAttention
prefill), so it first gathers each row's pages into a contiguous copy of the prefix.

The last page (index ``total_pages``) is a scratch page: unused block-table entries point at
it, so no kernel ever indexes out of range, and writes never target it (it stays zero).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jax_vattention import attention as vattn
from jax_vattention.cache import CacheRows
from jax_vattention.errors import CacheClosedError, CacheValueError, PoolExhaustedError

from .attention import AttentionSpec, decode_attention_reference, default_platform, prefill_attention_reference


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedCacheState:
    """Per-row state (every leaf has B rows, so ``jax.tree.map(lambda a: a[r0:r1], state)`` selects rows)."""

    slots: jax.Array  # [B] int32, request slot of each row, -1 for padding rows
    lengths: jax.Array  # [B] int32, tokens in the cache, including the pending ones
    num_new: jax.Array  # [B] int32, pending tokens each layer's write stores
    block_tables: jax.Array  # [B, pages_per_seq] int32, page of each token block (scratch page if unused)


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
    def page_size(self) -> int:
        return self.k[0].shape[2]

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, PagedKVCache]:
        """Store each row's first ``num_new`` tokens of ``k_new/v_new [B, T, Hkv, D]`` through its block table.

        Row b's token t goes to position ``lengths[b] - num_new[b] + t``. Padding tokens,
        padding rows (slot -1) and positions whose table entry is the scratch page are
        dropped by the scatter. Returns ``(lengths [B], new cache)``.
        """
        s = self.state
        kp = self.k[layer]
        _, npages, page, _ = kp.shape  # npages includes the scratch page
        pps = s.block_tables.shape[1]
        t = jnp.arange(k_new.shape[1], dtype=jnp.int32)
        pos = (s.lengths - s.num_new)[:, None] + t[None, :]  # [B, T]
        ok = (t[None, :] < s.num_new[:, None]) & (s.slots[:, None] >= 0) & (pos >= 0) & (pos < pps * page)
        col = jnp.clip(pos // page, 0, pps - 1)
        pg = jnp.take_along_axis(s.block_tables, col, axis=1)  # [B, T]
        pg = jnp.where(ok & (pg >= 0) & (pg < npages - 1), pg, npages)  # out of range: dropped
        off = pos % page  # [B, T]

        def put(buf, new):  # buf [Hkv, P+1, page, D]; new [B, T, Hkv, D] -> indexed as [Hkv, B, T, D]
            return buf.at[:, pg, off].set(new.astype(buf.dtype).transpose(2, 0, 1, 3), mode="drop")

        ks = self.k[:layer] + (put(kp, k_new),) + self.k[layer + 1:]
        vs = self.v[:layer] + (put(self.v[layer], v_new),) + self.v[layer + 1:]
        return s.lengths, dataclasses.replace(self, k=ks, v=vs)

    def attention(self, layer: int, q: jax.Array, lengths: jax.Array, num_new: jax.Array,
                  spec: AttentionSpec) -> jax.Array:
        """Attention of the pending tokens ``q [B, T, Hq, D]`` after their write; ``[B, T, Hq, D]`` in q's dtype.

        Same contract as ``models.attention.cache_attention``: row b's queries are the
        tokens at ``[lengths - num_new, lengths)``, causal over the row's cache, scale
        ``1/sqrt(D)``; padding queries (and rows of length 0) give 0.
        """
        kp, vp = self.k[layer], self.v[layer]
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
            return vattn.chunked_prefill_attention(q, kc, vc, jnp.where(live, rows, -1), starts, num_new,
                                                   max_len=window, interpret=spec.interpret, block_k=block_k)
        if t == 1:  # rows of length 0 would give NaN (softmax over nothing): masked to 0
            o = decode_attention_reference(q[:, 0], kc, vc, rows, lengths, window=window)[:, None]
            ok = live & (lengths > 0)
        else:
            o = prefill_attention_reference(q, kc, vc, rows, starts, num_new, window=window)
            ok = live
        return jnp.where(ok[:, None, None, None], o, jnp.zeros((), o.dtype))

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


class PagedKVPool:
    """Host side of the paged cache: slots, a shuffled page free list, block tables, device buffers.

    A "page" (the unit of ``pages_needed``/``pages_total``/``pages_live``) is ``page_size``
    tokens of one request in every layer's K and V. ``pool_bytes`` is the K+V budget over
    all layers (default: every slot at ``max_seq``). Pages are handed out from a free list
    shuffled with ``seed``, so block tables are fragmented as in a long-running server.
    """

    donate = True  # the engine's step donates the cache and hands the new buffers to adopt()

    def __init__(self, *, num_layers: int, max_batch: int, max_seq: int, kv_heads: int, head_dim: int, dtype,
                 page_size: int = 16, pool_bytes: int | None = None, seed: int = 0, device=None):
        for name, x in (("num_layers", num_layers), ("max_batch", max_batch), ("max_seq", max_seq),
                        ("kv_heads", kv_heads), ("head_dim", head_dim), ("page_size", page_size)):
            if not isinstance(x, (int, np.integer)) or x < 1:
                raise CacheValueError(f"{name} must be a positive int, got {x!r}")
        self.max_batch, self.page_size = int(max_batch), int(page_size)
        self.pages_per_seq = -(-int(max_seq) // self.page_size)
        self.max_seq = self.pages_per_seq * self.page_size  # whole pages
        self.page_bytes = 2 * num_layers * self.page_size * kv_heads * head_dim * jnp.dtype(dtype).itemsize
        total = self.max_batch * self.pages_per_seq if pool_bytes is None else int(pool_bytes) // self.page_bytes
        if total < 1:
            raise PoolExhaustedError(f"pool_bytes={pool_bytes} holds no page ({self.page_bytes} bytes each)")
        self._total = total
        self._free = [int(p) for p in np.random.default_rng(seed).permutation(total)]  # pop() from the end
        self._tables = np.full((self.max_batch, self.pages_per_seq), total, np.int32)  # [MB, pps], scratch = total
        self._held = np.full(self.max_batch, -1, np.int64)  # pages per slot, -1: free slot
        shape = (kv_heads, total + 1, self.page_size, head_dim)  # + the scratch page
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype))  # one buffer per tensor, not a shared constant
        with jax.default_device(device) if device is not None else contextlib.nullcontext():
            self._k = tuple(zeros() for _ in range(num_layers))
            self._v = tuple(zeros() for _ in range(num_layers))
        self._physical = sum(x.nbytes for x in (*self._k, *self._v))

    # -- slots -------------------------------------------------------------------
    def _open(self) -> None:
        if self._k is None:
            raise CacheClosedError("the paged KV pool is closed")

    def _slot(self, slot) -> int:
        self._open()
        if not (isinstance(slot, (int, np.integer)) and 0 <= slot < self.max_batch and self._held[slot] >= 0):
            raise CacheValueError(f"slot {slot!r} is not an allocated slot of this paged pool "
                                  f"(max_batch={self.max_batch})")
        return int(slot)

    def allocated(self, slot) -> bool:
        self._open()
        return isinstance(slot, (int, np.integer)) and 0 <= slot < self.max_batch and bool(self._held[slot] >= 0)

    def allocate(self, min_tokens: int = 0) -> int:
        """The lowest free slot, backed for ``min_tokens`` (all-or-nothing: on failure it stays free)."""
        self._open()
        free = np.flatnonzero(self._held < 0)
        if not len(free):
            raise PoolExhaustedError(f"all {self.max_batch} slots of the paged pool are in use")
        slot = int(free[0])
        self._held[slot] = 0
        try:
            self.grow(slot, min_tokens)
        except BaseException:
            self._held[slot] = -1
            raise
        return slot

    def grow(self, slot: int, tokens: int) -> None:
        """Back ``tokens`` tokens of ``slot`` (never shrinks); raises ``PoolExhaustedError`` and changes nothing."""
        slot = self._slot(slot)
        if not isinstance(tokens, (int, np.integer)) or not 0 <= tokens <= self.max_seq:
            raise CacheValueError(f"tokens={tokens!r} is outside [0, max_seq={self.max_seq}]")
        held = int(self._held[slot])
        need = self.pages_needed(tokens) - held
        if need <= 0:
            return
        if need > len(self._free):
            raise PoolExhaustedError(f"grow(slot {slot}, {tokens} tokens): needs {need} more pages of "
                                     f"{self.page_size} tokens, {len(self._free)} of {self._total} free")
        self._tables[slot, held:held + need] = [self._free.pop() for _ in range(need)]
        self._held[slot] = held + need

    def free(self, slot: int) -> None:
        """Release ``slot``; its pages return to the free list at once."""
        slot = self._slot(slot)
        held = int(self._held[slot])
        self._free.extend(int(p) for p in self._tables[slot, :held][::-1])
        self._tables[slot] = self._total
        self._held[slot] = -1

    def capacity(self, slot: int) -> int:
        return int(self._held[self._slot(slot)]) * self.page_size

    # -- accounting ----------------------------------------------------------------
    def pages_needed(self, tokens: int) -> int:
        return -(-int(tokens) // self.page_size)

    def pages_total(self) -> int:
        return self._total

    def pages_live(self) -> int:
        return int(self._held[self._held > 0].sum())

    def memory(self) -> tuple[int, int]:
        """Bytes of the live pages, and device bytes of all K/V page buffers (fixed, scratch page included)."""
        return self.pages_live() * self.page_bytes, self._physical

    # -- jit side --------------------------------------------------------------------
    def cache(self, slots, starts, counts) -> PagedKVCache:
        """This step's rows: row b has ``starts[b]`` cached tokens and ``counts[b]`` pending ones.

        Checked on the host: every real row's ``starts + counts`` is backed (``capacity``),
        so a write never lands outside the row's pages. Slot -1 rows read the scratch page.
        """
        self._open()
        slots, starts, counts = (np.asarray(x, np.int64).reshape(-1) for x in (slots, starts, counts))
        if not (slots.shape == starts.shape == counts.shape):
            raise CacheValueError(f"slots/starts/counts must have one length, got {slots.shape}, "
                                  f"{starts.shape}, {counts.shape}")
        if (starts < 0).any() or (counts < 0).any():
            raise CacheValueError("starts and counts must be >= 0")
        ends = starts + counts  # [B]
        for s, end in zip(slots.tolist(), ends.tolist()):
            if s < -1:
                raise CacheValueError(f"slot {s} is invalid (use -1 for padding rows)")
            if s >= 0 and end > self.capacity(s):
                raise CacheValueError(f"slot {s}: {end} tokens exceed its backed capacity "
                                      f"{self.capacity(s)} (grow it first)")
        tables = np.where((slots >= 0)[:, None], self._tables[np.maximum(slots, 0)], self._total)
        state = PagedCacheState(slots.astype(np.int32), ends.astype(np.int32), counts.astype(np.int32),
                                tables.astype(np.int32))
        return PagedKVCache(self._k, self._v, state)

    def adopt(self, cache: PagedKVCache) -> None:
        """Keep the buffers a donated step returned (the old ones were consumed)."""
        self._open()
        self._k, self._v = tuple(cache.k), tuple(cache.v)

    def check_errors(self) -> None:
        """Nothing to check: ``cache()`` refuses rows past capacity on the host and the scatter drops the rest."""

    def close(self) -> None:
        for x in (*(self._k or ()), *(self._v or ())):
            if not x.is_deleted():
                x.delete()
        self._k = self._v = None

    def __enter__(self) -> PagedKVPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
