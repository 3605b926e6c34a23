"""Host side of the paged baseline: slots, a shuffled page free list, block tables, device buffers.

Prefix caching shares blocks as vLLM does: a page has a reference count (one per block-table entry that points
at it, one per pin); ``pin_prefix`` keeps a slot's first pages past its release and ``map_prefix`` points another
slot's first block-table entries at them, read-only there (``cache`` refuses writes into them).
"""

from __future__ import annotations

import contextlib
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import CacheClosedError, CacheValueError, PoolExhaustedError
from .paged import PagedCacheState, PagedKVCache
from .protocol import GROWN, Allocation, GrowResult


class PagedKVPool:
    """Host side of the paged cache: slots, a shuffled page free list, block tables, device buffers.

    A "page" (the unit of ``pages_needed``/``pages_total``/``pages_live``) is ``page_size``
    tokens of one request in every layer's K and V (and the unit prefix caching shares).
    ``pool_bytes`` is the K+V budget over all layers (default: every slot at ``max_seq``).
    Pages are handed out from a free list shuffled with ``seed``, so block tables are
    fragmented as in a long-running server.
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
        self._refs = np.zeros(total, np.int64)  # per page: block-table entries pointing at it + pins
        self._table_refs = np.zeros(total, np.int64)  # per page: block-table entries pointing at it
        self._pins: Counter[int] = Counter()
        self._shared = np.zeros(self.max_batch, np.int64)  # leading pages of a slot mapped by map_prefix
        shape = (kv_heads, total + 1, self.page_size, head_dim)  # + the scratch page
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype))  # one buffer per tensor, not a shared constant
        with jax.default_device(device) if device is not None else contextlib.nullcontext():
            self._k: tuple[jax.Array, ...] | None = tuple(zeros() for _ in range(num_layers))
            self._v: tuple[jax.Array, ...] | None = tuple(zeros() for _ in range(num_layers))
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
        return bool(isinstance(slot, (int, np.integer)) and 0 <= slot < self.max_batch and self._held[slot] >= 0)

    def allocate(self, min_tokens: int = 0) -> Allocation:
        """The lowest free slot, backed for ``min_tokens`` (all-or-nothing: on failure it stays free)."""
        self._open()
        free = np.flatnonzero(self._held < 0)
        if not len(free):
            return Allocation(None, GrowResult.out_of_pages(f"all {self.max_batch} slots of the paged pool are in use"))
        slot = int(free[0])
        self._held[slot] = 0
        result = self.grow(slot, min_tokens)
        if not result.ok:
            self._held[slot] = -1
            return Allocation(None, result)
        return Allocation(slot, result)

    def grow(self, slot: int, tokens: int) -> GrowResult:
        """Back ``tokens`` tokens of ``slot`` (never shrinks); ``EXHAUSTED`` changes nothing."""
        slot = self._slot(slot)
        if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or not 0 <= tokens <= self.max_seq:
            raise CacheValueError(f"tokens={tokens!r} is outside [0, max_seq={self.max_seq}]")
        held = int(self._held[slot])
        need = self.pages_needed(tokens) - held
        if need <= 0:
            return GROWN
        if need > len(self._free):
            return GrowResult.out_of_pages(f"grow(slot {slot}, {tokens} tokens): needs {need} more pages of "
                                           f"{self.page_size} tokens, {len(self._free)} of {self._total} free")
        pages = [self._free.pop() for _ in range(need)]
        self._tables[slot, held:held + need] = pages
        self._refs[pages] = 1
        self._count_live(pages, 1)
        self._held[slot] = held + need
        return GROWN

    def free(self, slot: int) -> None:
        """Release ``slot``; its pages that nothing else references return to the free list at once."""
        slot = self._slot(slot)
        self._unmap(slot)
        self._held[slot] = -1

    def _unmap(self, slot: int) -> None:
        """Empty ``slot``'s block table, dropping its entries' references."""
        pages = self._tables[slot, :int(self._held[slot])][::-1]
        self._count_live(pages, -1)
        self._drop(pages)
        self._tables[slot] = self._total
        self._held[slot] = self._shared[slot] = 0

    def _count_live(self, pages, delta: int) -> None:
        np.add.at(self._table_refs, np.asarray(pages, np.int64), delta)

    def _drop(self, pages) -> None:
        """One reference less on each page; those left with none go back to the free list."""
        for p in (int(x) for x in pages):
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)

    def capacity(self, slot: int) -> int:
        return int(self._held[self._slot(slot)]) * self.page_size

    # -- accounting ----------------------------------------------------------------
    def pages_needed(self, tokens: int) -> int:
        return -(-int(tokens) // self.page_size)

    def pages_total(self) -> int:
        return self._total

    def pages_live(self) -> int:
        """Distinct pages live slots' block tables point at (a shared prefix page counts once)."""
        return int(np.count_nonzero(self._table_refs))

    # -- prefix caching: pages shared between block tables ---------------------------
    @property
    def tokens_per_page(self) -> int:
        return self.page_size

    def pin_prefix(self, slot: int, n_pages: int) -> tuple[int, ...]:
        """Pin the pages behind ``slot``'s first ``n_pages`` block-table entries; their page ids."""
        slot = self._slot(slot)
        if isinstance(n_pages, bool) or not isinstance(n_pages, (int, np.integer)) or not (
                0 <= n_pages <= self._held[slot]):
            raise CacheValueError(f"pin_prefix: n_pages={n_pages!r} is outside [0, {int(self._held[slot])}], the "
                                  f"pages slot {slot} holds")
        pages = tuple(int(p) for p in self._tables[slot, :n_pages])
        np.add.at(self._refs, list(pages), 1)
        self._pins.update(pages)
        return pages

    def unpin(self, handles) -> None:
        """Drop one pin of each page id; refused as a whole if any has fewer pins than it is listed."""
        self._open()
        want = Counter(int(h) for h in handles)
        for h, n in want.items():
            if self._pins[h] < n:
                raise CacheValueError(f"unpin: page {h} is listed {n} times but has {self._pins[h]} pin(s); "
                                      "nothing was unpinned")
        self._pins.subtract(want)
        self._pins = +self._pins  # drop zero counts
        self._drop(want.elements())

    def map_prefix(self, slot: int, handles) -> GrowResult:
        """Point ``slot``'s first block-table entries at the pinned or mapped pages ``handles`` (read-only for the
        slot); the slot's own pages are released first."""
        slot = self._slot(slot)
        pages = [int(h) for h in handles]
        if len(pages) > self.pages_per_seq:
            raise CacheValueError(f"map_prefix: {len(pages)} pages exceed the {self.pages_per_seq} of a slot")
        for i, p in enumerate(pages):
            if not (0 <= p < self._total and self._refs[p] > 0):
                raise CacheValueError(f"map_prefix: handles[{i}] = {p} is not a pinned or mapped page")
        np.add.at(self._refs, pages, 1)  # before the unmap: a page only this slot held must survive it
        self._unmap(slot)
        self._tables[slot, :len(pages)] = pages
        self._count_live(pages, 1)
        self._held[slot] = self._shared[slot] = len(pages)
        return GROWN

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
        for s, start, count, end in zip(slots.tolist(), starts.tolist(), counts.tolist(), ends.tolist()):
            if s < -1:
                raise CacheValueError(f"slot {s} is invalid (use -1 for padding rows)")
            if s >= 0 and end > self.capacity(s):
                raise CacheValueError(f"slot {s}: {end} tokens exceed its backed capacity "
                                      f"{self.capacity(s)} (grow it first)")
            if s >= 0 and count > 0 and start < self._shared[s] * self.page_size:
                raise CacheValueError(f"slot {s}: a write of tokens [{start}, {end}) starts inside its read-only "
                                      f"shared range [0, {int(self._shared[s]) * self.page_size}) (map_prefix)")
        tables = np.where((slots >= 0)[:, None], self._tables[np.maximum(slots, 0)], self._total)
        state = PagedCacheState(slots.astype(np.int32), ends.astype(np.int32), counts.astype(np.int32),
                                tables.astype(np.int32))
        assert self._k is not None and self._v is not None  # self._open() checked
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
