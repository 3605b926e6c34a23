"""Conformance: the vAttention cache and the static and paged baselines run through the same cases.

Every pool is a ``KVPool`` and every step cache a ``KVCacheLike``; the cases call
them only through the protocol (no type switch), as the model and the scheduler do.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_vattention.attention import AttentionSpec, dense_causal_attention
from jax_vattention.cache import GROWN, KVCacheLike, KVPool
from jax_vattention.engine.config import KV_CACHES, EngineConfig
from jax_vattention.engine.llm import make_pool
from jax_vattention.errors import CacheClosedError

MODEL = types.SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=16)
HQ = 4
REF = AttentionSpec(impl="reference")
TOKEN_BYTES = 2 * 16 * 4  # one token of one K (or V) tensor, fp32


# Every KV memory: the vAttention cache in both layouts (default: every layer interleaved per token, 8 tokens per
# 4 KiB page here; per-layer tensors: 32 tokens per page), and the paged (16-token blocks) and static baselines.
KINDS = ["vattention-per-layer", *KV_CACHES]


def pool_for(kind: str, max_batch: int = 3, max_seq: int = 64, pool_tokens: int | None = None) -> KVPool:
    """``kind``'s pool; ``pool_tokens`` bounds the budget to about that many tokens in all."""
    budget = None if pool_tokens is None else 2 * MODEL.num_layers * pool_tokens * TOKEN_BYTES
    layout = dict(kv_cache="vattention", layers_per_group=1) if kind == "vattention-per-layer" else dict(kv_cache=kind)
    cfg = EngineConfig(**layout, max_batch=max_batch, max_seq=max_seq, pool_bytes=budget, page_bytes=4096,
                       page_size=16)
    return make_pool(MODEL, cfg, "float32")


@functools.partial(jax.jit, static_argnums=1)
def write_and_attend(cache, layer, k, v, q):
    """One layer of a step through the protocol, jitted as a model step is: ``(lengths, out, exported)``."""
    lengths, cache = cache.write(layer, k, v)
    return lengths, cache.attention(layer, q, lengths, REF), cache.export()


def take(pool, tokens):
    alloc = pool.allocate(tokens)
    assert alloc.result.ok and alloc.slot is not None, alloc.result
    return alloc.slot


@pytest.mark.parametrize("kind", KINDS)
def test_pool_and_cache_implement_the_protocols(kind):
    pool = pool_for(kind)
    try:
        assert isinstance(pool, KVPool)
        slot = take(pool, 5)
        cache = pool.cache(np.array([slot], np.int32), np.zeros(1, np.int32), np.full(1, 5, np.int32))
        assert isinstance(cache, KVCacheLike)
        np.testing.assert_array_equal(np.asarray(cache.lengths), [5])
        np.testing.assert_array_equal(np.asarray(cache.num_new), [5])
        assert cache.restore(cache.export()).state is not None
        pool.free(slot)
    finally:
        pool.close()


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_then_decode_reads_what_was_written(kind, rng):
    """Write a ragged prefill and one decode token per row, attend through the protocol, match dense attention."""
    pool = pool_for(kind)
    try:
        lens = np.array([31, 32, 33], np.int32)  # around the 32-token vAttention page and the 16-token block
        b, t = len(lens), int(lens.max()) + 1
        slots = [take(pool, 0) for _ in range(b)]
        for s, n in zip(slots, lens):
            assert pool.grow(s, int(n)) == GROWN
        k = jnp.asarray(rng.standard_normal((b, t, 2, 16)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((b, t, 2, 16)), jnp.float32)
        q = jnp.asarray(rng.standard_normal((b, t, HQ, 16)), jnp.float32)
        want = np.asarray(dense_causal_attention(q, k, v))  # [B, T, Hq, D]
        slots_a = np.array(slots, np.int32)
        for layer in range(MODEL.num_layers):
            cache = pool.cache(slots_a, np.zeros(b, np.int32), lens)
            lengths, got, exported = write_and_attend(cache, layer, k[:, :-1] * (layer + 1), v[:, :-1],
                                                      q[:, :-1] * (layer + 1))
            np.testing.assert_array_equal(np.asarray(lengths), lens)
            got = np.asarray(got)
            for i, n in enumerate(lens):
                want_l = np.asarray(dense_causal_attention(q[i:i + 1, :n] * (layer + 1), k[i:i + 1, :n] * (layer + 1),
                                                           v[i:i + 1, :n]))[0]
                np.testing.assert_allclose(got[i, :n], want_l, atol=2e-5, rtol=2e-5, err_msg=f"{kind} layer {layer}")
            pool.adopt(exported)
        # one decode token per row, at each row's own position
        for s, n in zip(slots, lens):
            assert pool.grow(s, int(n) + 1).ok
        cache = pool.cache(slots_a, lens, np.ones(b, np.int32))
        pos = jnp.asarray(lens)
        k1, v1 = k[jnp.arange(b), pos][:, None], v[jnp.arange(b), pos][:, None]  # [B, 1, Hkv, D]
        lengths, got, exported = write_and_attend(cache, 0, k1, v1, q[jnp.arange(b), pos][:, None])
        np.testing.assert_array_equal(np.asarray(lengths), lens + 1)
        got = np.asarray(got)[:, 0]
        for i, n in enumerate(lens):
            kk = jnp.concatenate([k[i, :n], k1[i]])[None]
            vv = jnp.concatenate([v[i, :n], v1[i]])[None]
            qq = jnp.concatenate([q[i, :n], q[i, n:n + 1]])[None]
            np.testing.assert_allclose(got[i], np.asarray(dense_causal_attention(qq, kk, vv))[0, -1],
                                       atol=2e-5, rtol=2e-5, err_msg=f"{kind} decode row {i}")
        pool.adopt(exported)
        assert want.shape == (b, t, HQ, 16)
        for s in slots:
            pool.free(s)
    finally:
        pool.close()


@pytest.mark.parametrize("kind", KINDS)
def test_running_out_is_a_typed_result_and_changes_nothing(kind):
    """A full pool answers with an exhausted result (no exception), and holds nothing more for it."""
    pool = pool_for(kind, max_batch=2, max_seq=128, pool_tokens=128)  # one request of 128 tokens fits
    try:
        a = take(pool, 16)
        assert pool.grow(a, 128).ok and pool.capacity(a) >= 128
        live = pool.pages_live()
        full = pool.allocate(1)
        assert full.slot is None and full.result.exhausted and full.result.fault is None and full.result.reason
        assert pool.pages_live() == live and pool.capacity(a) >= 128
        pool.free(a)
        assert pool.pages_live() == 0
        a, b = take(pool, 16), pool.allocate(16)
        if b.slot is not None:  # block-granular pools hold two short requests; then the first cannot grow
            cap, live = pool.capacity(a), pool.pages_live()
            result = pool.grow(a, 128)
            assert result.exhausted and result.reason
            assert pool.capacity(a) == cap and pool.pages_live() == live
            pool.free(b.slot)
        else:  # the static pool: one whole max_seq slot is all the budget holds
            assert b.result.exhausted
        pool.free(a)
    finally:
        pool.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_closed_pool_refuses_everything(kind):
    pool = pool_for(kind)
    slot = take(pool, 1)
    pool.close()
    pool.close()  # idempotent
    for call in (lambda: pool.allocate(1), lambda: pool.grow(slot, 2), lambda: pool.free(slot),
                 lambda: pool.cache([slot], [0], [1])):
        with pytest.raises(CacheClosedError):
            call()
