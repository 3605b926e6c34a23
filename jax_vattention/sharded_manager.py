"""A vAttention KV cache over the devices of a mesh axis (tensor parallelism, issue 19).

Each device of the mesh axis has its own ``KVCacheManager``: its own reservation and page pool, on its own
device, holding ``kv_heads / tp`` of every layer's KV heads. One scheduler decides for all of them: ``allocate``,
``grow`` and ``free`` apply the same slot decision on every device, so slots and lengths are the same everywhere.

The global cache tensors are ``jax.Array`` s assembled from the per-device zero-copy views
(``jax.make_array_from_single_device_arrays``), sharded over the KV-head axis: nothing is copied, and a kernel
inside ``shard_map`` reads its device's heads in place.

Inside ``shard_map``, the FFI grow and write calls take this object as their manager (``ops.grow`` /
``ops.write``, or ``write`` / ``grow`` here, which wrap them in ``shard_map``): its ``id`` names a device group,
and each device's handler resolves it to its own manager by the XLA FFI device ordinal. Its ``config`` is a
device's (local KV heads), which is what shapes inside ``shard_map`` are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import _core, ops
from .config import CacheConfig
from .errors import BackendError, CacheClosedError, CacheValueError, PoolExhaustedError
from .manager import CacheStats, KVCacheManager


def _ordinal(device: jax.Device) -> int:
    """What the XLA FFI device ordinal of a call running on ``device`` is: the CUDA ordinal on GPUs, the device id
    on the host platform."""
    return int(device.local_hardware_id) if device.platform == "gpu" else int(device.id)


@dataclasses.dataclass(frozen=True)
class ShardedCacheStats:
    """``per_device[i]`` is mesh device i's ``CacheStats``; ``total`` sums their integer fields."""

    devices: tuple[str, ...]
    per_device: tuple[CacheStats, ...]
    total: dict[str, int]


