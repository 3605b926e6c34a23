"""The two written protocols every KV memory implements: the jit-side cache and the host-side pool.

``KVCacheLike`` is what a model calls inside jit, the same way for each cache
(vAttention, paged, static): no ``isinstance`` switch anywhere::

    cache = cache.grow(cache.lengths + counts)            # back the new tokens
    lengths, cache = cache.write(layer, k, v)             # k, v: [B, T, Hkv, D]
    o = cache.attention(layer, q, lengths, spec)          # q: [B, T, Hq, D]
    # or, for a packed step (tokens flat, laid out by packing.PackedRows):
    lengths, cache = cache.write_packed(layer, k, v, rows)  # k, v: [N, Hkv, D]
    o = cache.attention_packed(layer, q, lengths, rows, spec)  # q: [N, Hq, D]
    return cache.export()                                 # what a top-level jit may return
    cache = template.restore(exported)                    # outside the jit

``KVPool`` is what the scheduler calls on the host: slots, pages and
accounting, plus the factory of one step's cache. It reports running out of
pages or a memory-API fault as a typed ``GrowResult``, never as an exception,
so the scheduler decides what to do with plain values. Exceptions are left for
bad arguments and misuse (``CacheValueError``, ``CacheClosedError``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import jax

C = TypeVar("C", bound="CacheRows")


class CacheRows:
    """What every cache forwards from its ``state``: the rows it serves, and the export rule.

    Subclasses are frozen dataclasses with a ``state`` field whose leaves are all ``[B, ...]``.
    """

    state: Any
    #: whether a top-level jit should donate the cache (its buffers are XLA's and written functionally)
    donates: ClassVar[bool] = True

    @property
    def slots(self) -> jax.Array:
        return self.state.slots  # [B] int32

    @property
    def lengths(self) -> jax.Array:
        return self.state.lengths  # [B] int32

    @property
    def num_new(self) -> jax.Array:
        return self.state.num_new  # [B] int32, tokens pending a write

    def with_state(self: C, state) -> C:
        """The same buffers with other per-row state (e.g. a ``state`` a jitted step returned)."""
        return dataclasses.replace(self, state=state)  # type: ignore[type-var]

    def select_rows(self: C, r0: int, r1: int) -> C:
        """The same buffers serving rows ``[r0, r1)`` only (every per-row leaf of the state is sliced)."""
        return self.with_state(jax.tree.map(lambda a: a[r0:r1], self.state))

    def export(self) -> Any:
        """What a top-level jit may return: the whole cache (its buffers are XLA's and were donated)."""
        return self

    def restore(self: C, exported) -> C:
        """The cache a jit returned through ``export``, rebuilt around this template."""
        return exported


@runtime_checkable
class KVCacheLike(Protocol):
    """A jit-side KV cache: per-layer K/V buffers plus per-row state."""

    donates: ClassVar[bool]

    @property
    def slots(self) -> jax.Array: ...  # [B] int32

    @property
    def lengths(self) -> jax.Array: ...  # [B] int32

    @property
    def num_new(self) -> jax.Array: ...  # [B] int32

    @property
    def dtype(self) -> Any: ...  # the dtype K/V are stored in (what ``write`` takes)

    def with_state(self, state) -> Any: ...

    def select_rows(self, r0: int, r1: int) -> Any: ...

    def grow(self, new_lengths: jax.Array) -> Any:
        """Back ``new_lengths [B]`` tokens per row; the added tokens become pending writes."""

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, Any]:
        """Store the pending tokens of ``k_new/v_new [B, T, Hkv, D]``; returns ``(lengths [B], cache)``.

        Attention must read with the returned lengths: that data dependency orders it after the write.
        """

    def attention(self, layer: int, q: jax.Array, lengths: jax.Array, spec) -> jax.Array:
        """Attention of the pending tokens ``q [B, T, Hq, D]`` over the cache; ``[B, T, Hq, D]``."""

    def write_packed(self, layer: int, k_new: jax.Array, v_new: jax.Array, rows) -> tuple[jax.Array, Any]:
        """``write`` for a packed step: ``k_new/v_new [N, Hkv, D]`` hold the rows' pending tokens flat, as
        ``rows`` (``packing.PackedRows``) lays them out; returns ``(lengths [B], cache)``."""

    def attention_packed(self, layer: int, q: jax.Array, lengths: jax.Array, rows, spec) -> jax.Array:
        """``attention`` for a packed step: ``q [N, Hq, D]`` laid out as ``rows``; ``[N, Hq, D]``."""

    def export(self) -> Any: ...

    def restore(self, exported) -> Any: ...


@dataclasses.dataclass(frozen=True)
class GrowResult:
    """What backing tokens came to: done, the pool is out of pages, or the memory API failed (``fault``)."""

    ok: bool
    fault: str | None = None  # the backend's message when cuMemCreate / cuMemMap / mmap failed
    reason: str = ""  # what ran out, for messages

    @property
    def exhausted(self) -> bool:
        return not self.ok and self.fault is None

    @classmethod
    def out_of_pages(cls, reason: str) -> GrowResult:
        return cls(False, None, reason)

    @classmethod
    def backend_fault(cls, message: str) -> GrowResult:
        return cls(False, message, message)


GROWN = GrowResult(True)
EXHAUSTED = GrowResult(False)


@dataclasses.dataclass(frozen=True)
class Allocation:
    """A slot backed for its first tokens (``slot``), or why there is none (``result``)."""

    slot: int | None
    result: GrowResult


@runtime_checkable
class KVPool(Protocol):
    """The host side of a KV memory that the scheduler drives."""

    max_batch: int
    max_seq: int

    def allocate(self, min_tokens: int = 0) -> Allocation:
        """Take a free slot backed for ``min_tokens``; on failure nothing is held."""

    def grow(self, slot: int, tokens: int) -> GrowResult:
        """Back tokens ``[0, tokens)`` of ``slot``; on failure nothing changes."""

    def free(self, slot: int) -> None: ...

    def capacity(self, slot: int) -> int:
        """Tokens backed in ``slot``."""

    def pages_needed(self, tokens: int) -> int: ...

    def pages_total(self) -> int: ...

    def pages_live(self) -> int:
        """Pages held by running requests (not by deferred, free slots)."""

    def memory(self) -> tuple[int, int]:
        """Bytes mapped into slots, and device bytes held by the pool."""

    def cache(self, slots, starts, counts) -> KVCacheLike:
        """One step's rows: row b has ``starts[b]`` cached tokens and ``counts[b]`` pending."""

    def adopt(self, exported) -> None:
        """Take back what a step returned through ``cache.export()``."""

    def check_errors(self) -> None:
        """Raise a write the device refused since the last call."""

    def close(self) -> None: ...


@runtime_checkable
class SharingPool(KVPool, Protocol):
    """A ``KVPool`` whose physical pages can be shared between slots (prefix caching): pinned, then mapped into
    another slot's first page indices, read-only there. Pages return to the pool when their last pin and
    mapping go."""

    @property
    def tokens_per_page(self) -> int:
        """Tokens of a slot one page index holds (in every reserved tensor): the sharing granularity."""

    def pin_prefix(self, slot: int, n_pages: int) -> tuple[int, ...]:
        """Pin the physical pages of ``slot``'s first ``n_pages`` page indices; their handles, ``[page][tensor]``."""

    def unpin(self, handles) -> None:
        """Drop one pin of each handle."""

    def map_prefix(self, slot: int, handles) -> GrowResult:
        """Map pinned ``handles`` into ``slot``'s first page indices (read-only for it); on failure nothing is
        mapped."""
