"""KVCache: the explicit cache pytree that jit-compiled model code passes around.

    cache = manager.cache(slots, lengths)           # views + per-row state
    cache = cache.grow(cache.lengths + 1)           # map pages for one more token
    for layer in range(L):
        lengths, cache = cache.write(layer, k, v)   # k, v: [B, 1, Hkv, D]; the same views come back
        out = cache.attention(layer, q, lengths, AttentionSpec())

Rules that keep it copy-free:
  * The views (``tensors``) are ordinary, non-donated jit arguments, read only.
  * A top-level jit must not return them: XLA copies a non-donated output,
    which on a sparse cache reads unmapped memory. Return ``cache.state`` and
    rebuild with ``cache.with_state(state)`` outside.
  * Read the cache only with lengths returned by ``grow``/``write``: that data
    dependency is what orders reads after writes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .. import ops
from ..attention.dispatch import AttentionSpec, cache_attention, packed_cache_attention
from ..errors import CacheValueError, SlotStateError
from ..packing import PackedRows
from .protocol import CacheRows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CacheState:
    """The per-row part of a KVCache: safe to return from a top-level jit."""

    slots: jax.Array | np.ndarray  # [B] int32, slot of each batch row, -1 for padding rows
    lengths: jax.Array | np.ndarray  # [B] int32, tokens in the cache (after grow: including pending ones)
    num_new: jax.Array | np.ndarray  # [B] int32, tokens the last grow added; each layer's write stores them


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache(CacheRows):
    """The manager's reserved tensors plus per-row state.

    ``tensors`` are the zero-copy views of ``manager.tensors``, in the layout of
    ``manager.config`` (``CacheConfig.layers_per_group``): ``2 * L`` per-layer
    ``[MB, S, Hkv, D]`` (K0, V0, K1, ...) or ``L / g`` interleaved
    ``[MB, S, g, 2, Hkv, D]``. ``config.locate(layer)`` says where a layer's K and
    V live; the kernels read them in place, with the token stride.
    """

    tensors: tuple[jax.Array, ...]  # zero-copy views, one per reserved tensor
    state: CacheState
    manager: Any = dataclasses.field(metadata=dict(static=True))
    # Writes as pure calls ordered only by their lengths (see ``for_step`` and ``ops.write``).
    pure_writes: bool = dataclasses.field(default=False, metadata=dict(static=True))

    donates: ClassVar[bool] = False  # the views are the manager's memory: read in place, never donated

    @classmethod
    def create(cls, manager, slots, lengths) -> KVCache:
        """Rows ``slots [B]`` holding ``lengths [B]`` cached tokens (negative slot: a padding row).

        Each real row must be an allocated slot of this manager with a length in
        ``[0, max_seq]``; ``grow`` then backs what the rows will hold (reads go below
        the lengths ``grow``/``write`` return).
        """
        slots = jnp.asarray(slots, jnp.int32)
        lengths = jnp.asarray(lengths, jnp.int32)
        ops._check_rows("slots", slots)
        ops._check_rows("lengths", lengths, slots.shape[0])
        for slot, length in zip(np.asarray(slots).tolist(), np.asarray(lengths).tolist()):
            if slot >= manager.config.max_batch:
                raise CacheValueError(f"slot {slot} is outside [0, max_batch={manager.config.max_batch}) "
                                      "(negative: a padding row)")
            if slot < 0 and length != 0:
                raise CacheValueError(f"padding row (slot {slot}) must have length 0, got {length}")
            if slot >= 0 and not manager.allocated(slot):
                raise SlotStateError(f"slot {slot} is not allocated")
            if not 0 <= length <= manager.max_seq:
                raise CacheValueError(f"slot {slot}: length {length} is outside [0, max_seq={manager.max_seq}]")
        state = CacheState(slots, lengths, jnp.zeros_like(lengths))
        return cls(tuple(manager.tensors), state, manager)

    @classmethod
    def for_step(cls, manager, slots, starts, counts) -> KVCache:
        """Rows ``slots`` with ``starts`` cached tokens and ``counts`` more pending, for host-side backing.

        For callers that back pages on the host (``manager.grow``) before
        dispatching, such as the serving engine: no grow call, so no device
        sync, and the arrays stay on the host until the jit call. A write past
        a row's backed capacity is still refused (and raised), never stored
        into unmapped memory.

        The cache writes through pure calls (``pure_writes``): with no grow and
        no effectful write, a jitted step has no effects and jax dispatches it
        on its fast path. Each layer's attention must read with the lengths its
        write returns (the model does), or XLA drops the write.
        """
        slots = np.asarray(slots, np.int32)
        starts, counts = np.asarray(starts, np.int32), np.asarray(counts, np.int32)
        batch = ops._check_rows("slots", slots)
        ops._check_rows("starts", starts, batch)
        ops._check_rows("counts", counts, batch)
        state = CacheState(slots, starts + counts, counts)
        return cls(tuple(manager.tensors), state, manager, pure_writes=True)

    @property
    def dtype(self) -> jnp.dtype:
        return self.manager.config.jnp_dtype

    def layer_kv(self, layer: int) -> tuple[jax.Array, int, jax.Array, int]:
        """``(k_tensor, k_entry, v_tensor, v_entry)``: where ``layer``'s K and V live (one tensor, interleaved).

        Per-layer tensors are ``[MB, S, Hkv, D]`` (entry 0); interleaved ones ``[MB, S, g, 2, Hkv, D]``, whose
        ``g * 2`` entries per token the kernels index as they are. Never reshape a view, not even inside jit:
        XLA may give a new size-1 axis another layout, which is a copy of the whole (sparse) reservation.
        """
        (tk, ek), (tv, ev) = self.manager.config.locate(layer)
        return self.tensors[tk], ek, self.tensors[tv], ev

    def grow(self, new_lengths: jax.Array) -> KVCache:
        """Back ``new_lengths [B]`` tokens per row; the added tokens become pending writes.

        Rows whose length does not change (finished requests) map nothing.
        """
        new_lengths = jnp.asarray(new_lengths, jnp.int32)
        lengths = ops.grow(self.manager, self.slots, new_lengths)
        return self.with_state(CacheState(self.slots, lengths, lengths - self.lengths))

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, KVCache]:
        """Write the pending tokens of every row into ``layer``; returns ``(lengths [B], self)``.

        The views are written in place, so the same cache comes back.

        ``k_new``/``v_new`` are ``[B, T, Hkv, D]``; row b stores its first
        ``num_new[b]`` tokens at positions ``[lengths[b] - num_new[b], lengths[b])``.
        """
        starts = self.lengths - self.state.num_new
        lengths = ops.write(self.manager, layer, k_new, v_new, self.slots, starts, self.state.num_new,
                            has_side_effect=not self.pure_writes)
        return lengths, self

    def write_packed(self, layer: int, k_new: jax.Array, v_new: jax.Array, rows: PackedRows
                     ) -> tuple[jax.Array, KVCache]:
        """``write`` for a packed step: ``k_new/v_new [N, Hkv, D]`` hold the rows' pending tokens flat, as
        ``rows`` lays them out. Each token is stored as its own one-token row of the native write (its capacity
        check included); returns ``(lengths [R], self)``, produced after the write."""
        slot_t, pos_t = rows.token_coords(self.slots, self.lengths - self.state.num_new)  # [N] each
        written = ops.write(self.manager, layer, k_new[:, None], v_new[:, None], slot_t, pos_t,
                            (slot_t >= 0).astype(jnp.int32), has_side_effect=not self.pure_writes)  # [N]
        # Each row's length is the largest its tokens' writes return (its start if it has none): a data dependency
        # on every write, so XLA neither drops a write nor reads before it (an optimization barrier is expanded
        # away late in XLA's pipeline, after which an unused pure write is dead code).
        rows_t = jnp.where(rows.token_rows >= 0, rows.token_rows, self.lengths.shape[0])  # padding: dropped
        lengths = (self.lengths - self.state.num_new).at[rows_t].max(written, mode="drop")  # [R]
        return lengths, self

    def _spec(self, spec: AttentionSpec, head_dim: int) -> AttentionSpec:
        if spec.impl == "auto":
            spec = spec.resolve(self.dtype, head_dim, self.manager.device.platform)
        if spec.impl == "kernel" and spec.interpret and not spec.block_k:
            # Unmasked tile reads (interpret mode) reach the length rounded up to the tile: keep tiles within a page.
            c = self.manager.config
            spec = dataclasses.replace(spec, block_k=spec.kernel_block_k(head_dim, self.manager.max_seq,
                                                                         c.tokens_per_page))
        return spec

    def attention(self, layer: int, q: jax.Array, lengths: jax.Array, spec: AttentionSpec) -> jax.Array:
        """Attention of the pending tokens ``q [B, T, Hq, D]`` over ``layer``, read below ``lengths`` only."""
        k, k_entry, v, v_entry = self.layer_kv(layer)
        return cache_attention(q, k, v, self.slots, lengths, self.num_new, self._spec(spec, q.shape[-1]),
                               k_entry=k_entry, v_entry=v_entry)

    def attention_packed(self, layer: int, q: jax.Array, lengths: jax.Array, rows: PackedRows,
                         spec: AttentionSpec) -> jax.Array:
        """``attention`` for a packed step: ``q [N, Hq, D]`` laid out as ``rows``; ``[N, Hq, D]``."""
        k, k_entry, v, v_entry = self.layer_kv(layer)
        return packed_cache_attention(q, k, v, self.slots, lengths, self.num_new, rows, self._spec(spec, q.shape[-1]),
                                      k_entry=k_entry, v_entry=v_entry)

    def export(self) -> CacheState:
        """What a top-level jit returns: the per-row state only (returning a view would copy the cache)."""
        return self.state

    def restore(self, exported: CacheState) -> KVCache:
        return self.with_state(exported)

    def __repr__(self) -> str:  # never the views: printing one reads every unbacked page (fatal in "fault" mode)
        return f"KVCache(manager={self.manager!r}, rows={jax.numpy.shape(self.state.slots)[0]})"
