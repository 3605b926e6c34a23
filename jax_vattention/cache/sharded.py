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
from jax.sharding import PartitionSpec as P

from .. import ops
from ..attention.dispatch import AttentionSpec, cache_attention, packed_cache_attention
from ..packing import PackedRows
from .vattention import CacheState, KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShardedKVCache(KVCache):
    """``KVCache`` whose ``tensors`` are the manager's global arrays, sharded over KV heads (module docstring)."""

    def _map(self, body, in_specs, out_specs):
        return jax.shard_map(body, mesh=self.manager.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    @property
    def _heads(self) -> P:  # [B, T, H, D]: heads over the mesh axis
        return P(None, None, self.manager.axis, None)

    def _tensor_specs(self) -> tuple[P, ...]:
        return (self.manager.tensor_spec,) * len(self.tensors)

    def grow(self, new_lengths: jax.Array) -> ShardedKVCache:
        lengths = self._map(lambda s, n: ops.grow(self.manager, s, n), (P(), P()), P())(
            self.slots, jax.numpy.asarray(new_lengths, jax.numpy.int32))
        return self.with_state(CacheState(self.slots, lengths, lengths - self.lengths))

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, ShardedKVCache]:
        """``KVCache.write`` with ``k_new``/``v_new [B, T, Hkv, D]`` global: each device stores its heads."""
        starts = self.lengths - self.state.num_new
        side = not self.pure_writes

        def body(k, v, slots, st, n):
            return ops.write(self.manager, layer, k, v, slots, st, n, has_side_effect=side)

        lengths = self._map(body, (self._heads, self._heads, P(), P(), P()), P())(
            k_new, v_new, self.slots, starts, self.state.num_new)
        return lengths, self

    def write_packed(self, layer: int, k_new: jax.Array, v_new: jax.Array, rows: PackedRows
                     ) -> tuple[jax.Array, ShardedKVCache]:
        """``KVCache.write_packed`` with ``k_new``/``v_new [N, Hkv, D]`` global."""
        heads = P(None, self.manager.axis, None)

        def body(k, v, state, rows):
            return KVCache.write_packed(dataclasses.replace(self, state=state), layer, k, v, rows)[0]

        lengths = self._map(body, (heads, heads, P(), P()), P())(k_new, v_new, self.state, rows)
        return lengths, self

    def _local(self, tensors, state) -> KVCache:
        """The plain cache a device sees inside ``shard_map``: its own views, the replicated rows."""
        return KVCache(tuple(tensors), state, self.manager, pure_writes=self.pure_writes)

    def attention(self, layer: int, q: jax.Array, lengths: jax.Array, spec: AttentionSpec) -> jax.Array:
        """``KVCache.attention`` with ``q [B, T, Hq, D]`` global; each device attends with its heads."""
        def body(q, tensors, state, lengths):
            local = self._local(tensors, state)
            k, k_entry, v, v_entry = local.layer_kv(layer)
            return cache_attention(q, k, v, local.slots, lengths, local.num_new, local._spec(spec, q.shape[-1]),
                                   k_entry=k_entry, v_entry=v_entry)

        return self._map(body, (self._heads, self._tensor_specs(), P(), P()), self._heads)(
            q, self.tensors, self.state, lengths)

    def attention_packed(self, layer: int, q: jax.Array, lengths: jax.Array, rows: PackedRows,
                         spec: AttentionSpec) -> jax.Array:
        """``KVCache.attention_packed`` with ``q [N, Hq, D]`` global."""
        heads = P(None, self.manager.axis, None)

        def body(q, tensors, state, lengths, rows):
            local = self._local(tensors, state)
            k, k_entry, v, v_entry = local.layer_kv(layer)
            return packed_cache_attention(q, k, v, local.slots, lengths, local.num_new, rows,
                                          local._spec(spec, q.shape[-1]), k_entry=k_entry, v_entry=v_entry)

        return self._map(body, (heads, self._tensor_specs(), P(), P(), P()), heads)(
            q, self.tensors, self.state, lengths, rows)

    def __repr__(self) -> str:
        return f"ShardedKVCache(manager={self.manager!r}, rows={jax.numpy.shape(self.state.slots)[0]})"
