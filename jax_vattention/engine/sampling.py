"""On-device sampling with per-row parameters, so an engine step returns token ids, not logits.

Copying ``[B, V]`` fp32 logits to the host every step would cost more than a
small model's forward (16 MiB per step at B=32, V=128K). Each row has its own
temperature, top-k, top-p and seed; row b's key is
``fold_in(PRNGKey(seed[b]), n[b])`` with ``n[b]`` the tokens it has generated,
so a request samples the same tokens in any batch. The filters match
``models.sampling.filter_logits`` (top-k first, then top-p over what is left).

``mode`` is static, so a batch that is all greedy compiles no sort and no
categorical draw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ("greedy", "sample", "filter")


def sampling_mode(params) -> str:
    """The cheapest static mode covering every ``SamplingParams`` in a step."""
    random = [p for p in params if p.temperature > 0 and p.top_k != 1]
    if not random:
        return "greedy"
    if any(p.top_k > 0 or p.top_p < 1 for p in random):
        return "filter"
    return "sample"


def _filter(logits, top_k, top_p):
    """Per-row top-k / top-p cut of temperature-scaled ``logits [R, V]`` (-inf outside)."""
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [R, V] descending
    k = jnp.clip(top_k, 1, vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # [R, 1]
    use_k = (top_k > 0)[:, None]
    logits = jnp.where(use_k & (logits < kth), -jnp.inf, logits)
    ordered = jnp.where(use_k & (ordered < kth), -jnp.inf, ordered)  # still descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    keep = before < top_p[:, None]
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)  # [R, 1]
    return jnp.where((top_p < 1)[:, None] & (logits < cutoff), -jnp.inf, logits)


def sample_rows(logits, temperature, top_k, top_p, seeds, counts, mode: str):
    """Next token per row of fp32 ``logits [R, V]``; every other argument is ``[R]``. Returns ``[R] int32``."""
    if mode not in MODES:
        raise ValueError(f"sampling mode must be one of {MODES}, got {mode!r}")
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    is_greedy = (temperature == 0) | (top_k == 1)
    scaled = logits / jnp.where(is_greedy, 1.0, temperature)[:, None]
    if mode == "filter":
        scaled = _filter(scaled, top_k, top_p)
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.PRNGKey(s), n))(seeds, counts)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(is_greedy, greedy, drawn)
