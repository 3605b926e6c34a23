"""Static-cache baseline: the same cache interface on XLA-allocated ``[MB, S, Hkv, D]`` arrays.

``StaticKVCache`` implements the cache protocol (``cache.protocol``) like
``jax_vattention.KVCache``, so the model and the generation loop run unchanged on it, but its memory is
ordinary device arrays allocated up front at ``max_batch x max_seq`` (what a framework without vAttention
would hold), and a write is a functional scatter that returns a new cache. Inside a jitted
``while_loop`` the arrays are loop-carried and XLA updates them in place; the
top-level jit functions donate them.

Use it for tests (the vAttention cache must give the same tokens) and for
memory comparisons (``nbytes``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..attention.dispatch import AttentionSpec, cache_attention, packed_cache_attention
from ..packing import PackedRows
from .protocol import CacheRows
from .vattention import CacheState


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StaticKVCache(CacheRows):
    k: tuple[jax.Array, ...]  # L x [MB, S, Hkv, D], plain XLA buffers
    v: tuple[jax.Array, ...]  # L x [MB, S, Hkv, D]
    state: CacheState

    @classmethod
    def create(cls, num_layers: int, max_batch: int, max_seq: int, kv_heads: int, head_dim: int, dtype,
               slots=None, lengths=None) -> StaticKVCache:
        """Zeroed buffers; rows ``slots`` (default ``range(max_batch)``) with ``lengths`` (default 0)."""
        shape = (max_batch, max_seq, kv_heads, head_dim)
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype))  # one buffer per tensor, not a shared constant
        k = tuple(zeros() for _ in range(num_layers))
        v = tuple(zeros() for _ in range(num_layers))
        slots = jnp.arange(max_batch, dtype=jnp.int32) if slots is None else jnp.asarray(slots, jnp.int32)
        lengths = jnp.zeros_like(slots) if lengths is None else jnp.asarray(lengths, jnp.int32)
        return cls(k, v, CacheState(slots, lengths, jnp.zeros_like(lengths)))

    @property
    def dtype(self) -> jnp.dtype:
        return self.k[0].dtype

    @property
    def max_seq(self) -> int:
        return self.k[0].shape[1]

    @property
    def nbytes(self) -> int:
        """Device bytes the K and V buffers occupy (all of it, always)."""
        return sum(x.size * x.dtype.itemsize for x in (*self.k, *self.v))

    def with_rows(self, slots, lengths) -> StaticKVCache:
        """The same buffers serving other rows (like ``manager.cache(slots, lengths)``)."""
        slots = jnp.asarray(slots, jnp.int32)
        lengths = jnp.asarray(lengths, jnp.int32)
        return self.with_state(CacheState(slots, lengths, jnp.zeros_like(lengths)))

    def grow(self, new_lengths: jax.Array) -> StaticKVCache:
        """Make tokens up to ``new_lengths`` pending (nothing to map: the buffers are dense).

        Lengths are clamped to ``max_seq``; writes past it are dropped.
        """
        new_lengths = jnp.minimum(jnp.asarray(new_lengths, jnp.int32), self.max_seq)
        return self.with_state(CacheState(self.slots, new_lengths, new_lengths - self.lengths))

    def attention(self, layer: int, q: jax.Array, lengths: jax.Array, spec: AttentionSpec) -> jax.Array:
        """Attention of the pending tokens ``q [B, T, Hq, D]`` over ``layer``, read below ``lengths`` only."""
        return cache_attention(q, self.k[layer], self.v[layer], self.slots, lengths, self.num_new, spec)

    def attention_packed(self, layer: int, q: jax.Array, lengths: jax.Array, rows: PackedRows,
                         spec: AttentionSpec) -> jax.Array:
        """``attention`` for a packed step: ``q [N, Hq, D]`` laid out as ``rows``; ``[N, Hq, D]``."""
        return packed_cache_attention(q, self.k[layer], self.v[layer], self.slots, lengths, self.num_new, rows, spec)

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, StaticKVCache]:
        """Store the pending tokens of every row into ``layer``; returns ``(lengths [B], new cache)``.

        ``k_new``/``v_new`` are ``[B, T, Hkv, D]``; row b stores its first
        ``num_new[b]`` tokens at positions ``[lengths[b] - num_new[b], lengths[b])``.
        """
        t = jnp.arange(k_new.shape[1], dtype=jnp.int32)
        starts = self.lengths - self.state.num_new  # [B]
        pos = starts[:, None] + t[None, :]  # [B, T]
        ok = (t[None, :] < self.state.num_new[:, None]) & (self.slots[:, None] >= 0)
        return self.lengths, self._scatter(layer, jnp.where(ok, self.slots[:, None], -1), pos, k_new, v_new)

    def write_packed(self, layer: int, k_new: jax.Array, v_new: jax.Array, rows: PackedRows
                     ) -> tuple[jax.Array, StaticKVCache]:
        """``write`` for a packed step: ``k_new/v_new [N, Hkv, D]`` laid out as ``rows``."""
        slot_t, pos_t = rows.token_coords(self.slots, self.lengths - self.state.num_new)  # [N] each
        return self.lengths, self._scatter(layer, slot_t, pos_t, k_new, v_new)

    def _scatter(self, layer: int, slots, pos, k_new, v_new) -> StaticKVCache:
        """Store ``k_new/v_new [..., Hkv, D]`` at ``(slots, pos)`` (same leading shape); slot < 0: dropped."""
        mb, seq = self.k[layer].shape[:2]
        rows = jnp.where(slots >= 0, slots, mb)  # out of range: dropped by the scatter
        pos = jnp.where(slots >= 0, pos, seq)
        k = self.k[layer].at[rows, pos].set(k_new.astype(self.k[layer].dtype), mode="drop")
        v = self.v[layer].at[rows, pos].set(v_new.astype(self.v[layer].dtype), mode="drop")
        ks = self.k[:layer] + (k,) + self.k[layer + 1:]
        vs = self.v[:layer] + (v,) + self.v[layer + 1:]
        return dataclasses.replace(self, k=ks, v=vs)
