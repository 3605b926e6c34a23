"""Megatron-style tensor parallelism for the Llama family, through shardings only (issue 19).

``shard_model(model, mesh)`` places every parameter with a ``NamedSharding`` over the mesh's one axis; XLA's SPMD
partitioner then splits the matmuls and inserts the all-reduces:

* column-parallel (output features split): ``q_proj``, ``k_proj``, ``v_proj`` (so each device holds whole heads,
  ``num_heads / tp`` and ``num_kv_heads / tp`` of them, in contiguous blocks), ``gate_proj``, ``up_proj``;
* row-parallel (input features split): ``o_proj``, ``down_proj`` (their products are all-reduced);
* the embedding and the LM head split over the vocabulary;
* norms (and a row-parallel layer's bias) replicated.

Attention runs per device on its heads with a ``ShardedKVCache`` (``jax_vattention.cache.sharded``), whose KV
heads are split the same way.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .errors import UnsupportedModelError

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def param_spec(path: tuple[str, ...], ndim: int, axis: str) -> P:
    """The ``PartitionSpec`` of the parameter at ``path`` (module names, then ``kernel``/``bias``/...)."""
    module, leaf = (path[-2] if len(path) > 1 else ""), path[-1]
    if module in COLUMN:
        return P(None, axis) if leaf == "kernel" else P(axis)  # kernel [in, out]; bias [out]
    if module in ROW:
        return P(axis, None) if leaf == "kernel" else P()
    if module == "embed_tokens":
        return P(axis, None)  # [V, H]
    if module == "lm_head":
        return P(None, axis) if leaf == "kernel" else P(axis)  # [H, V]
    return P(*([None] * ndim))


def check_divisible(cfg, tp: int) -> None:
    for name in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
        if getattr(cfg, name) % tp:
            raise UnsupportedModelError(f"{name}={getattr(cfg, name)} is not divisible by tensor_parallel={tp}")


def param_sharding(path, ndim: int, mesh: Mesh, axis: str = "tp") -> NamedSharding:
    """The ``NamedSharding`` of the parameter at ``path``: a pytree key path or a flat state's key tuple."""
    names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return NamedSharding(mesh, param_spec(tuple(n for n in names if n != "value"), ndim, axis))


def shardings_of(state, mesh: Mesh, axis: str = "tp"):
    """The ``NamedSharding`` of every leaf of an NNX ``state`` (a pytree of the same structure)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: param_sharding(path, len(x.shape), mesh, axis), state)


def shard_model(model, mesh: Mesh, axis: str = "tp"):
    """Place ``model``'s parameters over ``mesh`` (module docstring); returns the model, updated in place."""
    check_divisible(model.config, mesh.shape[axis])
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(state, shardings_of(state, mesh, axis)))
    return model
