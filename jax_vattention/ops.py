"""Thin, checked wrappers around the grow and write XLA FFI calls.

Both are usable under ``jax.jit`` and inside ``lax.fori_loop`` / ``while_loop``.
They are side-effecting custom calls: XLA never removes them, and what they
return (``lengths [B]``) is how later work is ordered after them. Index the
cache only with lengths that came out of these calls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import _core
from .errors import CacheClosedError, CacheValueError


def _register_targets():
    for name, capsule in _core.registrations().items():
        target, platform = name.rsplit("_", 1)
        jax.ffi.register_ffi_target(target, capsule, platform={"cpu": "cpu", "cuda": "CUDA"}[platform])


_register_targets()


def _check_open(manager):
    if manager.closed:
        raise CacheClosedError("the cache manager is closed")


def _check_rows(what: str, x, batch: int | None = None):
    shape, dtype = jnp.shape(x), jnp.result_type(x)
    if len(shape) != 1:
        raise CacheValueError(f"{what} must have shape [B], got {shape}")
    if dtype != jnp.int32:
        raise CacheValueError(f"{what} must be int32, got {dtype}")
    if batch is not None and shape[0] != batch:
        raise CacheValueError(f"{what} has {shape[0]} rows, expected B={batch}")
    return shape[0]


def grow(manager, slots: jax.Array, lengths: jax.Array) -> jax.Array:
    """Back tokens ``[0, lengths[b])`` of slot ``slots[b]`` for every row b.

    Args:
      slots: ``[B] int32``; rows with a negative slot are skipped (padding).
      lengths: ``[B] int32``, each in ``[0, max_seq]``.
    Returns:
      ``[B] int32`` equal to ``lengths``, produced after the pages are mapped.
    Raises (when the computation runs): PoolExhaustedError, SlotStateError for
    an unallocated slot, CacheValueError for a length past max_seq.
    """
    _check_open(manager)
    batch = _check_rows("slots", slots)
    _check_rows("lengths", lengths, batch)
    call = jax.ffi.ffi_call("vattn_grow", jax.ShapeDtypeStruct((batch,), jnp.int32), has_side_effect=True)
    return call(slots, lengths, manager_id=np.uint64(manager.id))


def write(manager, layer: int, k_new: jax.Array, v_new: jax.Array, slots, starts, counts, *,
          has_side_effect: bool = True) -> jax.Array:
    """Store new K/V rows into layer ``layer`` of the cache, in place.

    Row b writes ``k_new[b, :counts[b]]`` (and V) at positions
    ``[starts[b], starts[b] + counts[b])`` of slot ``slots[b]``, at the layer's
    entries wherever the layout puts them (``CacheConfig.locate``): its own K and
    V tensors per-layer, its K and V entries of each token of its group's tensor
    interleaved.

    With ``has_side_effect=False`` the call is kept only through its result:
    XLA removes a write whose lengths nothing reads. In exchange the jitted
    function carries no effect, so jax dispatches it on its C++ fast path
    (an effectful one takes the Python path, about a millisecond per call
    for a model-sized pytree). Use it only where attention reads the cache
    with the returned lengths, as every model layer does.

    Args:
      k_new, v_new: ``[B, T, kv_heads, head_dim]`` in the cache dtype.
      slots, starts, counts: ``[B] int32``; negative slots skip the row.
    Returns:
      ``[B] int32`` lengths ``starts + counts``, produced after the write.
    """
    _check_open(manager)
    cfg = manager.config
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < cfg.num_layers:
        raise CacheValueError(f"layer must be an int in [0, {cfg.num_layers}), got {layer!r}")
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        shape, dtype = jnp.shape(x), jnp.result_type(x)
        if len(shape) != 4 or tuple(shape[2:]) != (cfg.kv_heads, cfg.head_dim):
            raise CacheValueError(f"{name} must be [B, T, {cfg.kv_heads}, {cfg.head_dim}], got {shape}")
        if dtype != cfg.jnp_dtype:
            raise CacheValueError(f"{name} must be {cfg.dtype} like the cache, got {dtype}")
    if jnp.shape(k_new) != jnp.shape(v_new):
        raise CacheValueError(f"k_new {jnp.shape(k_new)} and v_new {jnp.shape(v_new)} differ in shape")
    batch = jnp.shape(k_new)[0]
    for name, x in (("slots", slots), ("starts", starts), ("counts", counts)):
        _check_rows(name, x, batch)
    call = jax.ffi.ffi_call("vattn_write", jax.ShapeDtypeStruct((batch,), jnp.int32),
                            has_side_effect=bool(has_side_effect))
    return call(k_new, v_new, slots, starts, counts, manager_id=np.uint64(manager.id), layer=np.int64(layer))
