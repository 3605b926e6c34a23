"""GPU suite: the CUDA VMM backend under jit, checked independently of JAX.

Device memory is read back with cuda-python (cuMemcpyDtoH) and physical usage
with cuMemGetInfo, so neither check trusts the code under test. Every case
that could fault runs in a subprocess: an illegal address would otherwise kill
the CUDA context for the rest of the suite.
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
    addr = m._native.tensor_address(layer, kv) + int(slot) * m._native.slot_bytes + int(pos) * m.config.token_bytes
    return read_device(addr, count * m.config.token_bytes)


def small_config(**kw):
    base = dict(num_layers=2, max_batch=4, max_seq=4096, kv_heads=2, head_dim=128, dtype="bfloat16")
    base.update(kw)
    return jv.CacheConfig(**base)


def decode_loop(steps):
    """jit: `steps` decode-like iterations, each growing by one token and writing every layer."""

    def run(cache, kv0):  # kv0: [B, 1, Hkv, D]
        def body(i, state):
            c = cache.with_state(state).grow(state.lengths + 1)
            val = (kv0 + i.astype(kv0.dtype)).astype(kv0.dtype)
            for layer in range(len(c.k)):
                c.write(layer, val, -val)
            return c.state

        return lax.fori_loop(0, steps, body, cache.state)

    return jax.jit(run)


def test_views_are_zero_copy_on_gpu():
    with jv.KVCacheManager(small_config()) as m:
        assert m.backend == "cuda"
        for layer in range(2):
            assert m.k[layer].unsafe_buffer_pointer() == m._native.tensor_address(layer, 0)
            assert m.v[layer].unsafe_buffer_pointer() == m._native.tensor_address(layer, 1)
            assert m.k[layer].devices() == {jax.devices("gpu")[0]}


def test_grow_and_write_in_fori_loop_land_in_vmm_memory():
    rng = np.random.default_rng()
    with jv.KVCacheManager(small_config()) as m:
        slots = [m.allocate(), m.allocate(), m.allocate()]
        starts = np.array([0, 1000, 1023], np.int32)  # ragged, one at a page boundary - 1
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


def test_compiled_gpu_loop_has_no_cache_sized_copy():
    with jv.KVCacheManager(small_config()) as m:
        s = m.allocate()
        cache = m.cache([s], [0])
        kv0 = jnp.ones((1, 1, 2, 128), jnp.bfloat16)
        hlo = decode_loop(4).lower(cache, kv0).compile().as_text()
        assert "vattn_write" in hlo and "vattn_grow" in hlo
        assert cache_sized_copies(hlo, m.k[0].size) == []


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
    cfg = jv.CacheConfig(num_layers=2, max_batch=8, max_seq=32768, kv_heads=8, head_dim=128, dtype="bfloat16",
                         unbacked_reads="fault")   # strict: an unbacked read is an illegal address, not zeros
    m = jv.KVCacheManager(cfg)          # 2 x 2 x 512 MiB reserved, nothing mapped
    assert m.unbacked_reads == "fault"
    slots = np.array([m.allocate(), m.allocate()], np.int32)

    @jax.jit
    def steps(cache, kv):
        def body(i, state):
            c = cache.with_state(state).grow(state.lengths + 1)
            lens, c = c.write(0, kv, kv)
            c.write(1, kv, kv)
            got = lax.dynamic_slice(c.k[0], (c.slots[0], lens[0] - 1, 0, 0), (1, 1, 8, 128))
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
    assert st.mapped_bytes == 4 * (2 + 3) * (2 << 20), st   # 4 tensors x (2 + 3) pages of 1024 tokens
    print("MAPPED", st.mapped_bytes, "RESERVED", st.reserved_bytes)
    print(float(jnp.sum(jnp.ones(1000))))   # the context is still healthy
    {control}
"""


def test_sparse_mapping_never_faults():
    proc = _run_isolated(SPARSE_STEP.format(control=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1000.0" in proc.stdout


def test_sparse_mapping_detector_sees_a_full_read():
    # Control: reading the whole view must touch unmapped pages and fail, so the
    # test above passing means no path read past the mapped pages.
    proc = _run_isolated(SPARSE_STEP.format(control="print(float(jnp.sum(m.k[0].astype(jnp.float32))))"))
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


def test_write_past_capacity_is_refused_on_device_and_reported():
    with jv.KVCacheManager(small_config()) as m:
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
