"""The grow/write XLA FFI calls under jax.jit and lax.fori_loop (host backend).

Writes are verified through a path independent of JAX (ctypes over the raw
tensor addresses). The no-copy guarantee is shown two ways: jit steps run on a
cache whose slots are mostly PROT_NONE (``unbacked_reads="fault"``, in a
subprocess, so a segfault is a test failure; the controls show a full read does
fault), and the compiled HLO holds no copy as large as a cache tensor.

Tests that take the ``layout`` fixture (or ``manager``) run in both layouts:
per-layer tensors and every layer interleaved in one tensor
(``layers_per_group = num_layers``). ``make_config`` scales the page with the
entries per token, so a page holds 32 tokens in both.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jax_vattention as jv
from jax_vattention import ops
from jax_vattention.errors import CacheClosedError, CacheValueError
from jax_vattention.hlo import assert_no_cache_copy, cache_sized_copies, copied_element_counts

PAGE = 4096
L, MB, S, H, D = 3, 4, 128, 2, 16  # default cache: 3 layers x [4, 128, 2, 16]
_LAYOUT = {"interleaved": False}  # the running test's layout (set by the `layout` fixture)


@pytest.fixture(params=["per-layer", "interleaved"])
def layout(request):
    _LAYOUT["interleaved"] = request.param == "interleaved"
    yield request.param
    _LAYOUT["interleaved"] = False


def make_config(**overrides) -> jv.CacheConfig:
    """The cache in the running test's layout; every layer in one group when interleaved. A page is 4 KiB per
    entry of a token: 32 tokens of [2, 16] float32 in either layout."""
    layers = overrides.get("num_layers", L)
    g = layers if _LAYOUT["interleaved"] else 1
    entries = 1 if g == 1 else 2 * g
    kw = dict(num_layers=layers, max_batch=MB, max_seq=S, kv_heads=H, head_dim=D, dtype="float32",
              page_bytes=PAGE * entries, layers_per_group=g)
    kw.update(overrides)
    return jv.CacheConfig(**kw)


@pytest.fixture
def manager(layout):
    with jv.KVCacheManager(make_config()) as m:
        yield m


def i32(x) -> jax.Array:
    return jnp.asarray(x, jnp.int32)


def pages_for(cfg: jv.CacheConfig, tokens: int) -> int:
    return math.ceil(tokens * cfg.token_bytes / cfg.page_bytes)


def tensors_of(cfg: jv.CacheConfig) -> int:
    """Reserved tensors, derived here: 2 per layer, or one per group of interleaved layers."""
    g = cfg.layers_per_group
    return 2 * cfg.num_layers if g == 1 else cfg.num_layers // g


# -- raw memory access (independent of jax) ------------------------------------


def read_raw(m, layer: int, kv: int, slot: int, start: int, count: int) -> np.ndarray:
    """Tokens [start, start+count) of one slot of layer ``layer``'s K (kv=0) or V, copied out through ctypes.

    The entry offset is derived here: flat entry 2*layer + kv of a token of E entries (E = 2g interleaved, 1
    per-layer) is in tensor (2*layer + kv) // E at entry (2*layer + kv) % E. -> [count, Hkv, D]
    """
    cfg = m.config
    entry = cfg.kv_heads * cfg.head_dim * cfg.itemsize
    E = 1 if cfg.layers_per_group == 1 else 2 * cfg.layers_per_group
    tensor, index = divmod(2 * layer + kv, E)
    addr = m._native.tensor_address(tensor) + slot * m._native.slot_bytes + start * cfg.token_bytes + index * entry
    if count == 0:
        return np.zeros((0, cfg.kv_heads, cfg.head_dim), cfg.jnp_dtype)
    buf = bytes((ctypes.c_uint8 * ((count - 1) * cfg.token_bytes + entry)).from_address(addr))
    rows = [buf[i * cfg.token_bytes: i * cfg.token_bytes + entry] for i in range(count)]
    return np.frombuffer(b"".join(rows), dtype=cfg.jnp_dtype).reshape(count, cfg.kv_heads, cfg.head_dim)


def layer_token(cache, layer: int, kv: int, slot, pos) -> jax.Array:
    """In jit: token ``pos`` of ``slot`` in layer ``layer``'s K (kv=0) or V, read through the cache's views with a
    dynamic_slice (only that token's bytes). -> [Hkv, D]"""
    cfg = cache.manager.config
    tensor, entry = cfg.locate(layer)[kv]
    view, h, d = cache.tensors[tensor], cfg.kv_heads, cfg.head_dim
    if cfg.interleaved:  # [MB, S, g, 2, Hkv, D]
        return lax.dynamic_slice(view, (slot, pos, entry // 2, entry % 2, 0, 0), (1, 1, 1, 1, h, d)).reshape(h, d)
    return lax.dynamic_slice(view, (slot, pos, 0, 0), (1, 1, h, d)).reshape(h, d)  # [MB, S, Hkv, D]


def snapshot(m, slots_tokens: dict[int, int]) -> dict:
    """Raw bytes of tokens [0, n) of every tensor for each {slot: n}."""
    return {
        (slot, layer, kv): read_raw(m, layer, kv, slot, 0, n).tobytes()
        for slot, n in slots_tokens.items()
        for layer in range(m.config.num_layers)
        for kv in (0, 1)
    }


def assert_bytes_equal(got: np.ndarray, want: np.ndarray, msg: str = "") -> None:
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8), err_msg=msg)


def pattern(shape, seed: int, dtype) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# -- grow + write under jit ------------------------------------------------------


def prefill(m, slots, lengths, seed: int = 0) -> dict:
    """Back and write tokens [0, lengths[b]) of each slot in every layer (one jit call).

    Returns the written data by (slot, layer, kv), each [n, Hkv, D].
    """
    cfg = m.config
    B, T = len(slots), max(lengths)
    data = {(layer, kv): pattern((B, T, cfg.kv_heads, cfg.head_dim), seed + 2 * layer + kv, cfg.jnp_dtype)
            for layer in range(cfg.num_layers) for kv in (0, 1)}  # [B, T, Hkv, D]

    @jax.jit
    def run(slots, lengths, data):
        lengths = ops.grow(m, slots, lengths)
        outs = [ops.write(m, layer, data[layer, 0], data[layer, 1], slots, jnp.zeros_like(lengths), lengths)
                for layer in range(cfg.num_layers)]
        return jnp.stack(outs)

    outs = run(i32(slots), i32(lengths), data)
    np.testing.assert_array_equal(outs, np.broadcast_to(lengths, outs.shape))
    return {(s, layer, kv): data[layer, kv][b, :n] for b, (s, n) in enumerate(zip(slots, lengths))
            for layer in range(cfg.num_layers) for kv in (0, 1)}


def assert_prefill_intact(m, written: dict) -> None:
    for (slot, layer, kv), x in written.items():
        assert_bytes_equal(read_raw(m, layer, kv, slot, 0, x.shape[0]), x, f"slot {slot} layer {layer} kv {kv}")


def test_grow_and_write_land_at_the_manager_addresses(manager):
    for _ in range(4):
        manager.allocate()
    slots, starts, counts = [2, -1, 0, 3], [0, 0, 35, 10], [5, 5, 3, 0]  # ragged; row 1 is padding
    T = 5
    k = pattern((4, T, H, D), 1, np.float32)  # [B, T, Hkv, D]
    v = pattern((4, T, H, D), 2, np.float32)

    @jax.jit
    def step(slots, lengths, starts, counts, k, v):
        lengths = ops.grow(manager, slots, lengths)
        return lengths, [ops.write(manager, layer, k * (layer + 1), v * (layer + 1), slots, starts, counts)
                         for layer in range(L)]

    grown, written = step(i32(slots), i32([5, 99, 38, 10]), i32(starts), i32(counts), k, v)
    np.testing.assert_array_equal(grown, [5, 99, 38, 10])
    for out in written:
        np.testing.assert_array_equal(out, [5, 0, 38, 10])  # starts + counts; padding rows return starts
    s = manager.stats()
    expected_pages = {2: 1, 0: 2, 3: 1, 1: 0}
    assert s.slot_capacity == tuple(32 * expected_pages[i] for i in range(4))
    assert s.pages_mapped == sum(expected_pages.values()) * tensors_of(manager.config)
    for layer in range(L):
        for kv, src in ((0, k), (1, v)):
            for b, slot in enumerate(slots):
                if slot < 0:
                    continue
                got = read_raw(manager, layer, kv, slot, starts[b], counts[b])
                assert_bytes_equal(got, src[b, : counts[b]] * (layer + 1), f"layer {layer} kv {kv} row {b}")
                # Nothing outside [start, start + count): fresh pages read as zeros.
                before = read_raw(manager, layer, kv, slot, 0, starts[b])
                after = read_raw(manager, layer, kv, slot, starts[b] + counts[b], 5)
                assert not before.any() and not after.any()
    # The jax views see the same bytes.
    cache = manager.cache([0], [38])
    got = jax.jit(lambda c: jnp.stack([layer_token(c, 2, 1, c.slots[0], 35 + i) for i in range(3)]))(cache)
    np.testing.assert_array_equal(np.asarray(got), v[2, :3] * 3)


def test_an_interleaved_write_lands_between_its_neighbours():
    """With every layer in one tensor, a write of layer 1 stores its K and V at entries 2 and 3 of each token
    (E = 6 entries of [Hkv, D]), and every other byte of the tokens, and the tokens around them, stays zero."""
    cfg = make_config(layers_per_group=L, page_bytes=PAGE * 2 * L)
    E, entry = 2 * L, H * D * 4
    assert (cfg.layers_per_group, cfg.token_bytes, cfg.page_bytes // cfg.token_bytes) == (L, E * entry, 32)
    with jv.KVCacheManager(cfg) as m:
        m.allocate()
        slot = m.allocate(40)
        k, v = pattern((1, 4, H, D), 21, np.float32), pattern((1, 4, H, D), 22, np.float32)  # [B, T, Hkv, D]
        out = ops.write(m, 1, k, v, i32([slot]), i32([30]), i32([4]))  # tokens 30..33: across the page boundary
        np.testing.assert_array_equal(out, [34])
        base = m._native.tensor_address(0) + slot * m._native.slot_bytes
        raw = bytes((ctypes.c_uint8 * (40 * cfg.token_bytes)).from_address(base))  # [40 tokens, E entries, Hkv, D]
        tokens = np.frombuffer(raw, np.float32).reshape(40, E, H, D)
        np.testing.assert_array_equal(tokens[30:34, 2], k[0])  # layer 1 K: entry 2*1 + 0
        np.testing.assert_array_equal(tokens[30:34, 3], v[0])  # layer 1 V: entry 2*1 + 1
        assert not tokens[30:34, [0, 1, 4, 5]].any()  # layers 0 and 2 of the same tokens
        assert not tokens[:30].any() and not tokens[34:].any()  # the tokens around them
        assert not read_raw(m, 0, 0, 0, 0, 32).any()  # the neighbouring slot


def decode_value(step, row, layer, kv, dtype):
    """The token row `row` writes at decode step `step`: [..., Hkv, D], distinct per (step, row, layer, kv)."""
    h = jnp.arange(H, dtype=jnp.float32)[:, None]
    d = jnp.arange(D, dtype=jnp.float32)[None, :]
    base = (step + 1) + 32.0 * row + 0.5 * h + d / 64.0  # [Hkv, D], exact in float32
    sign = 1.0 if kv == 0 else -1.0
    return (sign * base * 2.0**layer).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fori_loop_decode_writes_every_step(layout, dtype):
    cfg = make_config(dtype=dtype)
    steps = 20
    with jv.KVCacheManager(cfg) as m:
        for _ in range(MB):
            m.allocate()
        m.free(2)  # slot 2 stays free: nothing may map it
        # Rows: slots 3 and 0 (not adjacent, not in order), a padding row, ragged starts.
        slots, starts = [3, -1, 0], [5, 0, 55]
        prompt = prefill(m, [3, 0], [5, 55], seed=3)
        neighbour = prefill(m, [1], [40], seed=4)  # a slot the loop must not touch
        cache = m.cache(slots, starts)

        def body(i, carry):
            cache, reads = carry
            cache = cache.grow(cache.lengths + 1)
            rows = []
            for layer in range(L):
                # [B, 1, Hkv, D]
                k = jnp.stack([decode_value(i, b, layer, 0, cfg.jnp_dtype) for b in range(3)])[:, None]
                v = jnp.stack([decode_value(i, b, layer, 1, cfg.jnp_dtype) for b in range(3)])[:, None]
                lens, cache = cache.write(layer, k, v)
                # Read back the token just written, indexed by the lengths write returned.
                got = [layer_token(cache, layer, kv, jnp.maximum(cache.slots[b], 0), lens[b] - 1)
                       for kv in (0, 1) for b in (0, 2)]
                rows.append(jnp.stack(got))  # [2 * 2, Hkv, D]
            return cache, reads.at[i].set(jnp.stack(rows))

        @jax.jit
        def decode(cache):
            reads = jnp.zeros((steps, L, 4, H, D), cfg.jnp_dtype)
            cache, reads = lax.fori_loop(0, steps, body, (cache, reads))
            return cache.state, reads

        state, reads = decode(cache)
        np.testing.assert_array_equal(state.lengths, [25, 20, 75])
        np.testing.assert_array_equal(state.slots, slots)

        # Raw memory holds every step's token, for K and V of every layer.
        for layer in range(L):
            for kv in (0, 1):
                for b, slot in ((0, 3), (2, 0)):
                    want = np.stack([np.asarray(decode_value(i, b, layer, kv, cfg.jnp_dtype)) for i in range(steps)])
                    got = read_raw(m, layer, kv, slot, starts[b], steps)  # [steps, Hkv, D]
                    assert_bytes_equal(got, want, f"layer {layer} kv {kv} slot {slot}")
                    # In-jit reads saw the same tokens.
                    assert_bytes_equal(np.asarray(reads[:, layer, 2 * kv + (b == 2)]), want)
        assert_prefill_intact(m, prompt)
        assert_prefill_intact(m, neighbour)
        s = m.stats()
        pages = {3: pages_for(cfg, 25), 0: pages_for(cfg, 75), 1: pages_for(cfg, 40), 2: 0}
        assert pages[0] > pages_for(cfg, 55)  # the loop crossed a page boundary in slot 0
        assert s.slot_capacity == tuple(min(m.max_seq, pages[i] * cfg.page_bytes // cfg.token_bytes)
                                        for i in range(MB))
        assert s.pages_mapped == sum(pages.values()) * tensors_of(cfg)


def test_chunked_writes_with_partial_counts(manager):
    a, b = manager.allocate(), manager.allocate()

    @jax.jit
    def chunk(slots, lengths, starts, counts, k, v):
        lengths = ops.grow(manager, slots, lengths)
        return ops.write(manager, 1, k, v, slots, starts, counts)

    k = pattern((2, 8, H, D), 5, np.float32)  # [B, T=8, Hkv, D]
    v = pattern((2, 8, H, D), 6, np.float32)
    out = chunk(i32([a, b]), i32([8, 3]), i32([0, 0]), i32([8, 3]), k, v)
    np.testing.assert_array_equal(out, [8, 3])
    out = chunk(i32([a, b]), i32([12, 11]), i32([8, 3]), i32([4, 8]), k[::-1], v[::-1])
    np.testing.assert_array_equal(out, [12, 11])
    assert_bytes_equal(read_raw(manager, 1, 0, a, 0, 12), np.concatenate([k[0], k[1, :4]]))
    assert_bytes_equal(read_raw(manager, 1, 1, b, 0, 11), np.concatenate([v[1, :3], v[0]]))
    assert not read_raw(manager, 0, 0, a, 0, 12).any()  # layer 0 untouched


def test_writes_at_the_edges_of_the_reservation_and_across_pages(layout):
    # 192 B tokens (kv_heads=3): token 21 straddles the first page boundary; the
    # last token of the last slot ends exactly at the end of the reservation.
    cfg = make_config(kv_heads=3, max_seq=128)
    with jv.KVCacheManager(cfg) as m:
        slots = [m.allocate() for _ in range(MB)]
        last = slots[-1]

        @jax.jit
        def step(slots, lengths, starts, k):
            lengths = ops.grow(m, slots, lengths)
            return ops.write(m, L - 1, k, k + 1, slots, starts, jnp.ones_like(starts))

        k = pattern((2, 1, 3, D), 11, np.float32)  # [B, 1, Hkv=3, D]
        out = step(i32([0, last]), i32([22, m.max_seq]), i32([21, m.max_seq - 1]), k)
        np.testing.assert_array_equal(out, [22, m.max_seq])
        assert m.capacity(0) == 42 and m.capacity(last) == m.max_seq
        assert_bytes_equal(read_raw(m, L - 1, 0, 0, 21, 1), k[0])
        assert_bytes_equal(read_raw(m, L - 1, 1, last, m.max_seq - 1, 1), k[1] + 1)
        # The last layer's V is the last entry of a token (of the last tensor), in either layout.
        end = m._native.tensor_address(tensors_of(cfg) - 1) + MB * m._native.slot_bytes
        assert token_end(m, L - 1, 1, last, m.max_seq - 1) == end
        with pytest.raises(jax.errors.JaxRuntimeError, match="not backed"):
            jax.block_until_ready(step(i32([last]), i32([m.max_seq]), i32([m.max_seq]), k[:1]))


def token_end(m, layer, kv, slot, pos) -> int:
    """One past the last byte of token ``pos`` of a slot in layer ``layer``'s K (kv=0) or V."""
    native = m._native
    return native.entry_address(layer, kv) + slot * native.slot_bytes + pos * native.token_bytes + native.entry_bytes


def test_duplicate_rows_and_finished_rows(manager):
    a, b = manager.allocate(), manager.allocate()
    prefill(manager, [a, b], [10, 7], seed=12)
    # Two rows share slot a (e.g. two chunks of one request); row 2 is finished and does not grow.
    cache = manager.cache([a, a, b], [10, 40, 7])

    @jax.jit
    def step(cache, x):  # x: [B, 1, Hkv, D]
        cache = cache.grow(cache.lengths + jnp.array([1, 1, 0], jnp.int32))
        return cache.state, cache.write(0, x, x)[0]

    x = pattern((3, 1, H, D), 13, np.float32)
    state, lens = step(cache, x)
    np.testing.assert_array_equal(state.num_new, [1, 1, 0])
    np.testing.assert_array_equal(lens, [11, 41, 7])
    assert manager.capacity(a) == 64 and manager.capacity(b) == 32  # the larger request wins
    assert_bytes_equal(read_raw(manager, 0, 0, a, 10, 1), x[0])
    assert_bytes_equal(read_raw(manager, 0, 1, a, 40, 1), x[1])
    assert not read_raw(manager, 0, 0, b, 7, 25).any()  # the finished row wrote nothing


def test_two_managers_in_one_jit_write_to_their_own_memory(layout):
    with jv.KVCacheManager(make_config()) as m1, jv.KVCacheManager(make_config(num_layers=1)) as m2:
        m2.allocate()
        s1, s2 = m1.allocate(), m2.allocate()  # slot 0 of m1, slot 1 of m2

        @jax.jit
        def both(k):
            n1 = ops.grow(m1, i32([s1]), i32([1]))
            n2 = ops.grow(m2, i32([s2]), i32([1]))
            w1 = ops.write(m1, 2, k, k, i32([s1]), n1 - 1, i32([1]))
            w2 = ops.write(m2, 0, -k, -k, i32([s2]), n2 - 1, i32([1]))
            return w1, w2

        k = pattern((1, 1, H, D), 7, np.float32)
        both(k)
        assert_bytes_equal(read_raw(m1, 2, 0, s1, 0, 1), k[0])
        assert_bytes_equal(read_raw(m2, 0, 1, s2, 0, 1), -k[0])
        assert m1.stats().pages_mapped == tensors_of(m1.config) and m2.stats().pages_mapped == 2
        assert m2.capacity(0) == 0


# -- the no-copy guarantee, by running on a sparse cache -----------------------------

SPARSE_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    import jax_vattention as jv

    # 2 layers x [4, 8192, 2, 16] f32, per-layer (4 tensors, 512 KiB = 128 pages of 32 tokens per slot) or
    # interleaved (1 tensor [4, 8192, 2, 2, 2, 16], 4 KiB per entry of a token: also 32 tokens a page): only
    # page 0 of slots 0 and 2 gets mapped, the rest of each slot is an unbacked tail.
    # Strict mode: an unbacked read faults instead of reading zeros, so a copy or overread kills the process.
    g = int(sys.argv[2])
    cfg = jv.CacheConfig(num_layers=2, max_batch=4, max_seq=8192, kv_heads=2, head_dim=16, dtype="float32",
                         page_bytes=4096 * (1 if g == 1 else 2 * g), layers_per_group=g, unbacked_reads="fault")
    m = jv.KVCacheManager(cfg)
    assert m.unbacked_reads == "fault", m.unbacked_reads
    assert len(m.tensors) == (4 if g == 1 else 1) and m.tokens_per_page == 32
    a, _, b = m.allocate(), m.allocate(), m.allocate()
    cache = m.cache([b, -1, a], [3, 0, 10])  # [B=3]
    kv = jnp.arange(3 * 2 * 16, dtype=jnp.float32).reshape(3, 1, 2, 16)  # [B, 1, Hkv, D]

    def token(cache, layer, which, slot, pos):  # [1, 1, Hkv, D]: one token of a layer's K (which=0) or V
        tensor, entry = cfg.locate(layer)[which]
        view = cache.tensors[tensor]
        if cfg.interleaved:  # [MB, S, g, 2, Hkv, D]
            return lax.dynamic_slice(view, (slot, pos, entry // 2, entry % 2, 0, 0), (1, 1, 1, 1, 2, 16))[:, :, 0, 0]
        return lax.dynamic_slice(view, (slot, pos, 0, 0), (1, 1, 2, 16))

    def step(cache, kv):
        cache = cache.grow(cache.lengths + 1)
        got = []
        for layer in range(2):
            lens, cache = cache.write(layer, kv + layer, -kv - layer)
            got.append(token(cache, layer, 0, cache.slots[2], lens[2] - 1))
            got.append(token(cache, layer, 1, cache.slots[0], lens[0] - 1))
        return cache, jnp.concatenate(got)  # [4, 1, Hkv, D]

    def expected(scale):  # what step() reads back: K of row 2 and V of row 0, for layers 0 and 1
        return np.concatenate([np.asarray(kv[2:3]) * scale, np.asarray(-kv[0:1]) * scale,
                               np.asarray(kv[2:3] + 1) * scale, np.asarray(-kv[0:1] - 1) * scale])

    @jax.jit
    def one_step(cache, kv):
        cache, got = step(cache, kv)
        return cache.state, got  # never the views

    @jax.jit
    def twenty_steps(cache):
        def body(i, carry):
            cache, total = carry
            cache, got = step(cache, kv * (i + 1).astype(jnp.float32))
            return cache, total + got

        cache, total = lax.fori_loop(0, 20, body, (cache, jnp.zeros((4, 1, 2, 16))))
        return cache.state, total

    mode = sys.argv[1]
    if mode == "step":
        state, got = one_step(cache, kv)
        np.testing.assert_array_equal(state.lengths, [4, 1, 11])
        np.testing.assert_array_equal(got, expected(1))
    elif mode == "loop":
        state, total = twenty_steps(cache)
        np.testing.assert_array_equal(state.lengths, [23, 20, 30])
        # sum over i of (kv*(i+1) + layer) etc: scale 210 on kv, 20 on the layer offset
        want = np.concatenate([np.asarray(kv[2:3]) * 210, np.asarray(-kv[0:1]) * 210,
                               np.asarray(kv[2:3]) * 210 + 20, np.asarray(-kv[0:1]) * 210 - 20])
        np.testing.assert_allclose(total, want, rtol=0, atol=0)
    elif mode == "full_read":  # control: reading the whole view touches PROT_NONE pages
        np.array(m.tensors[0], copy=True)
    elif mode == "return_view":  # control: a jit that returns a view copies it
        jax.jit(lambda c: c.tensors[0])(cache).block_until_ready()
    else:
        raise SystemExit("unknown mode " + mode)
    assert m.stats().slot_capacity == (32, 0, 32, 0), m.stats().slot_capacity  # still one page per slot
    print("OK", mode)
    """
)


def run_sparse(mode: str, layout: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    g = "2" if layout == "interleaved" else "1"
    return subprocess.run([sys.executable, "-c", SPARSE_SCRIPT, mode, g], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("mode", ["step", "loop"])
def test_jit_on_a_sparse_cache_never_touches_unmapped_pages(layout, mode):
    proc = run_sparse(mode, layout)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert f"OK {mode}" in proc.stdout


@pytest.mark.parametrize("mode", ["full_read", "return_view"])
def test_sparse_cache_detector_catches_a_full_read(layout, mode):
    # The same cache segfaults as soon as anything reads past the mapped pages,
    # so the runs above finishing is proof that nothing did.
    proc = run_sparse(mode, layout)
    assert proc.returncode == -signal.SIGSEGV, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "OK" not in proc.stdout


# -- close() while a computation is in flight ---------------------------------------------

CLOSE_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    import jax_vattention as jv
    from jax_vattention import ops

    # Strict mode (unbacked_reads="fault"): memory unmapped under a running read faults instead of reading zeros.
    if sys.argv[1] == "read":
        cfg = jv.CacheConfig(num_layers=1, max_batch=2, max_seq=4096, kv_heads=2, head_dim=16, dtype="float32",
                             page_bytes=4096, unbacked_reads="fault")
    else:  # 2 KiB tokens: one write of a whole slot copies 2 x 32 MiB
        cfg = jv.CacheConfig(num_layers=1, max_batch=1, max_seq=16384, kv_heads=8, head_dim=64, dtype="float32",
                             page_bytes=4096, unbacked_reads="fault")
    S, H, D = cfg.max_seq, cfg.kv_heads, cfg.head_dim
    m = jv.KVCacheManager(cfg)
    s = m.allocate(S)  # the whole slot is mapped
    ones = jnp.ones((1, S, H, D), jnp.float32)  # [B, T, Hkv, D]

    def write_all(x):
        return ops.write(m, 0, x, x, jnp.array([s], jnp.int32), jnp.zeros(1, jnp.int32), jnp.full(1, S, jnp.int32))

    jax.jit(write_all)(ones).block_until_ready()
    if sys.argv[1] == "read":
        cache = m.cache([s], [S])

        @jax.jit
        def work(cache):  # reads the whole slot 2000 times: still running when close() is called
            def body(i, acc):
                return acc + jnp.sum(lax.dynamic_slice(cache.tensors[0], (cache.slots[0], 0, 0, 0), (1, S, H, D)))
            return lax.fori_loop(0, 2000, body, 0.0)

        jax.block_until_ready(work(cache))
        out = work(cache)  # dispatched asynchronously
        m.close()  # must wait for `out`, not unmap under it
        assert float(out) == 2000 * S * H * D, float(out)
    else:
        work = jax.jit(lambda x: lax.fori_loop(0, 100, lambda i, n: write_all(x) + n * 0, jnp.zeros(1, jnp.int32)))
        jax.block_until_ready(work(ones))
        result = {}

        def run():
            try:
                result["out"] = np.asarray(work(ones))
            except jax.errors.JaxRuntimeError as e:
                result["error"] = str(e)

        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(0.2)
        m.close()  # from another thread, while the writes run
        thread.join()
        assert "out" in result or "CacheClosedError" in result["error"], result
        print(sorted(result))
    assert m.stats().reserved_bytes == 0
    print("OK")
    """
)


@pytest.mark.parametrize("mode", ["read", "write"])
def test_close_waits_for_computations_in_flight(mode):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CLOSE_SCRIPT, mode], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "OK" in proc.stdout


# -- the no-copy guarantee, in the compiled HLO -----------------------------------------

def hlo_copies(hlo: str) -> list[int]:
    """Element counts of every copy / copy-start / transpose result.

    The project's one parser (``jax_vattention.hlo``).
    """
    return copied_element_counts(hlo)


def big_copies(hlo: str, tensor_elements: int) -> list[int]:
    return cache_sized_copies(hlo, tensor_elements)


def compiled_hlo(f, *args) -> str:
    return jax.jit(f).lower(*args).compile().as_text()


def test_hlo_copy_parser():
    text = """
      %copy.3 = f32[4,128,2,16]{3,2,1,0} copy(f32[4,128,2,16]{3,2,1,0} %p0)
      %copy-start = (bf16[2,64]{1,0}, bf16[2,64]{1,0}, u32[]) copy-start(%p1)
      %copy.1 = s32[] copy(%x)
      %add = f32[4,128,2,16]{3,2,1,0} add(%a, %b)
    """
    assert hlo_copies(text) == [4 * 128 * 2 * 16, 128, 128, 1, 1]  # every result of a tuple-shaped copy-start
    assert len(big_copies(text, 128)) == 3


def model_step(cache, x):
    """A decode step: grow by one, write every layer, read each written token back."""
    cache = cache.grow(cache.lengths + 1)
    reads = []
    for layer in range(L):
        lens, cache = cache.write(layer, x + layer, x - layer)  # x: [B, 1, Hkv, D]
        reads.append(layer_token(cache, layer, 0, jnp.maximum(cache.slots[0], 0), lens[0] - 1)[None, None])
    return cache, jnp.concatenate(reads)  # [L, 1, Hkv, D]


def test_compiled_step_and_loop_have_no_cache_sized_copy(manager):
    a, b = manager.allocate(), manager.allocate()
    cache = manager.cache([b, -1, a], [0, 0, 4])
    x = jnp.ones((3, 1, H, D), jnp.float32)
    tensor_elements = MB * S * H * D

    def step(cache, x):
        cache, reads = model_step(cache, x)
        return cache.state, reads

    def loop(cache, x):
        cache, reads = lax.fori_loop(0, 20, lambda i, c: model_step(c[0], x * i), (cache, jnp.zeros((L, 1, H, D))))
        return cache.state, reads

    for f in (step, loop):
        hlo = compiled_hlo(f, cache, x)
        assert "vattn_grow" in hlo and "vattn_write" in hlo
        assert big_copies(hlo, tensor_elements) == [], f.__name__
        assert_no_cache_copy(hlo, manager)  # the library's guard agrees
    assert "while" in compiled_hlo(loop, cache, x)
    # The checker does see copies in these modules, just small ones (the [B] state).
    assert hlo_copies(compiled_hlo(step, cache, x))
    # And the functions run.
    state, _ = jax.jit(loop)(cache, x)
    np.testing.assert_array_equal(state.lengths, [20, 20, 24])


def test_hlo_checker_flags_copying_variants(manager):
    a = manager.allocate()
    cache = manager.cache([a], [0])
    tensor_elements = MB * S * H * D

    def returns_view(cache):
        return cache.tensors[-1]

    def returns_whole_cache(cache):
        return cache

    def updates_a_view(cache, x):  # x [Hkv, D] broadcasts over an interleaved token's [g, 2] entries
        return cache.tensors[0].at[a, 0].set(x).sum()

    def loop_updates_a_view(cache, x):
        return lax.fori_loop(0, 3, lambda i, kv: kv.at[a, i].set(x), cache.tensors[0])[a, :3]

    x = jnp.ones((H, D), jnp.float32)
    bad = [compiled_hlo(returns_view, cache), compiled_hlo(returns_whole_cache, cache),
           compiled_hlo(updates_a_view, cache, x), compiled_hlo(loop_updates_a_view, cache, x)]
    for hlo in bad:  # the library's own guard agrees
        with pytest.raises(jv.VAttentionError, match="cache-sized"):
            assert_no_cache_copy(hlo, manager)
    assert len(big_copies(compiled_hlo(returns_view, cache), tensor_elements)) >= 1
    assert len(big_copies(compiled_hlo(returns_whole_cache, cache), tensor_elements)) >= tensors_of(manager.config)
    assert len(big_copies(compiled_hlo(updates_a_view, cache, x), tensor_elements)) >= 1
    assert len(big_copies(compiled_hlo(loop_updates_a_view, cache, x), tensor_elements)) >= 1


# -- bad input at trace time -------------------------------------------------------------


@pytest.mark.parametrize(
    "slots, lengths, message",
    [
        (np.zeros(2, np.int16), np.zeros(2, np.int32), "slots must be int32"),
        (np.zeros(2, np.int32), np.zeros(2, np.float32), "lengths must be int32"),
        (np.zeros((2, 1), np.int32), np.zeros(2, np.int32), r"slots must have shape \[B\]"),
        (np.zeros(2, np.int32), np.zeros(3, np.int32), "expected B=2"),
        (np.int32(0), np.int32(0), "must have shape"),
    ],
)
def test_grow_rejects_bad_arguments_at_trace_time(manager, slots, lengths, message):
    traced = jax.jit(lambda s, n: ops.grow(manager, s, n))
    with pytest.raises(CacheValueError, match=message):
        traced(slots, lengths)
    before = manager.stats()
    with pytest.raises(CacheValueError, match=message):
        ops.grow(manager, slots, lengths)
    assert manager.stats() == before


def _rows(n=2):
    return np.zeros(n, np.int32)


@pytest.mark.parametrize(
    "layer, k, v, rows, message",
    [
        (0, np.zeros((2, 1, H, D), jnp.bfloat16), np.zeros((2, 1, H, D), jnp.bfloat16), _rows(), "must be float32"),
        (0, np.zeros((2, 1, H, D), np.float32), np.zeros((2, 1, H, D), np.float16), _rows(), "v_new must be float32"),
        (0, np.zeros((2, H, D), np.float32), np.zeros((2, H, D), np.float32), _rows(),
         r"k_new must be \[B, T, 2, 16\]"),
        (0, np.zeros((2, 1, 1, H, D), np.float32), np.zeros((2, 1, 1, H, D), np.float32), _rows(), "k_new must be"),
        (0, np.zeros((2, 1, H, D + 1), np.float32), np.zeros((2, 1, H, D + 1), np.float32), _rows(), "k_new must be"),
        (0, np.zeros((2, 1, H + 1, D), np.float32), np.zeros((2, 1, H, D), np.float32), _rows(), "k_new must be"),
        (0, np.zeros((2, 1, H, D), np.float32), np.zeros((2, 2, H, D), np.float32), _rows(), "differ in shape"),
        (0, np.zeros((2, 1, H, D), np.float32), np.zeros((2, 1, H, D), np.float32), _rows(3), "expected B=2"),
        (0, np.zeros((2, 1, H, D), np.float32), np.zeros((2, 1, H, D), np.float32), _rows().astype(np.uint32), "int32"),
        (L, np.zeros((2, 1, H, D), np.float32), np.zeros((2, 1, H, D), np.float32), _rows(),
         r"layer must be an int in \[0, 3\)"),
        (-1, np.zeros((2, 1, H, D), np.float32), np.zeros((2, 1, H, D), np.float32), _rows(), "layer must be"),
        (True, np.zeros((2, 1, H, D), np.float32), np.zeros((2, 1, H, D), np.float32), _rows(), "layer must be"),
    ],
)
def test_write_rejects_bad_arguments_at_trace_time(manager, layer, k, v, rows, message):
    traced = jax.jit(lambda k, v, r: ops.write(manager, layer, k, v, r, r, r))
    with pytest.raises(CacheValueError, match=message):
        traced(k, v, rows)


def test_cache_pytree_rejects_bad_rows(manager):
    with pytest.raises(CacheValueError):
        manager.cache([[0, 1]], [[0, 0]])  # rank 2
    with pytest.raises(CacheValueError, match="expected B=2"):
        manager.cache([0, 1], [0])


# -- errors raised inside jit ----------------------------------------------------------


def _grow_write(m, layer=0):
    @jax.jit
    def f(slots, lengths, starts, counts, k):  # k: [B, T, Hkv, D]
        lengths = ops.grow(m, slots, lengths)
        return lengths, ops.write(m, layer, k, -k, slots, starts, counts)

    return f


@pytest.fixture
def populated(manager):
    """Slots 0 and 2 hold prefilled data, slot 1 is allocated and empty, slot 3 is free."""
    a, b, c = manager.allocate(), manager.allocate(), manager.allocate()
    assert (a, b, c) == (0, 1, 2)
    return manager, prefill(manager, [0, 2], [20, 45], seed=8)


def one_token(batch=1):
    return pattern((batch, 1, H, D), 9, np.float32)  # [B, 1, Hkv, D]


@pytest.mark.parametrize(
    "slots, lengths, starts, counts, error, grow_ok",
    [
        ([1], [0], [0], [1], "CacheValueError.*not backed", True),  # write into a slot with nothing backed
        ([1, 0], [5, 20], [40, 0], [1, 1], "CacheValueError.*not backed", True),  # row 0 writes past 32 backed tokens
        ([3], [1], [0], [1], "SlotStateError.*not allocated", False),  # grow of a free slot
        ([0, 3], [50, 1], [0, 0], [1, 1], "SlotStateError", False),  # one bad row: nothing is mapped
        ([9], [1], [0], [1], "CacheValueError.*out of range", False),  # slot out of range
        ([1], [S + 1], [0], [1], "CacheValueError.*max_seq", False),  # length past max_seq
        ([1], [-1], [0], [1], "CacheValueError", False),
        ([1], [4], [0], [2], "CacheValueError.*counts", True),  # counts > T
        ([1], [4], [-1], [1], "CacheValueError", True),
    ],
)
def test_errors_inside_jit_keep_data_and_manager_usable(populated, slots, lengths, starts, counts, error, grow_ok):
    m, written = populated
    before = m.stats()
    raw_before = snapshot(m, {0: 32, 2: 64})
    f = _grow_write(m)
    k = one_token(len(slots))
    with pytest.raises(jax.errors.JaxRuntimeError, match=error):
        jax.block_until_ready(f(i32(slots), i32(lengths), i32(starts), i32(counts), k))
    if not grow_ok:
        assert m.stats() == before  # a refused grow maps nothing
    else:
        assert m.stats().slot_capacity[1] == 32 * pages_for(m.config, lengths[0])
    assert snapshot(m, {0: 32, 2: 64}) == raw_before  # no byte changed, in any slot
    assert_prefill_intact(m, written)
    # The manager and the same compiled function still work.
    _, out = f(i32([1]), i32([8]), i32([7]), i32([1]), k[:1])
    np.testing.assert_array_equal(out, [8])
    assert_bytes_equal(read_raw(m, 0, 1, 1, 7, 1), -k[0])
    assert_prefill_intact(m, written)


def test_pool_exhausted_inside_jit(layout):
    T = tensors_of(make_config())
    with jv.KVCacheManager(make_config(pool_bytes=3 * T * make_config().page_bytes)) as m:  # 3 page indices
        a, b = m.allocate(), m.allocate()
        written = prefill(m, [a], [40], seed=2)  # 2 page indices
        before = m.stats()
        f = _grow_write(m)
        k = one_token(2)
        needs = rf"PoolExhaustedError.*needs {2 * T} pages but only {T} are free"
        with pytest.raises(jax.errors.JaxRuntimeError, match=needs):
            jax.block_until_ready(f(i32([a, b]), i32([41, 64]), i32([40, 0]), i32([1, 1]), k))
        assert m.stats() == before
        assert_prefill_intact(m, written)
        assert not read_raw(m, 0, 0, a, 40, 1).any()  # the write after the failed grow did not run
        out = f(i32([a, b]), i32([41, 32]), i32([40, 31]), i32([1, 1]), k)[1]
        np.testing.assert_array_equal(out, [41, 32])
        assert_bytes_equal(read_raw(m, 0, 0, b, 31, 1), k[1])
        assert_prefill_intact(m, written)


def test_backend_failure_inside_jit(populated):
    m, written = populated
    f = _grow_write(m)
    k = one_token()
    before = m.stats()
    m._inject_failures(maps=1)
    with pytest.raises(jax.errors.JaxRuntimeError, match="BackendError"):
        jax.block_until_ready(f(i32([1]), i32([1]), i32([0]), i32([1]), k))
    s = m.stats()
    assert s.pages_mapped == before.pages_mapped and s.slot_capacity == before.slot_capacity
    assert_prefill_intact(m, written)
    f(i32([1]), i32([1]), i32([0]), i32([1]), k)  # the retry works
    assert m.capacity(1) == 32
    assert_bytes_equal(read_raw(m, 0, 0, 1, 0, 1), k[0])


def test_bad_row_does_not_half_write_a_batch(populated):
    m, written = populated

    @jax.jit
    def write(slots, starts, counts, k):
        return ops.write(m, 1, k, k, slots, starts, counts)

    k = one_token(2)
    with pytest.raises(jax.errors.JaxRuntimeError, match="CacheValueError.*not backed"):
        jax.block_until_ready(write(i32([0, 2]), i32([5, 64]), i32([1, 1]), k))  # row 1 is past slot 2's 64
    assert_prefill_intact(m, written)  # row 0's target token 5 still holds the prefill
    with pytest.raises(jax.errors.JaxRuntimeError, match="SlotStateError.*not allocated"):
        jax.block_until_ready(write(i32([0, 3]), i32([5, 0]), i32([1, 1]), k))
    assert_prefill_intact(m, written)


# -- use after close -------------------------------------------------------------------------


def test_jit_compiled_before_close_fails_cleanly_after():
    m = jv.KVCacheManager(make_config())
    slot = m.allocate()
    f = _grow_write(m)
    k = one_token()
    cache = m.cache([slot], [0])

    @jax.jit
    def step(cache, x):  # grows and writes through the KVCache, returns the state only
        cache = cache.grow(cache.lengths + 1)
        return cache.write(0, x, x)[0]  # the lengths only: returning the cache would copy the views

    @jax.jit
    def step_reading(cache, x):
        cache = cache.grow(cache.lengths + 1)
        lens, cache = cache.write(0, x, x)
        return layer_token(cache, 0, 0, cache.slots[0], lens[0] - 1)

    f(i32([slot]), i32([1]), i32([0]), i32([1]), k)
    step(cache, k)
    step_reading(cache, k)
    m.close()
    with pytest.raises(jax.errors.JaxRuntimeError, match="CacheClosedError"):
        jax.block_until_ready(f(i32([slot]), i32([2]), i32([1]), i32([1]), k))
    with pytest.raises(jax.errors.JaxRuntimeError, match="CacheClosedError"):
        jax.block_until_ready(step(cache, k))
    # A step that also reads the (deleted) views is refused before anything runs.
    with pytest.raises(RuntimeError, match="deleted"):
        jax.block_until_ready(step_reading(cache, k))
    # Tracing anew is refused eagerly.
    with pytest.raises(CacheClosedError):
        jax.jit(lambda s: ops.grow(m, s, s))(i32([0]))
    assert m.stats().reserved_bytes == 0