class ShardedKVCacheManager:
    """One ``KVCacheManager`` per device of ``mesh``'s axis ``axis``, each with ``kv_heads / tp`` heads (module
    docstring). Use as a context manager, or call ``close()``."""

    def __init__(self, config: CacheConfig, mesh: Mesh, axis: str = "tp"):
        self.devices: tuple[jax.Device, ...] = ()
        self.managers: list[KVCacheManager] = []
        self.id = 0
        if not isinstance(config, CacheConfig):
            raise CacheValueError(f"config must be a CacheConfig, got {type(config).__name__}")
        if not isinstance(mesh, Mesh):
            raise CacheValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        if tuple(mesh.axis_names) != (axis,):
            raise CacheValueError(f"the mesh must have the one axis {axis!r} (KV heads are sharded over it), got "
                                  f"axes {tuple(mesh.axis_names)}")
        devices = list(mesh.devices.reshape(-1))
        tp = len(devices)
        if config.kv_heads % tp:
            raise CacheValueError(f"kv_heads={config.kv_heads} is not divisible by the {tp} devices of mesh axis "
                                  f"{axis!r} ({', '.join(str(d) for d in devices)})")
        kinds = {(d.platform, d.device_kind) for d in devices}
        if len(kinds) > 1:
            raise CacheValueError("the mesh mixes device kinds: " + ", ".join(f"{d} ({d.device_kind})"
                                                                               for d in devices))
        self.mesh, self.axis, self.devices = mesh, axis, tuple(devices)
        self.global_config = config
        self.config = dataclasses.replace(config, kv_heads=config.kv_heads // tp)  # what one device holds
        try:
            for d in devices:
                try:
                    self.managers.append(KVCacheManager(self.config, device=d))
                except PoolExhaustedError as e:
                    raise PoolExhaustedError(f"device {d}: {e}") from e
            self.id = int(_core.add_device_group([_ordinal(d) for d in devices], [m.id for m in self.managers]))
            self.max_seq = self.managers[0].max_seq
            self._tensors = tuple(self._assemble(t) for t in range(self.config.num_tensors))
        except BaseException:
            self.close()
            raise

    def _assemble(self, tensor: int) -> jax.Array:
        """The global tensor ``tensor`` from the devices' views, sharded over the KV-head axis; never a copy."""
        shards = [m.tensors[tensor] for m in self.managers]
        shape = self.global_config.tensor_shape(self.max_seq)  # [MB, S, Hkv, D] or [MB, S, g, 2, Hkv, D]
        array = jax.make_array_from_single_device_arrays(shape, NamedSharding(self.mesh, self.tensor_spec), shards)
        for shard, m in zip(array.addressable_shards, self.managers):
            if shard.data.unsafe_buffer_pointer() != m._native.tensor_address(tensor):
                raise BackendError(f"the global view of cache tensor {tensor} copied device {shard.device}'s shard")
        return array

    # -- state -----------------------------------------------------------------
    @property
    def tokens_per_page(self) -> int:
        return self.config.tokens_per_page

    @property
    def tensor_spec(self) -> P:
        """How every cache tensor is sharded: over its KV-head axis (the second to last)."""
        return P(*([None] * (len(self.global_config.tensor_shape(1)) - 2)), self.axis, None)

    @property
    def closed(self) -> bool:
        return not self.managers or any(m.closed for m in self.managers)

    def _check_open(self) -> None:
        if self.closed:
            raise CacheClosedError("the sharded cache manager is closed")

    @property
    def tensors(self) -> tuple[jax.Array, ...]:
        """Global zero-copy tensors, ``global_config.tensor_shape(max_seq)``, sharded over the KV-head axis."""
        self._check_open()
        return self._tensors

    @property
    def k(self) -> tuple[jax.Array, ...]:
        """Per-layer layout only: ``k[layer]`` is ``tensors[2 * layer]``, ``[MB, S, Hkv, D]`` sharded over Hkv."""
        if self.config.interleaved:
            raise CacheValueError("this cache is interleaved: use tensors with global_config.locate(layer)")
        return self.tensors[0::2]

    @property
    def v(self) -> tuple[jax.Array, ...]:
        if self.config.interleaved:
            raise CacheValueError("this cache is interleaved: use tensors with global_config.locate(layer)")
        return self.tensors[1::2]

    # -- slots: one decision, applied on every device ------------------------------------------
    def _each(self, what: str, call) -> list[Any]:
        out = []
        for d, m in zip(self.devices, self.managers):
            try:
                out.append(call(m))
            except PoolExhaustedError as e:
                raise PoolExhaustedError(f"{what} on device {d}: {e}") from e
        return out

    def allocate(self, min_tokens: int = 0) -> int:
        """A free slot backed for ``min_tokens`` on every device (the same slot everywhere)."""
        self._check_open()
        slots: list[int] = []
        try:
            self._each("allocate", lambda m: slots.append(m.allocate(min_tokens)))
        except BaseException:
            for m, s in zip(self.managers, slots):
                m.free(s)
            raise
        if len(set(slots)) != 1:
            for m, s in zip(self.managers, slots):
                m.free(s)
            raise BackendError(f"the devices' managers chose different slots {slots}; their state diverged")
        return slots[0]

    def grow(self, slot: int, tokens: int) -> None:
        self._check_open()
        self._each("grow", lambda m: m.grow(slot, tokens))

    def free(self, slot: int) -> None:
        self._check_open()
        self._each("free", lambda m: m.free(slot))

    def allocated(self, slot: int) -> bool:
        self._check_open()
        return all(m.allocated(slot) for m in self.managers)

    @property
    def device(self) -> jax.Device:
        """The first device (its platform is every device's)."""
        return self.devices[0]

    def cache(self, slots, lengths):
        """A ``ShardedKVCache`` of rows ``slots`` holding ``lengths`` tokens (``KVCache.create`` on every device)."""
        from .cache.sharded import ShardedKVCache

        return ShardedKVCache.create(self, slots, lengths)

    def step_cache(self, slots, starts, counts):
        """``ShardedKVCache.for_step``: the engine's per-step cache."""
        from .cache.sharded import ShardedKVCache

        return ShardedKVCache.for_step(self, slots, starts, counts)

    # Page sharing (prefix caching) would pin and map one page per device; not built for several devices yet.
    def _no_sharing(self, *args, **kwargs):
        raise CacheValueError("prefix caching (page sharing) is not supported on a sharded cache yet")

    pin_pages = unpin_pages = map_shared = _no_sharing

    def check_device_errors(self) -> None:
        for m in self.managers:
            m.check_device_errors()

    def capacity(self, slot: int) -> int:
        """Tokens backed on every device."""
        self._check_open()
        return min(m.capacity(slot) for m in self.managers)

    def trim(self, max_pages: int | None = None, *, release_physical: bool = False) -> int:
        self._check_open()
        return sum(m.trim(max_pages, release_physical=release_physical) for m in self.managers)

    def stats(self) -> CacheStats:
        """One device's ``CacheStats``: every device maps the same pages for the same slots, so this is what each
        holds (``device_stats`` has them all and their total)."""
        return self.managers[0].stats()

    def device_stats(self) -> ShardedCacheStats:
        per = tuple(m.stats() for m in self.managers)
        total = {f.name: sum(getattr(s, f.name) for s in per) for f in dataclasses.fields(CacheStats)
                 if isinstance(getattr(per[0], f.name), int) and not isinstance(getattr(per[0], f.name), bool)}
        return ShardedCacheStats(tuple(str(d) for d in self.devices), per, total)

    # -- jit side --------------------------------------------------------------------------------
    def on_devices(self, body, in_specs, out_specs):
        """``body`` run on every device of the mesh (``jax.shard_map``), where it may call ``ops.grow`` /
        ``ops.write`` with this manager; outputs declared replicated (``P()``) are each device's own, equal ones."""
        return jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array, slots, starts, counts) -> jax.Array:
        """``ops.write`` on every device: ``k_new``/``v_new`` are global ``[B, T, kv_heads, D]`` (each device
        stores its heads), rows replicated. Returns the lengths ``[B]``."""
        self._check_open()
        kv = P(None, None, self.axis, None)
        return self.on_devices(lambda k, v, s, st, c: ops.write(self, layer, k, v, s, st, c),
                               (kv, kv, P(), P(), P()), P())(k_new, v_new, slots, starts, counts)

    def grow_in_jit(self, slots, lengths) -> jax.Array:
        """``ops.grow`` on every device."""
        self._check_open()
        return self.on_devices(lambda s, n: ops.grow(self, s, n), (P(), P()), P())(slots, lengths)

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        if self.id:
            _core.remove_device_group(self.id)
            self.id = 0
        self._tensors = ()
        for m in self.managers:
            m.close()

    def __enter__(self) -> ShardedKVCacheManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if not self.managers:
            return "ShardedKVCacheManager(not open)"
        return (f"ShardedKVCacheManager({len(self.devices)} devices on axis {self.axis!r}, "
                f"{self.config.kv_heads} of {self.global_config.kv_heads} KV heads each)")
