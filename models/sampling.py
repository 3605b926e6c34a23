"""Token sampling: greedy, temperature, top-k and top-p (nucleus), with explicit per-row PRNG keys.

Row b's i-th generated token is drawn with ``fold_in(row_keys[b], i)``, and
``row_keys[b] = fold_in(key, row_seed[b])``. A request therefore samples the
same tokens whether it runs alone or in a batch, and however the decode loop is
split into chunks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from .errors import GenerationInputError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings (a jit static argument). ``temperature == 0`` is greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise GenerationInputError(f"temperature must be >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationInputError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise GenerationInputError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def row_keys(key: jax.Array, row_seeds: jax.Array) -> jax.Array:
    """``[B]`` typed keys, ``fold_in(key, row_seeds[b])``."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_seeds)


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Temperature-scaled fp32 logits ``[B, V]`` with tokens outside top-k / top-p set to -inf."""
    logits = logits.astype(jnp.float32) / jnp.float32(cfg.temperature)
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = lax.top_k(logits, cfg.top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        keep = before < cfg.top_p  # the smallest prefix reaching top_p (first token always kept)
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample(logits: jax.Array, keys: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Next token per row: ``logits [B, V]``, ``keys [B]`` -> ``[B] int32``."""
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, cfg)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def step_keys(keys: jax.Array, counts: jax.Array) -> jax.Array:
    """Per-row keys for the ``counts[b]``-th token of row b."""
    return jax.vmap(jax.random.fold_in)(keys, counts)
