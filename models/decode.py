"""Jit-side generation: prefill, one decode step, and the multi-step ``lax.while_loop``.

Traced building blocks (call them inside your own jit)::

    logits, cache = prefill(model, tokens, counts, cache, attn)        # [B, V]
    tokens, logits, cache = decode_step(model, tokens, cache, attn)    # grow by 1, forward, sample

and the top-level jitted programs the generator runs, ``prefill_program`` and
``decode_program`` (vAttention and static-cache variants). Following the
library's copy-free rules, the vAttention variants take the cache views as
ordinary non-donated arguments and return only ``cache.state``; the static
variants donate their XLA buffers and return them. Every grow happens inside
the graph: the decode loop maps pages through the FFI grow call as rows cross
page boundaries, with no host round-trip per token.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jax_vattention import KVCache, VAttentionError
from jax_vattention.hlo import assert_no_cache_copy

from .attention import AttentionSpec
from .sampling import SamplingConfig, sample, step_keys


def export_cache(cache):
    """What a top-level jit may return: the state of a vAttention cache, a whole static cache."""
    return cache.state if isinstance(cache, KVCache) else cache


def import_cache(template, exported):
    return template.with_state(exported) if isinstance(template, KVCache) else exported


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


def decode_step(model, tokens, cache, attn: AttentionSpec, *, alive=None, sampling=SamplingConfig(), keys=None):
    """Feed ``tokens [B]`` (one per row) and sample the next ones.

    Rows with ``alive == False`` grow by 0 (no pages, nothing written); their
    outputs are meaningless. Returns ``(next_tokens [B], logits [B, V] fp32, cache)``.
    """
    grow = jnp.ones_like(cache.lengths) if alive is None else alive.astype(jnp.int32)
    cache = cache.grow(cache.lengths + grow)
    positions = jnp.maximum(cache.lengths - 1, 0)[:, None]  # [B, 1]
    zero = jnp.zeros_like(cache.lengths)
    logits, cache = model(tokens[:, None], positions, cache, attn=attn, logit_index=zero)
    logits = logits.astype(jnp.float32)
    return sample(logits, keys, sampling), logits, cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCarry:
    """Per-row generation state that survives between decode-loop calls (small arrays only)."""

    step: jax.Array  # [] int32, decode steps run so far
    last: jax.Array  # [B] int32, last sampled token (the next input)
    n_gen: jax.Array  # [B] int32, tokens generated so far
    done: jax.Array  # [B] bool
    out: jax.Array  # [B, N] int32, generated tokens (-1 where none)


def start_carry(logits, keys, max_new, stop_ids, out_len: int, sampling: SamplingConfig) -> DecodeCarry:
    """Sample each row's first token from its prefill logits."""
    b = logits.shape[0]
    tok = sample(logits, step_keys(keys, jnp.zeros((b,), jnp.int32)), sampling)
    out = jnp.full((b, out_len), -1, jnp.int32).at[:, 0].set(tok)
    n_gen = jnp.ones((b,), jnp.int32)
    done = (n_gen >= max_new) | jnp.any(tok[:, None] == stop_ids, axis=1)
    return DecodeCarry(jnp.zeros((), jnp.int32), tok, n_gen, done, out)


def decode_loop(model, cache, carry: DecodeCarry, end_step, max_new, stop_ids, keys, attn: AttentionSpec,
                sampling: SamplingConfig):
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
        kv = import_cache(cache, exported)
        alive = ~carry.done
        tok, _, kv = decode_step(model, carry.last, kv, attn, alive=alive, sampling=sampling,
                                 keys=step_keys(keys, carry.n_gen))
        tok = jnp.where(alive, tok, carry.last)
        out = carry.out.at[rows, jnp.where(alive, carry.n_gen, carry.out.shape[1])].set(tok, mode="drop")
        n_gen = carry.n_gen + alive.astype(jnp.int32)
        stopped = jnp.any(tok[:, None] == stop_ids, axis=1) & alive
        done = carry.done | stopped | (n_gen >= max_new)
        return DecodeCarry(carry.step + 1, tok, n_gen, done, out), export_cache(kv)

    return lax.while_loop(cond, body, (carry, export_cache(cache)))


# -- top-level programs ----------------------------------------------------------
def _prefill_program(graphdef, params, cache, tokens, counts, prev_logits, *, attn):
    model = nnx.merge(graphdef, params)
    logits, cache = prefill(model, tokens, counts, cache, attn)
    logits = jnp.where((counts > 0)[:, None], logits, prev_logits)
    return logits, export_cache(cache)


