"""Jit-side generation: prefill, one decode step, and the multi-step ``lax.while_loop``.

Traced building blocks (call them inside your own jit)::

    logits, cache = prefill(model, tokens, counts, cache, attn)        # [B, V]
    tokens, logits, cache = decode_step(model, tokens, cache, attn, rows)  # grow by 1, forward, sample

and the top-level jitted programs the generator runs (``programs``). Following
the library's copy-free rules, a cache whose ``donates`` is False (the
vAttention views) is an ordinary non-donated argument and the programs return
only ``cache.export()`` (its state); a donated cache (XLA buffers) comes back whole. Every grow happens inside
the graph: the decode loop maps pages through the FFI grow call as rows cross
page boundaries, with no host round-trip per token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jax_vattention.attention import AttentionSpec
from jax_vattention.sampling import SamplingRows, sample_rows


def prefill(model, tokens, counts, cache, attn: AttentionSpec):
    """Append ``counts[b]`` tokens of ``tokens [B, T]`` to each row; logits of each row's last new token.

    Grows the cache (pages mapped in-graph), writes K/V for the new tokens of
    every layer and attends causally over each row's prefix. Rows with
    ``counts == 0`` grow by nothing; their logits are meaningless.
    Returns ``(logits [B, V] fp32, cache)``.
    """
    cache = cache.grow(cache.lengths + counts)
    starts = cache.lengths - counts  # [B]
    positions = starts[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]  # [B, T]
    last = jnp.maximum(counts - 1, 0)
    logits, cache = model(tokens, positions, cache, attn=attn, logit_index=last)
    return logits.astype(jnp.float32), cache


def decode_step(model, tokens, cache, attn: AttentionSpec, sampling: SamplingRows, mode: str = "greedy", *,
                alive=None):
    """Feed ``tokens [B]`` (one per row) and sample the next ones (``sampling.counts``: tokens generated so far).

    Rows with ``alive == False`` grow by 0 (no pages, nothing written); their
    outputs are meaningless. Returns ``(next_tokens [B], logits [B, V] fp32, cache)``.
    """
    grow = jnp.ones_like(cache.lengths) if alive is None else alive.astype(jnp.int32)
    cache = cache.grow(cache.lengths + grow)
    positions = jnp.maximum(cache.lengths - 1, 0)[:, None]  # [B, 1]
    zero = jnp.zeros_like(cache.lengths)
    logits, cache = model(tokens[:, None], positions, cache, attn=attn, logit_index=zero)
    logits = logits.astype(jnp.float32)
    return sample_rows(logits, sampling, mode), logits, cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCarry:
    """Per-row generation state that survives between decode-loop calls (small arrays only)."""

    step: jax.Array  # [] int32, decode steps run so far
    last: jax.Array  # [B] int32, last sampled token (the next input)
    n_gen: jax.Array  # [B] int32, tokens generated so far
    done: jax.Array  # [B] bool
    out: jax.Array  # [B, N] int32, generated tokens (-1 where none)


def start_carry(logits, sampling: SamplingRows, max_new, stop_ids, out_len: int, mode: str) -> DecodeCarry:
    """Sample each row's first token from its prefill logits."""
    b = logits.shape[0]
    first = dataclasses.replace(sampling, counts=jnp.zeros((b,), jnp.int32))
    tok = sample_rows(logits, first, mode)
    out = jnp.full((b, out_len), -1, jnp.int32).at[:, 0].set(tok)
    n_gen = jnp.ones((b,), jnp.int32)
    done = (n_gen >= max_new) | jnp.any(tok[:, None] == stop_ids, axis=1)
    return DecodeCarry(jnp.zeros((), jnp.int32), tok, n_gen, done, out)


def decode_loop(model, cache, carry: DecodeCarry, end_step, max_new, stop_ids, sampling: SamplingRows,
                attn: AttentionSpec, mode: str):
    """Run decode steps until ``end_step`` or every row is done; returns ``(carry, exported cache)``.

    One ``lax.while_loop``: each iteration grows the live rows by one token
    (the FFI grow maps a page when a row crosses a page boundary), runs the
    model on the last tokens, samples, and retires rows that hit a stop token
    or their ``max_new [B]``.
    """
    rows = jnp.arange(carry.last.shape[0])

    def cond(c):
        carry, _ = c
        return (carry.step < end_step) & ~jnp.all(carry.done)

    def body(c):
        carry, exported = c
        kv = cache.restore(exported)
        alive = ~carry.done
        rows_now = dataclasses.replace(sampling, counts=carry.n_gen)
        tok, _, kv = decode_step(model, carry.last, kv, attn, rows_now, mode, alive=alive)
        tok = jnp.where(alive, tok, carry.last)
        out = carry.out.at[rows, jnp.where(alive, carry.n_gen, carry.out.shape[1])].set(tok, mode="drop")
        n_gen = carry.n_gen + alive.astype(jnp.int32)
        stopped = jnp.any(tok[:, None] == stop_ids, axis=1) & alive
        done = carry.done | stopped | (n_gen >= max_new)
        return DecodeCarry(carry.step + 1, tok, n_gen, done, out), kv.export()

    return lax.while_loop(cond, body, (carry, cache.export()))


# -- top-level programs ----------------------------------------------------------
def _prefill_program(graphdef, params, cache, tokens, counts, prev_logits, *, attn):
    model = nnx.merge(graphdef, params)
    logits, cache = prefill(model, tokens, counts, cache, attn)
    logits = jnp.where((counts > 0)[:, None], logits, prev_logits)
    return logits, cache.export()


def _decode_program(graphdef, params, cache, carry, end_step, max_new, stop_ids, sampling, *, attn, mode):
    model = nnx.merge(graphdef, params)
    return decode_loop(model, cache, carry, end_step, max_new, stop_ids, sampling, attn, mode)


_STATIC = ("graphdef", "attn")
_PROGRAMS = {  # cache.donates -> (prefill, decode)
    False: (jax.jit(_prefill_program, static_argnames=_STATIC),
            jax.jit(_decode_program, static_argnames=(*_STATIC, "mode"))),
    True: (jax.jit(_prefill_program, static_argnames=_STATIC, donate_argnames=("cache",)),
           jax.jit(_decode_program, static_argnames=(*_STATIC, "mode"), donate_argnames=("cache",))),
}
start_program = jax.jit(start_carry, static_argnames=("out_len", "mode"))


def programs(donates: bool):
    """``(prefill, decode)`` jitted programs for a cache that is donated (XLA buffers) or read in place (views)."""
    return _PROGRAMS[donates]
