"""Tests of the PagedAttention baseline cache (``jax_vattention.cache.paged``), CPU only.

The paged cache must mean exactly what the contiguous caches mean: writes land at the
right token of the right row through fragmented block tables, attention (JAX's Pallas
``paged_attention`` for decode in interpret mode, gathered prefix + our prefill kernel for
chunks, or the jnp reference) matches the reference on an equivalent contiguous cache, a
model gives the static cache's logits, and the host pool's accounting is exact. Inputs are
fresh random numbers each run (the seed is printed; replay with ``VATTN_TEST_SEED``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from jax_vattention import attention as attn
from jax_vattention.attention import AttentionSpec
from jax_vattention.cache import PagedKVCache, PagedKVPool
from jax_vattention.cache.paged import decode_blocking
from jax_vattention.errors import CacheClosedError, CacheValueError, PoolExhaustedError

PAGE = 16
BF16 = jnp.bfloat16


def make_pool(**kw) -> PagedKVPool:
    shape = dict(num_layers=1, max_batch=8, max_seq=64, kv_heads=2, head_dim=64, dtype=BF16, page_size=PAGE)
    return PagedKVPool(**{**shape, **kw})


def dense_view(cache: PagedKVCache, layer: int, which: str = "k") -> np.ndarray:
    """The rows' tokens read back through their block tables: ``[B, pps * page, Hkv, D]``."""
    pages = np.asarray(getattr(cache, which)[layer].astype(jnp.float32))  # [Hkv, P+1, page, D]
    g = pages[:, np.asarray(cache.state.block_tables)]  # [Hkv, B, pps, page, D]
    return g.transpose(1, 2, 3, 0, 4).reshape(g.shape[1], -1, pages.shape[0], pages.shape[-1])


def take(pool, tokens: int = 0) -> int:
    """A slot the pool must be able to back for ``tokens`` (typed results: nothing raised for a full pool)."""
    alloc = pool.allocate(tokens)
    assert alloc.result.ok and alloc.slot is not None, alloc.result
    return alloc.slot


def fill_rows(pool, rng, starts, counts, hkv, d):
    """Allocate one slot per row, write ``starts`` prefix tokens, then return the chunk step's cache.

    Returns ``(cache after the prefix, slots, k_full, v_full)``; ``k_full [B, S, Hkv, D]`` holds
    every row's tokens (prefix and chunk) contiguously, the reference layout.
    """
    b = len(starts)
    slots = [take(pool, 0) for _ in range(b)]
    for i in rng.permutation(b):  # grow in random order: interleaved, fragmented tables
        pool.grow(slots[i], int(starts[i] + counts[i]))
    k_full = jnp.asarray(rng.standard_normal((b, pool.max_seq, hkv, d), np.float32), BF16)
    v_full = jnp.asarray(rng.standard_normal((b, pool.max_seq, hkv, d), np.float32), BF16)
    tp = max(1, int(max(starts)))
    c = pool.cache(slots, np.zeros(b), starts)
    _, c = c.write(0, k_full[:, :tp], v_full[:, :tp])
    pool.adopt(c)
    return slots, k_full, v_full


def chunk_of(x, starts, t):
    """``x[b, starts[b] + i]`` for ``i < t``: ``[B, T, ...]`` (clamped at the end)."""
    idx = np.minimum(np.asarray(starts)[:, None] + np.arange(t)[None], x.shape[1] - 1)
    return x[np.arange(x.shape[0])[:, None], idx]


