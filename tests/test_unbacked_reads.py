"""Issue 14, item 3: displaying or reducing a cache view used to kill the process.

A view is the whole ``[max_batch, max_seq, kv_heads, head_dim]`` reservation, mostly
unbacked. ``print(m.k[0])``, ``repr(m.k[0])`` and ``float(m.k[0].sum())`` read all of
it, and so do debuggers and loggers that show locals; on the host backend the
unbacked part was PROT_NONE, so each one was a segfault.

``CacheConfig.unbacked_reads`` chooses: ``"zeros"`` (the host default) reserves a
private read-only anonymous mapping, so unbacked memory reads as zeros and writes
to it still fault; ``"fault"`` keeps the strict behaviour the no-copy proofs rely on.
Every reproducer runs in a subprocess, so a segfault fails a test instead of ending
the run. The reductions, the unmap-then-read and the strict-mode fault also run on
the interleaved layout (both layers in one [MB, S, 2, 2, Hkv, D] tensor), reading
layer 0's K out of it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import jax_vattention as jv
from jax_vattention import _core
from jax_vattention.config import DEFAULT_UNBACKED_READS

CFG = dict(num_layers=2, max_batch=4, max_seq=128, kv_heads=2, head_dim=16, dtype="float32", page_bytes=4096)

SCRIPT = textwrap.dedent(
    """
    import ctypes, sys
    import jax.numpy as jnp, numpy as np
    import jax_vattention as jv

    mode, case, g = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # 2 layers x [4, 128, 2, 16] f32, 32 tokens per page, 4 pages per slot: per-layer (g=1), 128 B tokens in
    # 4 KiB pages; interleaved (g=2), 512 B tokens (K, V of both layers) in 16 KiB pages.
    cfg = jv.CacheConfig(num_layers=2, max_batch=4, max_seq=128, kv_heads=2, head_dim=16, dtype="float32",
                         page_bytes=4096 * (1 if g == 1 else 2 * g), layers_per_group=g,
                         unbacked_reads=None if mode == "default" else mode,
                         deferred_reclaim=case != "free_without_reclaim")
    m = jv.KVCacheManager(cfg)
    print("MODE", m.unbacked_reads, flush=True)
    T = len(m.tensors)
    # Layer 0's K and V as whole [MB, S, Hkv, D] arrays: a view per-layer, a strided slice of the one tensor
    # interleaved (reading it reads the whole reservation either way).
    k0 = (lambda: m.k[0]) if g == 1 else (lambda: m.tensors[0][:, :, 0, 0])
    v0 = (lambda: m.v[0]) if g == 1 else (lambda: m.tensors[0][:, :, 0, 1])
    v1 = (lambda: m.v[1]) if g == 1 else (lambda: m.tensors[0][:, :, 1, 1])
    s = m.allocate(5)
    n = 40 if case in ("trim", "free_without_reclaim") else 5     # 40 tokens: pages 0 and 1 of the slot
    vals = jnp.arange(1, n + 1, dtype=jnp.float32)[None, :, None, None] * jnp.ones((1, n, 2, 16), jnp.float32)
    m.grow(s, n)
    i32 = lambda x: jnp.array([x], jnp.int32)
    jv.write(m, 0, vals, -vals, i32(s), i32(0), i32(n)).block_until_ready()
    expected = np.zeros(k0().shape, np.float32)             # [MB, S, Hkv, D]: zeros wherever nothing was written
    expected[s, :n] = np.asarray(vals[0])

    if case == "print":
        print(k0())
    elif case == "repr":
        print(repr(k0()))
    elif case == "cache_repr":
        print(repr(m.cache([s], [n])))                      # never reads the views, in either mode
    elif case == "sum":
        print("SUM", float(k0().sum()))
    elif case in ("trim", "free_without_reclaim"):
        np.testing.assert_array_equal(np.asarray(k0()), expected)
        m.free(s)
        if case == "trim":
            assert m.stats().pages_mapped_free_slots == 2 * T  # deferred: still mapped, still holding the tokens
            np.testing.assert_array_equal(np.asarray(k0()), expected)
            assert m.trim() == 2 * T
        assert m.stats().pages_mapped == 0
        # The written, then unmapped pages read zeros again, through jax and through the raw address.
        assert float(jnp.abs(k0()).sum()) == 0.0 and float(jnp.abs(v0()).sum()) == 0.0
        raw = (ctypes.c_uint8 * (n * m._native.token_bytes)).from_address(m._native.tensor_address(0)
                                                                          + s * m._native.slot_bytes)
        assert not np.frombuffer(raw, np.uint8).any()
        print("ZEROED")
    elif case == "write_unbacked":                          # writes to unbacked memory fault in every mode
        addr = m._native.entry_address(1, 1) + 3 * m._native.slot_bytes
        ctypes.memset(addr, 1, 8)
        print("WROTE")
    else:
        raise SystemExit("unknown case " + case)

    if case in ("print", "repr", "sum"):                    # survived: the whole view is the written data + zeros
        np.testing.assert_array_equal(np.asarray(k0()), expected)
        np.testing.assert_array_equal(np.asarray(v1()), 0)
    m.close()
    print("OK", case)
    """
)


def run(mode: str, case: str, layers_per_group: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", SCRIPT, mode, case, str(layers_per_group)], capture_output=True,
                          text=True, env=env, timeout=120)


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


# -- "zeros" (the host default): every reproducer of the issue returns normally --------------


@pytest.mark.parametrize("case", ["print", "repr", "cache_repr", "sum"])
def test_reproducers_return_normally_by_default(case):
    proc = run("default", case)
    assert proc.returncode == 0, describe(proc)
    out = proc.stdout
    assert "MODE zeros" in out and f"OK {case}" in out, describe(proc)
    if case == "print":
        assert "[[[[1. 1. 1." in out and "0. 0. 0." in out, out  # written tokens and zeros around them
    elif case == "repr":
        assert out.count("Array(") == 1 and "[[[[1., 1., 1.," in out and "0., 0., 0.," in out, out
    elif case == "cache_repr":
        assert "KVCache(manager=KVCacheManager(host" in out and "rows=1" in out, out
    else:
        assert "SUM 480.0" in out, out  # (1 + 2 + 3 + 4 + 5) x 2 heads x 16 dims, the rest zeros


def test_a_reduction_of_an_interleaved_layer_returns_normally_by_default():
    proc = run("default", "sum", 2)
    assert proc.returncode == 0 and "MODE zeros" in proc.stdout and "OK sum" in proc.stdout, describe(proc)
    assert "SUM 480.0" in proc.stdout, proc.stdout  # layer 0's K only, not the V beside it


@pytest.mark.parametrize("case, layers_per_group", [("trim", 1), ("free_without_reclaim", 1), ("trim", 2)])
def test_an_unmapped_page_reads_zeros_again(case, layers_per_group):
    """A page written, then unmapped (trim of a deferred slot; free without deferred reclamation) reads zeros."""
    proc = run("zeros", case, layers_per_group)
    assert proc.returncode == 0 and "ZEROED" in proc.stdout, describe(proc)


# -- "fault": the strict mode still faults ----------------------------------------------------


@pytest.mark.parametrize("case, layers_per_group", [("print", 1), ("repr", 1), ("sum", 1), ("sum", 2)])
def test_strict_mode_still_faults(case, layers_per_group):
    proc = run("fault", case, layers_per_group)
    assert proc.returncode == -signal.SIGSEGV, describe(proc)
    assert "MODE fault" in proc.stdout and "OK" not in proc.stdout


def test_cache_repr_never_reads_the_views_even_in_strict_mode():
    proc = run("fault", "cache_repr")
    assert proc.returncode == 0 and "OK cache_repr" in proc.stdout, describe(proc)


@pytest.mark.parametrize("mode", ["zeros", "fault"])
def test_writes_to_unbacked_memory_fault_in_every_mode(mode):
    proc = run(mode, "write_unbacked")
    assert proc.returncode == -signal.SIGSEGV, describe(proc)
    assert "WROTE" not in proc.stdout


# -- the setting -------------------------------------------------------------------------------


def test_defaults_and_reporting():
    assert DEFAULT_UNBACKED_READS == {"host": "zeros", "cuda": "fault"}
    assert jv.CacheConfig(**CFG).unbacked_reads is None
    assert jv.CacheConfig(**CFG).unbacked_reads_for("host") == "zeros"
    assert jv.CacheConfig(**CFG).unbacked_reads_for("cuda") == "fault"
    for mode in (None, "zeros", "fault"):
        m = jv.KVCacheManager(jv.CacheConfig(**CFG, unbacked_reads=mode), device="cpu")
        want = mode or "zeros"
        assert m.unbacked_reads == want and m._native.unbacked_reads == want
        m.close()
        assert m.unbacked_reads == want  # still answers after close


@pytest.mark.parametrize("value", ["Zeros", "", "none", "segfault", 0, True, b"zeros"])
def test_a_bad_value_is_a_cache_value_error(value):
    with pytest.raises(jv.CacheValueError, match="unbacked_reads"):
        jv.CacheConfig(**CFG, unbacked_reads=value)


def test_the_native_constructor_refuses_a_bad_value():
    native = dict(num_layers=2, max_batch=3, max_seq=128, kv_heads=2, head_dim=16, itemsize=4, page_bytes=4096,
                  pool_bytes=1 << 20, deferred_reclaim=True, backend="host", device_ordinal=0)
    with pytest.raises(jv.CacheValueError, match="unbacked_reads must be 'zeros' or 'fault', got 'maybe'"):
        _core.Manager(**native, unbacked_reads="maybe")
    m = _core.Manager(**native, unbacked_reads="fault")
    assert m.unbacked_reads == "fault"
    m.close()
