"""ShardedKVCache: the vAttention cache pytree over a ``ShardedKVCacheManager`` (tensor parallelism).

The same protocol as ``KVCache`` (``cache.protocol.KVCacheLike``), for a model whose K/V/Q heads are sharded over
the manager's mesh axis: ``write`` and ``attention`` run on every device inside ``shard_map``, each on its own
``kv_heads / tp`` heads (and the matching ``num_heads / tp`` query heads) in its own manager's memory, through the
same FFI calls and kernels as one device. Rows (slots, lengths) are replicated: one scheduler decides for all.
Heads are split in contiguous blocks, so query head h still reads KV head ``h // (Hq / Hkv)`` on its device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ..attention.dispatch import AttentionSpec
from ..packing import PackedRows
from .vattention import KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShardedKVCache(KVCache):
    """``KVCache`` whose ``tensors`` are the manager's global arrays, sharded over KV heads (module docstring).

    Every method runs ``KVCache``'s own on each device (``manager.on_devices``), over that device's views and the
    replicated rows: one implementation of the cache's semantics for one device and for many."""

    def _local(self, tensors, state) -> KVCache:
        """The plain cache a device sees: its own views, the replicated rows."""
        return KVCache(tuple(tensors), state, self.manager, pure_writes=self.pure_writes)

    def _heads(self, ndim: int) -> P:  # [..., H, D]: heads over the mesh axis
        return P(*([None] * (ndim - 2)), self.manager.axis, None)

    def _tensors_spec(self) -> tuple[P, ...]:
        return (self.manager.tensor_spec,) * len(self.tensors)

    def grow(self, new_lengths: jax.Array) -> ShardedKVCache:
        state = self.manager.on_devices(lambda st, n: self._local((), st).grow(n).state, (P(), P()), P())(
            self.state, jnp.asarray(new_lengths, jnp.int32))
        return self.with_state(state)

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, ShardedKVCache]:
        """``KVCache.write`` with ``k_new``/``v_new [B, T, Hkv, D]`` global: each device stores its heads."""
        kv = self._heads(4)
        lengths = self.manager.on_devices(lambda k, v, st: self._local((), st).write(layer, k, v)[0],
                                          (kv, kv, P()), P())(k_new, v_new, self.state)
        return lengths, self

    def write_packed(self, layer: int, k_new: jax.Array, v_new: jax.Array, rows: PackedRows
                     ) -> tuple[jax.Array, ShardedKVCache]:
        """``KVCache.write_packed`` with ``k_new``/``v_new [N, Hkv, D]`` global."""
        kv = self._heads(3)
        lengths = self.manager.on_devices(lambda k, v, st, r: self._local((), st).write_packed(layer, k, v, r)[0],
                                          (kv, kv, P(), P()), P())(k_new, v_new, self.state, rows)
        return lengths, self

    def attention(self, layer: int, q: jax.Array, lengths: jax.Array, spec: AttentionSpec) -> jax.Array:
        """``KVCache.attention`` with ``q [B, T, Hq, D]`` global; each device attends with its heads."""
        q_spec = self._heads(4)
        return self.manager.on_devices(
            lambda q, t, st, n: self._local(t, st).attention(layer, q, n, spec),
            (q_spec, self._tensors_spec(), P(), P()), q_spec)(q, self.tensors, self.state, lengths)

    def attention_packed(self, layer: int, q: jax.Array, lengths: jax.Array, rows: PackedRows,
                         spec: AttentionSpec) -> jax.Array:
        """``KVCache.attention_packed`` with ``q [N, Hq, D]`` global."""
        q_spec = self._heads(3)
        return self.manager.on_devices(
            lambda q, t, st, n, r: self._local(t, st).attention_packed(layer, q, n, r, spec),
            (q_spec, self._tensors_spec(), P(), P(), P()), q_spec)(q, self.tensors, self.state, lengths, rows)

    def __repr__(self) -> str:
        return f"ShardedKVCache(manager={self.manager!r}, rows={jnp.shape(self.state.slots)[0]})"