# lengths 1, a page boundary and +-1, several pages; decode rows: start = length - 1
DECODE_LENGTHS = [1, 15, 16, 17, 33, 64]
# (start, count) chunks: from 0, ending on / crossing page boundaries, up to max_seq
PREFILL_ROWS = [(0, 1), (0, 16), (15, 2), (16, 7), (17, 15), (48, 16)]


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("group", [1, 4])
def test_write_and_attention_match_reference(rng, impl, mode, group):
    hkv, d = 2, 64
    if mode == "decode":
        starts = np.array([n - 1 for n in DECODE_LENGTHS])
        counts, t = np.ones_like(starts), 1
    else:
        starts, counts = (np.array(x) for x in zip(*PREFILL_ROWS))
        t = 16
    with make_pool(kv_heads=hkv, head_dim=d) as pool:
        slots, k_full, v_full = fill_rows(pool, rng, starts, counts, hkv, d)
        # two padding rows: slot -1, and the engine's kind (a live slot with nothing pending)
        b = len(starts)
        c = pool.cache(slots + [-1, slots[0]], np.r_[starts, 0, 0], np.r_[counts, 3, 0])
        k_new = jnp.concatenate([chunk_of(k_full, starts, t), jnp.ones((2, t, hkv, d), BF16)])
        v_new = jnp.concatenate([chunk_of(v_full, starts, t), jnp.ones((2, t, hkv, d), BF16)])
        lengths, c = c.write(0, k_new, v_new)
        q = jnp.asarray(rng.standard_normal((b + 2, t, hkv * group, d), np.float32), BF16)
        spec = AttentionSpec(impl=impl, interpret=True)
        out = c.attention(0, q, lengths, spec)

        ends = starts + counts
        got = dense_view(c, 0)[:b]
        for r in range(b):  # every written token reads back bit-exactly through the tables
            np.testing.assert_array_equal(got[r, :ends[r]], np.asarray(k_full[r, :ends[r]].astype(jnp.float32)))
        np.testing.assert_array_equal(np.asarray(c.k[0][:, -1].astype(jnp.float32)), 0)  # scratch page untouched

    rows = jnp.arange(b, dtype=jnp.int32)
    if mode == "decode":
        ref = attn.decode_attention_reference(q[:b, 0], k_full, v_full, rows, jnp.asarray(ends, jnp.int32))[:, None]
    else:
        ref = attn.chunked_prefill_attention_reference(q[:b], k_full, v_full, rows, jnp.asarray(starts, jnp.int32),
                                                       jnp.asarray(counts, jnp.int32))
    assert out.shape == q.shape and out.dtype == q.dtype
    attn.assert_close(out[:b], ref, BF16, what=f"paged {impl} {mode} G={group}")
    np.testing.assert_array_equal(np.asarray(out[b:].astype(jnp.float32)), 0)  # padding rows give 0, no NaN


def test_decode_blocking_fits_the_kernel():
    """Settings of bench_attention where they fit; otherwise the table is padded so the kernel accepts it."""
    assert decode_blocking(256, 16) == (8, 16, 256)  # 4K context, pages of 16: as in the benchmark
    assert decode_blocking(4, 16) == (8, 4, 4)
    for pps in range(1, 300):
        ppcb, k, cols = decode_blocking(pps, 16)
        per = cols // k
        assert cols >= pps and cols % k == 0 and (per <= ppcb or per % ppcb == 0)


def test_jitted_donated_write_matches_eager(rng):
    with make_pool() as pool:
        slots = [take(pool, 20), take(pool, 5)]
        k = jnp.asarray(rng.standard_normal((2, 8, 2, 64), np.float32), BF16)
        eager = pool.cache(slots, [0, 0], [8, 5]).write(0, k, -k)[1]
        want_k, want_v = dense_view(eager, 0, "k"), dense_view(eager, 0, "v")
        step = jax.jit(lambda c, k_, v_: c.write(0, k_, v_)[1], donate_argnums=0)
        pool.adopt(step(pool.cache(slots, [0, 0], [8, 5]), k, -k))
        got = pool.cache(slots, [0, 0], [8, 5])
        np.testing.assert_array_equal(dense_view(got, 0, "k"), want_k)
        np.testing.assert_array_equal(dense_view(got, 0, "v"), want_v)


