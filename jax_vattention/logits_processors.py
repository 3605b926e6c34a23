"""The sampler's logits processors on the device (vLLM v1's), each beside a plain-jnp reference.

Every processor works on fp32 ``logits [R, V]`` with per-row settings ``[R]``;
token-id inputs ``[R, H]`` are padded with ``PAD_ID``, an id past any
vocabulary that the scatters drop. ``jax_vattention.sampling.sample`` applies
them in vLLM v1's order: ``ban_tokens`` (min_tokens) -> ``apply_penalties`` ->
greedy argmax -> temperature -> ``apply_min_p`` -> ``top_k_top_p`` -> draw;
``gather_logprobs`` reads the raw logits.

The references (``*_reference``) take one request's settings as Python scalars
and token lists and are written independently (``bincount`` instead of
scatters, log-space min-p, ``argsort`` instead of ``lax.top_k``), so the tests
can compare the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PAD_ID = 2**31 - 1  # padding of the [R, H] token-id inputs: out of range for any vocabulary, dropped


# -- device, per row -------------------------------------------------------------------------
def _rows(ids):
    return jnp.arange(ids.shape[0])[:, None]  # [R, 1]


def ban_tokens(logits, banned_ids):
    """``logits [R, V]`` with every id of ``banned_ids [R, S]`` (``PAD_ID``-padded) set to -inf."""
    return logits.at[_rows(banned_ids), banned_ids].set(-jnp.inf, mode="drop")


def token_counts(ids, vocab: int):
    """How often each id occurs in each row of ``ids [R, H]`` (``PAD_ID`` dropped): ``[R, V] int32``.

    One scatter-add of ``R * H`` ones into ``R * V`` zeros: about the cost of one elementwise pass over the logits.
    """
    return jnp.zeros((ids.shape[0], vocab), jnp.int32).at[_rows(ids), ids].add(1, mode="drop")


def apply_penalties(logits, output_ids, prompt_ids, presence, frequency, repetition):
    """vLLM's ``apply_penalties`` on ``logits [R, V]``.

    ``output_ids [R, Ho]``: each row's generated tokens; ``prompt_ids [R, Hp]``: its prompt's ids (repeats
    allowed); both ``PAD_ID``-padded. The repetition penalty divides positive logits and multiplies the others of
    every token seen in the prompt or the output; then ``frequency * count`` and ``presence * (count > 0)`` over
    the output are subtracted. Neutral settings (1, 0, 0) leave a row bit-identical.
    """
    vocab = logits.shape[-1]
    counts = token_counts(output_ids, vocab)  # [R, V]
    in_output = counts > 0
    in_prompt = jnp.zeros(logits.shape, bool).at[_rows(prompt_ids), prompt_ids].set(True, mode="drop")  # [R, V]
    penalty = jnp.where(in_prompt | in_output, repetition[:, None], 1.0)  # [R, V]
    logits = logits * jnp.where(logits > 0, 1.0 / penalty, penalty)
    logits = logits - frequency[:, None] * counts
    return logits - presence[:, None] * in_output


def apply_min_p(logits, min_p):
    """Drop (-inf) the tokens of temperature-scaled ``logits [R, V]`` less likely than ``min_p [R]`` x the top one's."""
    probs = jax.nn.softmax(logits, axis=-1)  # [R, V]
    top = jnp.max(probs, axis=-1, keepdims=True)  # [R, 1]
    return jnp.where(probs < top * min_p[:, None], -jnp.inf, logits)


def top_k_top_p(logits, top_k, top_p):
    """Per-row top-k then top-p cut of temperature-scaled ``logits [R, V]`` (-inf outside); one sort."""
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


def gather_logprobs(logits, tokens, k: int):
    """vLLM v1's raw logprobs of ``logits [R, V]``: the ``tokens [R]``'s logprob ``[R]`` and rank ``[R]`` (how many
    tokens are at least as likely, so the top token has rank 1), and the top-``k`` ids and logprobs ``[R, k]``."""
    lp = jax.nn.log_softmax(logits, axis=-1)  # [R, V]
    token_lp = jnp.take_along_axis(lp, tokens[:, None], axis=-1)  # [R, 1]
    rank = jnp.sum(lp >= token_lp, axis=-1, dtype=jnp.int32)  # [R]
    if k:
        top_lp, top_ids = jax.lax.top_k(lp, k)  # [R, k]
    else:
        top_lp, top_ids = jnp.zeros((lp.shape[0], 0), lp.dtype), jnp.zeros((lp.shape[0], 0), jnp.int32)
    return token_lp[:, 0], rank, top_ids.astype(jnp.int32), top_lp


# -- references: one request, scalar settings ---------------------------------------------------
def filter_logits_reference(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Plain-jnp reference of one request's filters: temperature-scaled fp32 ``logits [B, V]``, -inf outside.

    Written independently of ``top_k_top_p`` (scalar settings, ``lax.top_k``), so the tests can compare the two.
    """
    logits = logits.astype(jnp.float32) / jnp.float32(temperature)
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        keep = before < top_p  # the smallest prefix reaching top_p (first token always kept)
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def penalize_reference(logits, output: Sequence[int], prompt: Sequence[int], banned: Sequence[int] = (), *,
                       presence: float = 0.0, frequency: float = 0.0, repetition: float = 1.0) -> jax.Array:
    """One request's logits ``[V]`` after the min_tokens ban and the penalties (vLLM's definitions).

    The histories become ``[V]`` counts on the host (``np.bincount``), so every jnp op here has one shape.
    """
    vocab = logits.shape[-1]
    out = np.bincount(np.asarray(output, np.int64), minlength=vocab)[:vocab]  # [V]
    seen = (out > 0) | (np.bincount(np.asarray(prompt, np.int64), minlength=vocab)[:vocab] > 0)
    ban = np.bincount(np.asarray(banned, np.int64), minlength=vocab)[:vocab] > 0
    x = jnp.where(ban, -jnp.inf, jnp.asarray(logits, jnp.float32))
    x = jnp.where(seen & (x > 0), x / repetition, jnp.where(seen, x * repetition, x))
    return x - (frequency * out + presence * (out > 0)).astype(np.float32)


def min_p_reference(scaled, min_p: float) -> jax.Array:
    """One request's temperature-scaled logits ``[V]`` after min-p, in log space: p < min_p * p_max."""
    if min_p <= 0:
        return scaled
    return jnp.where(scaled - jnp.max(scaled) < jnp.log(jnp.float32(min_p)), -jnp.inf, scaled)


def logprobs_reference(logits, token: int, k: int) -> tuple[float, int, list[int], list[float]]:
    """One row's raw logprobs as Python values: the token's logprob and rank, the top-``k`` ids and logprobs."""
    x = np.asarray(logits, np.float64)
    lp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))  # [V]
    order = np.argsort(-lp, kind="stable")[:k]
    return float(lp[token]), int(np.count_nonzero(lp >= lp[token])), order.tolist(), lp[order].tolist()
