"""GPU suite: the CUDA VMM backend under jit, checked independently of JAX.

Device memory is read back with cuda-python (cuMemcpyDtoH) and physical usage
with cuMemGetInfo, so neither check trusts the code under test. Every case
that could fault runs in a subprocess: an illegal address would otherwise kill
the CUDA context for the rest of the suite. Tests taking ``layout`` run on
per-layer tensors and on every layer interleaved in one tensor.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jax_vattention as jv
from jax_vattention.hlo import cache_sized_copies

pytestmark = pytest.mark.gpu
MIB = 1 << 20


def driver():
    from cuda.bindings import driver as cu

    (err,) = cu.cuInit(0)
    assert err == cu.CUresult.CUDA_SUCCESS
    err, dev = cu.cuDeviceGet(jax.devices("gpu")[0].local_hardware_id)
    err, ctx = cu.cuDevicePrimaryCtxRetain(dev)
    (err,) = cu.cuCtxSetCurrent(ctx)
    assert err == cu.CUresult.CUDA_SUCCESS
    return cu


def read_device(address: int, nbytes: int) -> np.ndarray:
    cu = driver()
    (err,) = cu.cuCtxSynchronize()
    out = np.empty(nbytes, np.uint8)
    (err,) = cu.cuMemcpyDtoH(out.ctypes.data, address, nbytes)
    assert err == cu.CUresult.CUDA_SUCCESS, err
    return out


def free_device_bytes() -> int:
    cu = driver()
    (err,) = cu.cuCtxSynchronize()
    err, free, _ = cu.cuMemGetInfo()
    assert err == cu.CUresult.CUDA_SUCCESS
    return int(free)


def token_bytes_at(m, layer, kv, slot, pos, count=1) -> np.ndarray:
    """Layer ``layer``'s K (kv=0) or V of tokens [pos, pos+count) of a slot, read from its entries (token_bytes
    apart, entry_bytes each)."""
    native = m._native
    addr = native.entry_address(layer, kv) + int(slot) * native.slot_bytes + int(pos) * native.token_bytes
    return np.concatenate([read_device(addr + i * native.token_bytes, native.entry_bytes) for i in range(count)])


@pytest.fixture(params=["per-layer", "interleaved"])
def layout(request):
    return request.param


def small_config(layout="per-layer", **kw):
    # 2 layers of [2, 128] bf16 entries (512 B): per-layer 4096 tokens a 2 MiB page, interleaved (both layers'
    # K and V in one tensor) 1024.
    base = dict(num_layers=2, max_batch=4, max_seq=4096, kv_heads=2, head_dim=128, dtype="bfloat16",
                layers_per_group=2 if layout == "interleaved" else 1)
    base.update(kw)
    return jv.CacheConfig(**base)


def decode_loop(steps):
    """jit: `steps` decode-like iterations, each growing by one token and writing every layer."""

    def run(cache, kv0):  # kv0: [B, 1, Hkv, D]
        def body(i, state):
            c = cache.with_state(state).grow(state.lengths + 1)
            val = (kv0 + i.astype(kv0.dtype)).astype(kv0.dtype)
            for layer in range(c.manager.config.num_layers):
                c.write(layer, val, -val)
            return c.state

        return lax.fori_loop(0, steps, body, cache.state)

    return jax.jit(run)


def test_views_are_zero_copy_on_gpu(layout):
    with jv.KVCacheManager(small_config(layout)) as m:
        assert m.backend == "cuda"
        assert len(m.tensors) == m.config.num_tensors
        for t, view in enumerate(m.tensors):
            assert view.unsafe_buffer_pointer() == m._native.tensor_address(t)
            assert view.shape == m.config.tensor_shape(m.max_seq)
            assert view.devices() == {jax.devices("gpu")[0]}
        for layer in range(2):
            for kv in (0, 1):
                tensor, entry = m.config.locate(layer)[kv]
                assert m._native.entry_address(layer, kv) == (m._native.tensor_address(tensor)
                                                              + entry * m._native.entry_bytes)
        if layout == "per-layer":
            assert m.k[1] is m.tensors[2] and m.v[1] is m.tensors[3]


def test_grow_and_write_in_fori_loop_land_in_vmm_memory(layout):
    rng = np.random.default_rng()
    with jv.KVCacheManager(small_config(layout)) as m:
        slots = [m.allocate(), m.allocate(), m.allocate()]
        starts = np.array([0, 1000, 1023], np.int32)  # ragged; 1023: one before an interleaved page boundary
        for s, n in zip(slots, starts):
            m.grow(s, int(n))
        rows = np.array([slots[2], -1, slots[0]], np.int32)  # non-adjacent + a padding row
        lengths = np.array([starts[2], 0, starts[0]], np.int32)
        cache = m.cache(rows, lengths)
        kv0 = jnp.asarray(rng.standard_normal((3, 1, 2, 128)), jnp.bfloat16)
        state = decode_loop(20)(cache, kv0)
        np.testing.assert_array_equal(np.asarray(state.lengths), lengths + np.array([20, 20, 20]))
        for b, slot in enumerate(rows):
            if slot < 0:
                continue
            for i in range(20):
                want = np.asarray((kv0[b] + i).astype(jnp.bfloat16)).view(np.uint8).ravel()
                for layer in range(2):
                    got_k = token_bytes_at(m, layer, 0, slot, lengths[b] + i)
                    got_v = token_bytes_at(m, layer, 1, slot, lengths[b] + i)
                    np.testing.assert_array_equal(got_k, want)
                    np.testing.assert_array_equal(
                        got_v, np.asarray(-(kv0[b] + i).astype(jnp.bfloat16)).view(np.uint8).ravel())
        assert m.capacity(slots[2]) >= starts[2] + 20


def test_compiled_gpu_loop_has_no_cache_sized_copy(layout):
    with jv.KVCacheManager(small_config(layout)) as m:
        s = m.allocate()
        cache = m.cache([s], [0])
        kv0 = jnp.ones((1, 1, 2, 128), jnp.bfloat16)
        hlo = decode_loop(4).lower(cache, kv0).compile().as_text()
        assert "vattn_write" in hlo and "vattn_grow" in hlo
        assert cache_sized_copies(hlo, 4 * m.max_seq * 2 * 128) == []  # one layer's K: [MB, S, Hkv, D]


def test_physical_memory_moves_by_mapped_bytes():
    cfg = small_config(max_batch=2, max_seq=65536)
    with jv.KVCacheManager(cfg) as m:
        s = m.allocate()
        before = free_device_bytes()
        m.grow(s, 32 * 1024)  # 512 B/token * 32K tokens = 16 MiB in each of 4 tensors
        mapped = m.stats().mapped_bytes
        assert mapped == 4 * 16 * MIB
        used = before - free_device_bytes()
        assert abs(used - mapped) <= 4 * MIB, (used, mapped)
        m.free(s)
        m.trim(release_physical=True)
        assert m.stats().mapped_bytes == 0
        assert abs(free_device_bytes() - before) <= 4 * MIB


def test_device_memory_moves_by_exactly_the_mapped_pages_at_16_tokens_a_page():
    """Llama-3-8B's cache shape with every layer in one group: a token of all 32 layers' K and V is 128 KiB, a
    2 MiB page holds 16 tokens, and cuMemGetInfo moves by exactly one page per 16 tokens a slot grows by."""
    cfg = jv.CacheConfig(num_layers=32, max_batch=4, max_seq=4096, kv_heads=8, head_dim=128, dtype="bfloat16",
                         layers_per_group=32)
    assert (cfg.num_tensors, cfg.token_bytes, cfg.tokens_per_page) == (1, 128 * 1024, 16)
    with jv.KVCacheManager(cfg) as m:
        assert m.min_request_bytes == 2 * MIB  # per-layer tensors: 64 pages, 128 MiB
        s = m.allocate()

        def free_now() -> int:
            return m.device_mem_info()[0]  # cuMemGetInfo through the manager's backend (grow maps synchronously)

        before = free_now()
        for tokens, pages in ((1, 1), (16, 1), (17, 2), (160, 10), (161, 11), (1000, 63)):
            m.grow(s, tokens)
            assert m.capacity(s) == 16 * pages and m.stats().pages_mapped == pages
            assert before - free_now() == pages * 2 * MIB, (tokens, pages, before - free_now())
        m.free(s)
        assert m.trim(release_physical=True) == 63
        assert free_now() == before


def test_shared_prefix_pages_count_once_in_device_memory_and_are_read_only_on_the_device():
    """Prefix caching on CUDA (Llama-3-8B's interleaved shape, 16 tokens a page): 10 pages pinned from one slot
    and mapped into two more cost cuMemGetInfo 10 pages, not 30; the other slots read the same bytes; a write
    starting in a shared range is refused by the write kernel (nothing stored) and one right after it lands."""
    cfg = jv.CacheConfig(num_layers=32, max_batch=4, max_seq=4096, kv_heads=8, head_dim=128, dtype="bfloat16",
                         layers_per_group=32)
    with jv.KVCacheManager(cfg) as m:
        free_now = lambda: m.device_mem_info()[0]  # noqa: E731
        before = free_now()
        a = m.allocate(160)  # 10 pages
        x = jax.random.normal(jax.random.key(0), (1, 160, 8, 128), jnp.bfloat16)
        jv.ops.write(m, 3, x, -x, jnp.array([a], jnp.int32), jnp.zeros(1, jnp.int32), jnp.full(1, 160, jnp.int32))
        handles = m.pin_pages(a, 10)
        b, c = m.allocate(), m.allocate()
        m.map_shared(b, handles)
        m.map_shared(c, handles)
        assert before - free_now() == 10 * 2 * MIB
        s = m.stats()
        assert (s.pages_in_use, s.pages_live, s.pages_mapped, s.pages_shared) == (10, 10, 30, 10)
        for slot in (b, c):
            np.testing.assert_array_equal(token_bytes_at(m, 3, 0, slot, 0, 160), token_bytes_at(m, 3, 0, a, 0, 160))
        m.grow(b, 161)  # an owned page after the shared ones
        assert before - free_now() == 11 * 2 * MIB
        bad = jnp.full((1, 1, 8, 128), 5, jnp.bfloat16)
        jv.ops.write(m, 3, bad, bad, jnp.array([b], jnp.int32), jnp.array([159], jnp.int32),
                     jnp.array([1], jnp.int32)).block_until_ready()
        with pytest.raises(jv.CacheValueError, match="read-only shared range"):
            m.check_device_errors()
        np.testing.assert_array_equal(token_bytes_at(m, 3, 0, a, 159), token_bytes_at(m, 3, 0, c, 159))
        assert not (token_bytes_at(m, 3, 0, a, 159).view(np.uint16) == 0x40A0).all()  # not 5.0 in bf16
        out = jv.ops.write(m, 3, bad, bad, jnp.array([b], jnp.int32), jnp.array([160], jnp.int32),
                           jnp.array([1], jnp.int32))
        assert int(out[0]) == 161
        m.check_device_errors()
        assert (token_bytes_at(m, 3, 0, b, 160).view(np.uint16) == 0x40A0).all()
        m.free(a)
        m.free(b)
        m.free(c)
        m.unpin_pages(handles)
        m.trim(release_physical=True)
        s = m.stats()
        assert (s.pages_in_use, s.pages_live, s.pages_shared, s.pages_pinned) == (0, 0, 0, 0)
        assert free_now() == before


def _run_isolated(code: str):
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(__file__),
    )


SPARSE_STEP = """
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    import jax_vattention as jv
    g = {layers_per_group}
    cfg = jv.CacheConfig(num_layers=2, max_batch=8, max_seq=32768, kv_heads=8, head_dim=128, dtype="bfloat16",
                         layers_per_group=g,
                         unbacked_reads="fault")   # strict: an unbacked read is an illegal address, not zeros
    m = jv.KVCacheManager(cfg)          # 2 GiB reserved (4 tensors of 512 MiB, or 1 of 2 GiB), nothing mapped
    assert m.unbacked_reads == "fault"
    slots = np.array([m.allocate(), m.allocate()], np.int32)

    @jax.jit
    def steps(cache, kv):
        def body(i, state):
            c = cache.with_state(state).grow(state.lengths + 1)
            lens, c = c.write(0, kv, kv)
            c.write(1, kv, kv)
            if g == 1:   # layer 0's K: tensor 0, [MB, S, Hkv, D]
                got = lax.dynamic_slice(c.tensors[0], (c.slots[0], lens[0] - 1, 0, 0), (1, 1, 8, 128))
            else:        # entry (0, 0) of the interleaved [MB, S, g, 2, Hkv, D]
                got = lax.dynamic_slice(c.tensors[0], (c.slots[0], lens[0] - 1, 0, 0, 0, 0),
                                        (1, 1, 1, 1, 8, 128))[:, :, 0, 0]
            return c.state, got
        return lax.scan(lambda s, i: body(i, s), cache.state, jnp.arange(1500))

    kv = jnp.full((2, 1, 8, 128), 3.0, jnp.bfloat16)
    cache = m.cache(slots, [0, 700])
    from jax_vattention.hlo import assert_no_cache_copy
    assert_no_cache_copy(steps.lower(cache, kv).compile().as_text(), m)
    state, got = steps(cache, kv)
    assert np.asarray(state.lengths).tolist() == [1500, 2200], state.lengths
    assert np.all(np.asarray(got, np.float32) == 3.0)
    st = m.stats()
    tpp = m.tokens_per_page                      # 1024 per-layer, 256 interleaved (8 KiB tokens)
    pages = -(-1500 // tpp) + -(-2200 // tpp)
    assert st.mapped_bytes == len(m.tensors) * pages * (2 << 20), st
    print("MAPPED", st.mapped_bytes, "RESERVED", st.reserved_bytes)
    print(float(jnp.sum(jnp.ones(1000))))   # the context is still healthy
    {control}
"""


def test_sparse_mapping_never_faults(layout):
    proc = _run_isolated(SPARSE_STEP.format(control="", layers_per_group=2 if layout == "interleaved" else 1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1000.0" in proc.stdout


def test_sparse_mapping_detector_sees_a_full_read(layout):
    # Control: reading the whole view must touch unmapped pages and fail, so the
    # test above passing means no path read past the mapped pages.
    control = "print(float(jnp.sum(m.tensors[0].astype(jnp.float32))))"
    proc = _run_isolated(SPARSE_STEP.format(control=control, layers_per_group=2 if layout == "interleaved" else 1))
    assert proc.returncode != 0
    assert "ILLEGAL_ADDRESS" in proc.stderr.upper() or "illegal" in proc.stderr.lower(), proc.stderr[-3000:]


ZEROS_MODE = """
    import jax, jax.numpy as jnp, numpy as np
    import jax_vattention as jv
    from cuda.bindings import driver as cu
    PAGE = 2 << 20
    jnp.zeros(1).block_until_ready()   # XLA's own start-up allocations happen before the measurements
    cu.cuInit(0)
    cu.cuCtxSetCurrent(cu.cuDevicePrimaryCtxRetain(cu.cuDeviceGet(0)[1])[1])

    def free_bytes():
        cu.cuCtxSynchronize()
        return int(cu.cuMemGetInfo()[1])

    # 512 B per token: a 2 MiB page holds 4096 tokens, a slot is 2 pages, a tensor 8 pages (4 tensors).
    cfg = jv.CacheConfig(num_layers=2, max_batch=4, max_seq=8192, kv_heads=2, head_dim=128, dtype="bfloat16",
                         unbacked_reads="zeros", pool_bytes=64 << 20)
    before = free_bytes()
    m = jv.KVCacheManager(cfg)
    assert m.unbacked_reads == "zeros"
    used = before - free_bytes()
    assert abs(used - PAGE) <= PAGE, used              # one zero page shared by all 32 unbacked pages
    assert float(jnp.sum(m.k[0].astype(jnp.float32))) == 0.0   # the whole reservation reads as zeros
    print(repr(m.k[1])[:40])
    s = m.allocate(10)
    x = jnp.full((1, 10, 2, 128), 3.0, jnp.bfloat16)
    lens = jv.write(m, 0, x, -x, jnp.array([s], jnp.int32), jnp.zeros(1, jnp.int32), jnp.full(1, 10, jnp.int32))
    assert int(lens[0]) == 10
    k = np.asarray(m.k[0].astype(jnp.float32))          # a full read over a real page and zero pages
    assert (k[s, :10] == 3.0).all(), k[s, :10]
    assert (k[s, 4096:] == 0.0).all() and np.delete(k, s, 0).sum() == 0.0   # page 0 of slot s is real, not zeroed
    m.free(s)
    assert m.trim() == 4                                 # 1 page x 4 tensors unmapped: the zero page mapped back
    assert float(jnp.sum(jnp.abs(m.k[0].astype(jnp.float32)))) == 0.0
    s2 = m.allocate(5000)                                # two pages per tensor replace zero pages
    y = jnp.ones((1, 1, 2, 128), jnp.bfloat16)
    jv.write(m, 1, y, y, jnp.array([s2], jnp.int32), jnp.full(1, 4999, jnp.int32), jnp.ones(1, jnp.int32))
    assert float(m.k[1][s2, 4999, 0, 0].astype(jnp.float32)) == 1.0
    physical = m.stats().physical_bytes
    before_close = free_bytes()
    m.close()
    assert m.stats().reserved_bytes == 0 and not m.pending_release
    freed = free_bytes() - before_close
    assert abs(freed - (physical + PAGE)) <= PAGE, (freed, physical)   # the pages and the zero page
    print(float(jnp.sum(jnp.ones(1000))))   # the context is still healthy
"""


def test_zeros_mode_reads_unbacked_memory_as_zeros():
    """unbacked_reads="zeros" on CUDA: one read-only zero page mapped at every unbacked page; a full read of a
    sparse view gives zeros around the written tokens, trim maps the zero page back, close releases it."""
    proc = _run_isolated(ZEROS_MODE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1000.0" in proc.stdout


def test_write_past_capacity_is_refused_on_device_and_reported(layout):
    with jv.KVCacheManager(small_config(layout)) as m:
        a, b = m.allocate(), m.allocate()
        m.grow(a, 10)
        m.grow(b, 10)
        good = jnp.full((1, 1, 2, 128), 7, jnp.bfloat16)
        jv.ops.write(m, 0, good, good, jnp.array([b], jnp.int32), jnp.array([3], jnp.int32), jnp.array([1], jnp.int32))
        before = token_bytes_at(m, 0, 0, b, 3)
        cap = m.capacity(a)
        bad = jnp.ones((1, 1, 2, 128), jnp.bfloat16)
        out = jv.ops.write(m, 0, bad, bad, jnp.array([a], jnp.int32), jnp.array([cap], jnp.int32),
                           jnp.array([1], jnp.int32))
        out.block_until_ready()
        with pytest.raises(jv.CacheValueError, match="refused"):
            m.check_device_errors()
        np.testing.assert_array_equal(token_bytes_at(m, 0, 0, b, 3), before)
        # Inside jit, the refusal surfaces at the next grow.
        jv.ops.write(m, 0, bad, bad, jnp.array([a], jnp.int32), jnp.array([cap], jnp.int32), jnp.array([1], jnp.int32))
        with pytest.raises(jax.errors.JaxRuntimeError, match="CacheValueError"):
            jax.block_until_ready(jv.ops.grow(m, jnp.array([a], jnp.int32), jnp.array([20], jnp.int32)))
        assert float(jnp.sum(jnp.ones(8))) == 8.0  # context healthy
        np.testing.assert_array_equal(token_bytes_at(m, 0, 0, b, 3), before)


def test_in_jit_errors_name_the_problem_on_gpu():
    cfg = small_config(max_seq=16384, pool_bytes=8 * 2 * MIB)  # 4096 tokens a page, 4 tensors
    with jv.KVCacheManager(cfg) as m:
        a = m.allocate()
        free_slot = m.allocate()
        m.free(free_slot)
        grow = jax.jit(lambda s, n: jv.ops.grow(m, s, n))
        with pytest.raises(jax.errors.JaxRuntimeError, match="SlotStateError"):
            jax.block_until_ready(grow(jnp.array([free_slot], jnp.int32), jnp.array([5], jnp.int32)))
        with pytest.raises(jax.errors.JaxRuntimeError, match="PoolExhaustedError"):
            jax.block_until_ready(grow(jnp.array([a], jnp.int32), jnp.array([16384], jnp.int32)))
        with pytest.raises(jax.errors.JaxRuntimeError, match="CacheValueError"):
            jax.block_until_ready(grow(jnp.array([a], jnp.int32), jnp.array([m.max_seq + 1], jnp.int32)))
        jax.block_until_ready(grow(jnp.array([a], jnp.int32), jnp.array([8192], jnp.int32)))
        assert m.capacity(a) == 8192


def test_close_releases_device_memory_and_blocks_reuse():
    before = free_device_bytes()
    m = jv.KVCacheManager(small_config())
    s = m.allocate(3000)
    step = jax.jit(lambda n: jv.ops.grow(m, jnp.array([s], jnp.int32), n))
    jax.block_until_ready(step(jnp.array([3500], jnp.int32)))
    assert before - free_device_bytes() >= m.stats().mapped_bytes - 4 * MIB
    m.close()
    st = m.stats()
    assert (st.reserved_bytes, st.pages_created, st.pages_mapped) == (0, 0, 0)
    assert abs(free_device_bytes() - before) <= 4 * MIB
    with pytest.raises(jax.errors.JaxRuntimeError, match="CacheClosedError"):
        jax.block_until_ready(step(jnp.array([3600], jnp.int32)))
    with pytest.raises(jv.CacheClosedError):
        m.grow(s, 10)