@pytest.mark.parametrize("dtype,impl", [("float32", "reference"), ("bfloat16", "kernel")])
def test_tiny_llama_paged_equals_static(rng, dtype, impl):
    """Prefill ragged prompts then decode: the paged cache gives the static cache's logits."""
    cfg = models.get_preset("tiny")
    model = models.random_model(cfg, seed=int(rng.integers(1 << 16)), dtype=dtype)
    graphdef, params = nnx.split(model)
    spec = AttentionSpec(impl=impl, interpret=True)

    @functools.partial(jax.jit, donate_argnums=3)
    def fwd(params, tokens, positions, cache):
        return nnx.merge(graphdef, params)(tokens, positions, cache, attn=spec)

    counts = np.array([5, 16, 17])
    b, t, max_seq = len(counts), int(counts.max()), 64
    tokens = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    static = models.static_cache_for(cfg, max_batch=4, max_seq=max_seq, dtype=dtype)
    static_slots = np.array([3, 0, 2], np.int32)
    with PagedKVPool(num_layers=cfg.num_layers, max_batch=4, max_seq=max_seq, kv_heads=cfg.num_kv_heads,
                     head_dim=cfg.head_dim, dtype=dtype, seed=int(rng.integers(1 << 16))) as pool:
        slots = [take(pool, int(n)) for n in counts]
        starts = np.zeros(b, np.int32)
        for step in range(4):  # one prefill, then three decode steps
            positions = (starts[:, None] + np.arange(tokens.shape[1])[None]).astype(np.int32)
            sc = static.with_rows(static_slots, starts).grow(starts + counts)
            want, static = fwd(params, tokens, positions, sc)
            for s, n in zip(slots, starts + counts):
                pool.grow(s, int(n))
            got, pc = fwd(params, tokens, positions, pool.cache(slots, starts, counts))
            pool.adopt(pc)
            ok = np.arange(tokens.shape[1])[None] < counts[:, None]  # [B, T] real tokens
            tol = 2e-5 if dtype == "float32" else 5e-2
            np.testing.assert_allclose(np.asarray(got, np.float32)[ok], np.asarray(want, np.float32)[ok],
                                       atol=tol, rtol=tol, err_msg=f"step {step}")
            last = np.asarray(want, np.float32)[np.arange(b), counts - 1]  # [B, V]
            starts, counts = starts + counts, np.ones(b, np.int64)
            tokens = last.argmax(-1).astype(np.int32)[:, None]


# -- the host pool ---------------------------------------------------------------
def test_pool_accounting():
    with make_pool(max_seq=50, pool_bytes=None) as pool:
        assert pool.max_seq == 64 and pool.page_size == PAGE  # rounded up to whole pages
        page_bytes = 2 * 1 * PAGE * 2 * 64 * 2
        assert pool.pages_total() == 8 * 4
        assert pool.memory()[1] == (8 * 4 + 1) * page_bytes  # K and V, scratch page included
        assert [pool.pages_needed(n) for n in (0, 1, 16, 17, 64)] == [0, 1, 1, 2, 4]
        a = take(pool, 17)
        b = take(pool)
        assert (a, b) == (0, 1) and pool.allocated(a) and pool.allocated(b) and not pool.allocated(2)
        assert pool.capacity(a) == 32 and pool.capacity(b) == 0 and pool.pages_live() == 2
        pool.grow(a, 20)  # already backed: no change
        pool.grow(b, 33)
        assert pool.capacity(b) == 48 and pool.pages_live() == 5 and pool.memory()[0] == 5 * page_bytes
        pool.free(a)
        assert pool.pages_live() == 3 and not pool.allocated(a)
        assert take(pool, 1) == 0  # the lowest free slot
        assert pool.memory()[1] == 33 * page_bytes  # fixed


