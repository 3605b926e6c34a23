"""The pools of the vAttention cache and the static baseline (the paged one is in ``paged_pool.py``).

A pool implements ``protocol.KVPool``: the host side the scheduler talks to
(slots, pages, accounting) plus the factory of one step's jit-side cache:

* ``VAttentionPool``: a ``KVCacheManager`` (virtual ranges; pages mapped as
  contexts grow). Its steps read the views in place (nothing donated).
* ``StaticPool``: ``max_batch x max_seq`` XLA buffers, the classic
  preallocated cache; a slot is a whole ``max_seq`` row, so at a fixed budget
  it holds ``budget / (max_seq x bytes per token)`` requests.
* ``PagedKVPool`` (``paged_pool.py``): vLLM-style block tables with JAX's Pallas
  ``paged_attention``.

Running out of pages and memory-API faults come back as ``GrowResult`` values.
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np

from ..errors import BackendError, CacheClosedError, CacheValueError, PoolExhaustedError
from ..manager import KVCacheManager
from ..sharded_manager import ShardedKVCacheManager
from .protocol import GROWN, Allocation, GrowResult
from .static import StaticKVCache
from .vattention import CacheState, KVCache


class VAttentionPool:
    """The engine's view of a ``KVCacheManager`` (or a ``ShardedKVCacheManager``: one per device, one decision).

    ``deferred_reclaim=False`` unmaps a finished request's pages at once (the
    ablation of vAttention's deferred reclamation); otherwise they stay mapped
    in the free slot and best-fit admission reuses them.
    """

    def __init__(self, manager: KVCacheManager | ShardedKVCacheManager, *, deferred_reclaim: bool = True):
        self.manager = manager
        self.deferred_reclaim = deferred_reclaim
        c = manager.config
        self.max_batch, self.max_seq = c.max_batch, manager.max_seq
        self._tensors = c.num_tensors
        # Tokens backed per live slot. A live slot's pages are never taken away
        # (pressure and trim reclaim free slots only), so a grow within the
        # known capacity needs no native call: the engine grows every row
        # every step, and most of those grows map nothing.
        self._capacity: dict[int, int] = {}

    def allocate(self, min_tokens: int = 0) -> Allocation:
        try:
            slot = self.manager.allocate(min_tokens)
        except PoolExhaustedError as e:
            return Allocation(None, GrowResult.out_of_pages(str(e)))
        except BackendError as e:
            return Allocation(None, GrowResult.backend_fault(str(e)))
        self._capacity[slot] = self.manager.capacity(slot)
        return Allocation(slot, GROWN)

    def grow(self, slot: int, tokens: int) -> GrowResult:
        if slot in self._capacity and 0 <= tokens <= self._capacity[slot]:
            if self.manager.closed:
                raise CacheClosedError("the cache manager is closed")
            return GROWN
        return self._backing(slot, self.manager.grow, slot, tokens)

    def _backing(self, slot: int, call, *args) -> GrowResult:
        """``call(*args)`` (a grow or a shared mapping of ``slot``) as a typed result; the slot's known capacity
        follows it."""
        try:
            call(*args)
        except PoolExhaustedError as e:
            result = GrowResult.out_of_pages(str(e))
        except BackendError as e:
            result = GrowResult.backend_fault(str(e))
        else:
            result = GROWN
        self._capacity[slot] = self.manager.capacity(slot)  # a failed shared mapping may leave the slot with less
        return result

    def free(self, slot: int) -> None:
        self.manager.free(slot)
        self._capacity.pop(slot, None)
        if not self.deferred_reclaim:
            self.manager.trim()  # unmap the free slots' pages now (they return to the handle pool)

    def capacity(self, slot: int) -> int:
        return self.manager.capacity(slot)

    def pages_needed(self, tokens: int) -> int:
        c = self.manager.config
        return math.ceil(tokens * c.token_bytes / c.page_bytes) * self._tensors

    def pages_total(self) -> int:
        return self.manager.stats().pages_budget

    def pages_live(self) -> int:
        return self.manager.stats().pages_live  # distinct: a prefix page shared by n live slots counts once

    def memory(self) -> tuple[int, int]:
        """Bytes mapped into live slots (as the paged pool counts its blocks in use), and device bytes held by
        pages: live, kept by free slots for reuse (deferred reclamation) and spare handles."""
        s = self.manager.stats()
        return s.pages_live * s.page_bytes, s.physical_bytes

    # -- prefix caching: pages shared between slots (the manager's pins and shared mappings) --------------------
    @property
    def tokens_per_page(self) -> int:
        """Tokens of a slot one page index holds in every tensor: the sharing granularity."""
        return self.manager.tokens_per_page

    def pin_prefix(self, slot: int, n_pages: int) -> tuple[int, ...]:
        """Pin the physical pages of ``slot``'s first ``n_pages`` page indices (``[page][tensor]`` handles)."""
        return tuple(self.manager.pin_pages(slot, n_pages))

    def unpin(self, handles) -> None:
        self.manager.unpin_pages(list(handles))

    def map_prefix(self, slot: int, handles) -> GrowResult:
        """Map pinned pages into ``slot``'s first page indices, read-only for it (the manager refuses writes
        there); on a failure nothing is mapped."""
        return self._backing(slot, self.manager.map_shared, slot, list(handles))

    def premap(self) -> None:
        """Map every slot to ``max_seq`` and free it (pages stay): the "all mapped beforehand" control."""
        if not self.deferred_reclaim:
            raise CacheValueError("premap needs deferred reclamation (free would unmap the pages again)")
        slots = [self.manager.allocate(self.max_seq) for _ in range(self.max_batch)]
        for s in slots:
            self.manager.free(s)

    def cache(self, slots, starts, counts) -> KVCache:
        """The step's rows with ``counts`` tokens pending: host arrays, no device work until the jit call."""
        if self.manager.closed:
            raise CacheClosedError("the cache manager is closed")
        return self.manager.step_cache(slots, starts, counts)

    def adopt(self, exported) -> None:
        pass  # the views were written in place; the step returned only the rows' state

    def check_errors(self) -> None:
        """Raise a write the GPU refused (past a slot's backed pages); the steps themselves call no grow."""
        self.manager.check_device_errors()

    def close(self) -> None:
        self.manager.close()