def _decode_program(graphdef, params, cache, carry, end_step, max_new, stop_ids, keys, *, attn, sampling):
    model = nnx.merge(graphdef, params)
    return decode_loop(model, cache, carry, end_step, max_new, stop_ids, keys, attn, sampling)


_STATIC = ("graphdef", "attn")
prefill_program = jax.jit(_prefill_program, static_argnames=_STATIC)
prefill_program_static = jax.jit(_prefill_program, static_argnames=_STATIC, donate_argnames=("cache",))
decode_program = jax.jit(_decode_program, static_argnames=(*_STATIC, "sampling"))
decode_program_static = jax.jit(_decode_program, static_argnames=(*_STATIC, "sampling"), donate_argnames=("cache",))
start_program = jax.jit(start_carry, static_argnames=("out_len", "sampling"))


def programs(static_cache: bool):
    """``(prefill, decode)`` jitted programs for a static or a vAttention cache."""
    if static_cache:
        return prefill_program_static, decode_program_static
    return prefill_program, decode_program



# -- copy guard for compiled programs ----------------------------------------------
_COMP = re.compile(r"^(?P<entry>ENTRY\s+)?%(?P<name>[\w.\-]+)\s+\(.*\{\s*$")
_INST = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s(?P<op>[\w\-]+)\((?P<args>[^)]*)\)(?P<rest>.*)$")
_DIMS = re.compile(r"^[a-z0-9]+\[([0-9,]*)\]")
_COPIES = ("copy", "copy-start", "transpose")
_PASS_THROUGH = ("bitcast", "reshape", "copy", "copy-start", "copy-done", "transpose")


def _parse_hlo(text: str):
    """Computations ``{name: {instruction: (type, op, args)}}``, the ENTRY name, and call sites per callee."""
    comps, entry, current, callers = {}, None, None, {}
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            current = comps.setdefault(m["name"], {})
            entry = m["name"] if m["entry"] else entry
            continue
        m = _INST.match(line)
        if m is None or current is None:
            continue
        args = [a.strip().lstrip("%") for a in m["args"].split(",") if a.strip()]
        current[m["name"]] = (m["type"], m["op"], args)
        for callee in re.findall(r"calls=%([\w.\-]+)", m["rest"]):
            callers.setdefault(callee, []).append((current, args))
    return comps, entry, callers


def _dims(typ: str):
    m = _DIMS.match(typ)
    return tuple(int(d) for d in m[1].split(",") if d) if m else None


def copies_of_views(text: str, view_dims: tuple) -> list[str]:
    """Copy / transpose instructions whose operand is (a bitcast, reshape or fusion parameter of) an
    ENTRY parameter shaped like a cache view: what a layout change or a returned view looks like."""
    comps, entry, callers = _parse_hlo(text)
    names = {id(c): n for n, c in comps.items()}

    def is_view(comp, name, seen) -> bool:
        if (id(comp), name) in seen or name not in comp:
            return False
        seen.add((id(comp), name))
        typ, op, args = comp[name]
        if op == "parameter":
            if names[id(comp)] == entry:
                return _dims(typ) == view_dims
            i = int(args[0])  # parameter i of a fused / called computation: operand i at each call site
            sites = callers.get(names[id(comp)], [])
            return any(i < len(ops) and is_view(caller, ops[i], seen) for caller, ops in sites)
        return op in _PASS_THROUGH and bool(args) and is_view(comp, args[0], seen)

    return [name for comp in comps.values() for name, (typ, op, args) in comp.items()
            if op in _COPIES and args and is_view(comp, args[0], set())]


def check_compiled(text: str, manager, *, strict: bool) -> None:
    """Refuse a compiled program that copies a cache view.

    ``strict``: ``jax_vattention.hlo.assert_no_cache_copy`` - no copy or transpose
    at least as large as a cache tensor; right for the decode loop, where every
    activation is far smaller than the cache. A prefill's activations (the
    kernels' GQA re-layout of ``q [B, T, Hq, D]``, the reference's scores) can
    legitimately exceed a small cache, so prefill programs are checked for
    copies whose operand is a cache view (``copies_of_views``).
    """
    if strict:
        assert_no_cache_copy(text, manager)
        return
    c = manager.config
    found = copies_of_views(text, (c.max_batch, manager.max_seq, c.kv_heads, c.head_dim))
    if found:
        raise VAttentionError(
            f"the compiled program copies a cache view ({found[:4]}); on a sparsely mapped cache that copy reads "
            "unmapped memory. Read the cache with dynamic_slice, a gather or a Pallas kernel; never return or donate "
            "the views.")