def test_pool_budget_and_exhaustion_is_all_or_nothing():
    page_bytes = 2 * 1 * PAGE * 2 * 64 * 2
    with make_pool(max_seq=128, pool_bytes=5 * page_bytes + page_bytes // 2) as pool:
        assert pool.pages_total() == 5
        a = take(pool, 48)  # 3 pages
        table = pool.cache([a], [0], [0]).state.block_tables.copy()
        result = pool.grow(a, 96)  # 6 pages in all, 5 exist
        assert result.exhausted and "needs 3 more pages" in result.reason
        assert pool.pages_live() == 3 and pool.capacity(a) == 48
        np.testing.assert_array_equal(pool.cache([a], [0], [0]).state.block_tables, table)
        assert pool.grow(a, 64).ok  # 4 of 5
        alloc = pool.allocate(17)  # needs 2, 1 free: the slot it tried stays free
        assert alloc.slot is None and alloc.result.exhausted
        assert not pool.allocated(1) and pool.pages_live() == 4
        b = take(pool, 16)
        assert b == 1 and pool.pages_live() == 5 and pool.memory()[0] == 5 * page_bytes
        assert pool.grow(b, 17).exhausted
        assert pool.capacity(b) == 16 and pool.pages_live() == 5
        pool.free(a)  # pages come back at once
        assert pool.grow(b, 17).ok
        assert pool.pages_live() == 2
    with pytest.raises(PoolExhaustedError):
        make_pool(pool_bytes=page_bytes - 1)


def test_pool_errors_name_the_problem():
    pool = make_pool(max_batch=2)
    s = take(pool, 1)
    for bad in (-1, 2, 1, "0", 0.0):
        with pytest.raises(CacheValueError, match="not an allocated slot"):
            pool.grow(bad, 1)
    for tokens in (-1, 65):
        with pytest.raises(CacheValueError, match="outside"):
            pool.grow(s, tokens)
    take(pool)
    full = pool.allocate()
    assert full.slot is None and full.result.exhausted and "in use" in full.result.reason
    pool.free(s)
    with pytest.raises(CacheValueError, match="not an allocated slot"):
        pool.free(s)  # double free
    pool.close()
    pool.close()  # idempotent
    for call in (pool.allocate, lambda: pool.grow(1, 1), lambda: pool.free(1), lambda: pool.capacity(1),
                 lambda: pool.cache([1], [0], [0])):
        with pytest.raises(CacheClosedError):
            call()


def test_block_tables_are_fragmented_and_cache_checks_capacity():
    with make_pool(seed=3) as pool:
        a, b = take(pool, 64), take(pool, 64)
        bt = np.asarray(pool.cache([a, b, -1], [0, 0, 0], [0, 0, 0]).state.block_tables)  # [3, pps]
        assert len(set(bt[:2].ravel())) == 8 and bt[:2].max() < pool.pages_total()
        assert not (np.diff(bt[0]) == 1).all() and not (np.diff(bt[1]) == 1).all()  # not consecutive pages
        assert (bt[2] == pool.pages_total()).all()  # padding row: the scratch page
        c = take(pool, 20)
        pool.cache([c], [16], [16])  # 32 tokens: exactly what two pages back
        with pytest.raises(CacheValueError, match="exceed its backed capacity"):
            pool.cache([c], [30], [3])
        with pytest.raises(CacheValueError, match="invalid"):
            pool.cache([-2], [0], [0])
        with pytest.raises(CacheValueError, match="not an allocated slot"):
            pool.cache([5], [0], [0])
        pool.free(a)
        assert not (np.asarray(pool.cache([b], [0], [0]).state.block_tables) == pool.pages_total()).any()


def test_pool_block_sharing_counts_references_and_refuses_writes_into_shared_pages():
    """Prefix caching on the paged baseline: pinned pages outlive their slot, another slot's block table points
    at them (read-only there), a shared page counts once in ``pages_live``, and a page returns to the free list
    when its last block-table entry and pin go."""
    page_bytes = 2 * 1 * PAGE * 2 * 64 * 2
    with make_pool(max_seq=128, pool_bytes=8 * page_bytes) as pool:
        a = take(pool, 40)  # 3 pages
        pinned = pool.pin_prefix(a, 2)
        assert pinned == tuple(int(p) for p in pool.cache([a], [0], [0]).state.block_tables[0, :2])
        pool.free(a)
        assert pool.pages_live() == 0
        s = take(pool)
        assert pool.grow(s, 7 * PAGE).exhausted  # 2 pinned pages of 8 stay taken
        pool.free(s)
        b, c = take(pool), take(pool)
        assert pool.map_prefix(b, pinned).ok and pool.map_prefix(c, pinned).ok
        assert pool.capacity(b) == 2 * PAGE and pool.pages_live() == 2  # two tables, one copy
        assert pool.grow(b, 2 * PAGE + 1).ok and pool.pages_live() == 3
        tables = pool.cache([b, c], [0, 0], [0, 0]).state.block_tables
        assert tuple(tables[0, :2]) == tuple(tables[1, :2]) == pinned
        with pytest.raises(CacheValueError, match=r"read-only shared range \[0, 32\)"):
            pool.cache([b], [31], [2])
        pool.cache([b, c], [32, 0], [1, 0])  # right after the shared pages; a write of nothing anywhere
        pool.unpin(pinned)
        pool.free(b)
        assert pool.pages_live() == 2  # c still maps them
        with pytest.raises(CacheValueError, match="has 0 pin"):
            pool.unpin(pinned)  # no pin left: refused, nothing changes
        pool.free(c)
        assert sorted(pool._free) == list(range(8)) and not pool._refs.any()
        d = take(pool)
        with pytest.raises(CacheValueError, match=r"handles\[0\] = .* is not a pinned or mapped page"):
            pool.map_prefix(d, pinned)  # freed pages are no handles
        with pytest.raises(CacheValueError, match="n_pages"):
            pool.pin_prefix(d, 1)  # holds no page
