"""What the engine needs of a model: ``CausalLM``, a structural protocol (``models`` implements it)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from ..attention.dispatch import AttentionSpec

# One row group of a step: rows ``[r0, r1)``, each with ``t`` tokens laid out flat.
Segment = tuple[int, int, int]


@runtime_checkable
class CausalLMConfig(Protocol):
    """The model facts the engine sizes the cache and stops requests with."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_position_embeddings: int


@runtime_checkable
class CausalLM(Protocol):
    """A decoder the engine can run on any cache of ``jax_vattention.cache``."""

    config: Any  # a CausalLMConfig

    def forward_segments(self, tokens: jax.Array, positions: jax.Array, cache: Any,
                         segments: tuple[Segment, ...], *, attn: AttentionSpec,
                         logit_index: jax.Array) -> tuple[jax.Array, Any]:
        """Forward flat ``tokens [N]`` at ``positions [N]`` laid out in row groups ``segments``.

        Row group ``(r0, r1, t)`` holds rows ``r0..r1-1`` of the cache, ``t`` tokens
        each. Returns ``(logits [R, V], cache)`` for the flat token indices ``logit_index [R]``.
        """
        ...

    def forward_packed(self, tokens: jax.Array, positions: jax.Array, cache: Any, rows: Any, *,
                       attn: AttentionSpec, logit_index: jax.Array) -> tuple[jax.Array, Any]:
        """Forward a packed step: flat ``tokens [N]`` at ``positions [N]``, rows of any lengths one after the
        other as ``rows`` (``jax_vattention.packing.PackedRows``) lays them out; each layer calls the cache's
        ``write_packed`` and ``attention_packed``. Returns ``(logits [R, V], cache)`` for ``logit_index [R]``."""
        ...


def check_model(model: Any) -> None:
    """Raise ``TypeError`` naming what ``model`` lacks to be a ``CausalLM``."""
    if model is None or not isinstance(model, CausalLM):
        raise TypeError(f"model must implement jax_vattention.engine.CausalLM (a `config` and "
                        f"`forward_segments` and `forward_packed`), got {type(model).__name__}")
    missing = [f for f in ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "eos_token_ids")
               if not hasattr(model.config, f)]
    if missing:
        raise TypeError(f"model.config lacks {missing} (see jax_vattention.engine.CausalLMConfig)")