class StaticPool:
    """A preallocated ``[max_batch, max_seq, Hkv, D]`` XLA cache per layer (the static baseline).

    With ``pool_bytes`` the batch is what the budget holds at ``max_seq``
    tokens per slot (at most ``max_batch``). Pages are whole slots.
    """

    def __init__(self, *, num_layers: int, max_batch: int, max_seq: int, kv_heads: int, head_dim: int, dtype,
                 pool_bytes: int | None = None, device=None):
        slot_bytes = 2 * num_layers * max_seq * kv_heads * head_dim * np.dtype(dtype).itemsize
        if pool_bytes is not None:
            max_batch = min(max_batch, pool_bytes // slot_bytes)
            if max_batch < 1:
                raise PoolExhaustedError(
                    f"pool_bytes={pool_bytes} cannot hold one static slot of max_seq={max_seq} ({slot_bytes} bytes)")
        self.max_batch, self.max_seq = int(max_batch), int(max_seq)
        with jax.default_device(device) if device is not None else contextlib.nullcontext():
            self._cache: StaticKVCache | None = StaticKVCache.create(num_layers, self.max_batch, max_seq, kv_heads,
                                                                     head_dim, dtype)
        self._bytes = self._cache.nbytes
        self._length = np.full(self.max_batch, -1, np.int64)  # -1: free

    def _slot(self, slot) -> int:
        if self._cache is None:
            raise CacheClosedError("the static pool is closed")
        if not (isinstance(slot, (int, np.integer)) and 0 <= slot < self.max_batch and self._length[slot] >= 0):
            raise CacheValueError(f"slot {slot!r} is not an allocated slot of this static pool")
        return int(slot)

    def allocate(self, min_tokens: int = 0) -> Allocation:
        if self._cache is None:
            raise CacheClosedError("the static pool is closed")
        free = np.flatnonzero(self._length < 0)
        if not len(free):
            return Allocation(None, GrowResult.out_of_pages(f"all {self.max_batch} static slots are in use"))
        slot = int(free[0])
        self._length[slot] = 0
        try:
            self.grow(slot, min_tokens)
        except BaseException:
            self._length[slot] = -1
            raise
        return Allocation(slot, GROWN)

    def grow(self, slot: int, tokens: int) -> GrowResult:
        slot = self._slot(slot)
        if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or not 0 <= tokens <= self.max_seq:
            raise CacheValueError(f"tokens={tokens!r} is outside [0, max_seq={self.max_seq}]")
        self._length[slot] = max(self._length[slot], tokens)
        return GROWN

    def free(self, slot: int) -> None:
        self._length[self._slot(slot)] = -1

    def capacity(self, slot: int) -> int:
        self._slot(slot)
        return self.max_seq

    def pages_needed(self, tokens: int) -> int:
        return 1

    def pages_total(self) -> int:
        return self.max_batch

    def pages_live(self) -> int:
        return int((self._length >= 0).sum())

    def memory(self) -> tuple[int, int]:
        return self._bytes, self._bytes  # all of it, from construction

    def cache(self, slots, starts, counts) -> StaticKVCache:
        if self._cache is None:
            raise CacheClosedError("the static pool is closed")
        starts, counts = np.asarray(starts, np.int32), np.asarray(counts, np.int32)
        state = CacheState(np.asarray(slots, np.int32), starts + counts, counts)
        return self._cache.with_state(state)

    def adopt(self, exported: StaticKVCache) -> None:
        self._cache = exported  # the step donated the buffers and returned the new ones

    def check_errors(self) -> None:
        pass  # XLA scatters drop out-of-range writes

    def close(self) -> None:
        if self._cache is not None:
            for x in (*self._cache.k, *self._cache.v):
                x.delete()
        self._cache = None

