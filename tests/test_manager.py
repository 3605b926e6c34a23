"""KVCacheManager core logic through the Python API (host backend, no jit).

Everything here is checked against expectations derived independently of the
library: page counts from token lengths, memory contents through ctypes over
the raw tensor addresses, and mapping state from /proc/self/maps.

Every test runs in both layouts (the autouse ``layers_per_group`` fixture):
per-layer tensors (4 tensors of [4, 128, 2, 16]) and both layers interleaved in
one tensor ([4, 128, 2, 2, 2, 16]). ``make_config`` scales the page with the
entries per token, so a page holds 32 tokens in both: page counts per tensor are
the same, only the number of tensors differs.
"""

from __future__ import annotations

import bisect
import ctypes
import gc
import math
import time

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_vattention as jv
from jax_vattention import _core, ops
from jax_vattention.errors import (
    BackendError,
    CacheClosedError,
    CacheValueError,
    PoolExhaustedError,
    SlotStateError,
)

PAGE = 4096  # host mapping granularity
_LAYOUT = {"g": 1}  # layers_per_group of the running test (set by the autouse fixture)


@pytest.fixture(autouse=True, params=[1, 2], ids=["per-layer", "interleaved"])
def layers_per_group(request):
    _LAYOUT["g"] = request.param
    yield request.param
    _LAYOUT["g"] = 1


def make_config(**overrides) -> jv.CacheConfig:
    # 2 layers x [4, 128, 2, 16] float32 in the running test's layout: a page of 4 KiB per entry of a token, so
    # 32 tokens per page and 4 pages per slot in either layout (128 B tokens per-layer, 512 B interleaved).
    g = overrides.pop("layers_per_group", _LAYOUT["g"])
    entries = 1 if g == 1 else 2 * g
    kw = dict(num_layers=2, max_batch=4, max_seq=128, kv_heads=2, head_dim=16, dtype="float32",
              page_bytes=PAGE * entries, layers_per_group=g)
    kw.update(overrides)
    return jv.CacheConfig(**kw)


@pytest.fixture
def manager():
    with jv.KVCacheManager(make_config()) as m:
        yield m


# -- independent expectations --------------------------------------------------


def pages_for(cfg: jv.CacheConfig, tokens: int) -> int:
    """Pages one tensor needs to back tokens [0, tokens)."""
    return math.ceil(tokens * cfg.token_bytes / cfg.page_bytes)


def tokens_backed(m: jv.KVCacheManager, pages: int) -> int:
    return min(m.max_seq, pages * m.config.page_bytes // m.config.token_bytes)


def num_tensors(m: jv.KVCacheManager) -> int:
    """Reserved tensors, derived here: 2 per layer, or one per group of g interleaved layers."""
    g = m.config.layers_per_group
    return 2 * m.config.num_layers if g == 1 else m.config.num_layers // g


def tensor_bases(m) -> list[int]:
    return [m._native.tensor_address(t) for t in range(num_tensors(m))]


# -- raw memory access (independent of jax) ------------------------------------


def token_address(m, layer: int, kv: int, slot: int, pos: int) -> int:
    """Address of token ``pos`` of ``slot`` in layer ``layer``'s K (kv=0) or V (kv=1), wherever the layout puts it."""
    return m._native.entry_address(layer, kv) + slot * m._native.slot_bytes + pos * m.config.token_bytes


def raw_entries(m, layer: int, kv: int, slot: int, start: int, count: int) -> np.ndarray:
    """A writable numpy view [count, entry_bytes] (uint8) of one layer's K or V over tokens [start, start+count)
    of a slot: rows token_bytes apart in the raw mapping."""
    cfg = m.config
    span = (count - 1) * cfg.token_bytes + cfg.entry_bytes
    flat = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(token_address(m, layer, kv, slot, start)))
    return np.lib.stride_tricks.as_strided(flat, (count, cfg.entry_bytes), (cfg.token_bytes, 1))


def read_raw(m, layer: int, kv: int, slot: int, start: int, count: int) -> np.ndarray:
    """Tokens [start, start+count) of one slot, copied out of the mapping. -> [count, Hkv, D]"""
    cfg = m.config
    if count == 0:
        return np.zeros((0, cfg.kv_heads, cfg.head_dim), cfg.jnp_dtype)
    raw = raw_entries(m, layer, kv, slot, start, count).copy()
    return raw.view(cfg.jnp_dtype).reshape(count, cfg.kv_heads, cfg.head_dim)


def write_raw(m, layer: int, kv: int, slot: int, start: int, values: np.ndarray) -> None:
    """Store values [count, Hkv, D] at tokens [start, ...) of a slot, through the raw mapping."""
    values = np.ascontiguousarray(values, dtype=m.config.jnp_dtype)
    raw_entries(m, layer, kv, slot, start, values.shape[0])[:] = values.view(np.uint8).reshape(values.shape[0], -1)


def view_tokens(m, layer: int, kv: int, slot: int, start: int, count: int) -> np.ndarray:
    """Tokens [start, start+count) of one layer's K or V read through the jax view (a slice of the mapped part).
    -> [count, Hkv, D]"""
    cfg = m.config
    (tensor, entry) = cfg.locate(layer)[kv]
    view, h, d = m.tensors[tensor], cfg.kv_heads, cfg.head_dim
    if cfg.interleaved:  # [MB, S, g, 2, Hkv, D]
        group, kv_index = divmod(entry, 2)
        lo, hi = (slot, start, group, kv_index, 0, 0), (slot + 1, start + count, group + 1, kv_index + 1, h, d)
    else:  # [MB, S, Hkv, D]
        lo, hi = (slot, start, 0, 0), (slot + 1, start + count, h, d)
    return np.asarray(jax.lax.slice(view, lo, hi)).reshape(count, h, d)


def fill_slot(m, slot: int, tokens: int, seed: int) -> dict:
    """Write distinct random data into tokens [0, tokens) of every tensor; returns it by (layer, kv)."""
    cfg = m.config
    rng = np.random.default_rng(seed)
    data = {}
    for layer in range(cfg.num_layers):
        for kv in (0, 1):
            x = rng.standard_normal((tokens, cfg.kv_heads, cfg.head_dim)).astype(cfg.jnp_dtype)  # [T, Hkv, D]
            write_raw(m, layer, kv, slot, 0, x)
            data[layer, kv] = x
    return data


def assert_slot_data(m, slot: int, data: dict) -> None:
    for (layer, kv), x in data.items():
        got = read_raw(m, layer, kv, slot, 0, x.shape[0])
        np.testing.assert_array_equal(got.view(np.uint8), x.view(np.uint8), err_msg=f"layer {layer} kv {kv}")


# -- /proc/self/maps -----------------------------------------------------------


class MemoryMaps:
    """A snapshot of /proc/self/maps: (start, end, perms, name) regions sorted by start."""

    def __init__(self):
        self.regions = []
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                self.regions.append((lo, hi, parts[1], parts[5].strip() if len(parts) > 5 else ""))
        self.starts = [r[0] for r in self.regions]

    def at(self, addr: int):
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and self.regions[i][0] <= addr < self.regions[i][1]:
            return self.regions[i]
        return None

    def overlapping(self, lo: int, hi: int):
        return [r for r in self.regions if r[0] < hi and lo < r[1]]


def is_pool_page(region) -> bool:
    return region is not None and region[2] == "rw-s" and "jax_vattention_pool" in region[3]


# Reserved memory with no page behind it, by CacheConfig.unbacked_reads: a private anonymous mapping, PROT_NONE
# ("fault": reading it faults) or read-only ("zeros": reading it gives the kernel's zero page).
HOLE_PERMS = {"fault": "---p", "zeros": "r--p"}


def is_reserved_hole(region, unbacked_reads: str | None = None) -> bool:
    """An anonymous hole of the kind ``unbacked_reads`` reserves (either kind when None)."""
    if region is None or region[3] != "":
        return False
    return region[2] in (HOLE_PERMS.values() if unbacked_reads is None else (HOLE_PERMS[unbacked_reads],))


def reads_zero(address: int, nbytes: int) -> bool:
    """The first and last 8 bytes at ``address`` read as zero (only call it on readable memory)."""
    return ctypes.c_uint64.from_address(address).value == 0 == ctypes.c_uint64.from_address(address + nbytes - 8).value


def dirty_mapped_pages(m: jv.KVCacheManager) -> None:
    """Store a non-zero word at both ends of every mapped page (live and deferred slots), so a page unmapped later
    shows whether its hole reads zeros again."""
    cfg, marker = m.config, ctypes.c_uint64(0xA5A5A5A5A5A5A5A5)
    for base in tensor_bases(m):
        for i, tokens in enumerate(m.stats().slot_capacity):
            for page in range(pages_for(cfg, tokens)):
                address = base + i * m._native.slot_bytes + page * cfg.page_bytes
                ctypes.memmove(address, ctypes.addressof(marker), 8)
                ctypes.memmove(address + cfg.page_bytes - 8, ctypes.addressof(marker), 8)


# -- the core invariant ----------------------------------------------------------


def assert_consistent(m: jv.KVCacheManager, pages: dict[int, int], allocated: set[int]) -> None:
    """pages: expected mapped pages per tensor for each slot (missing = 0)."""
    cfg, T = m.config, num_tensors(m)
    s = m.stats()
    expected = [pages.get(i, 0) for i in range(cfg.max_batch)]
    assert s.pages_mapped == sum(expected) * T
    assert s.mapped_bytes == s.pages_mapped * cfg.page_bytes
    assert s.pages_mapped_free_slots == sum(p for i, p in enumerate(expected) if i not in allocated) * T
    assert s.slot_capacity == tuple(tokens_backed(m, p) for p in expected)
    assert s.slot_allocated == tuple(i in allocated for i in range(cfg.max_batch))
    assert s.live_slots == len(allocated)
    assert s.pages_created == s.pages_mapped + s.pages_free
    assert s.maps - s.unmaps == s.pages_mapped
    assert s.creates - s.destroys == s.pages_created
    for i in range(cfg.max_batch):
        assert m.capacity(i) == tokens_backed(m, expected[i])
        assert m.allocated(i) == (i in allocated)
    # The mappings themselves: pages [0, p) of every tensor are pool pages, the rest holes of the configured kind
    # (in "zeros" mode they read zeros, whatever was stored there before they were unmapped).
    maps = MemoryMaps()
    per_slot, mode = m._native.pages_per_slot, m.unbacked_reads
    for t, base in enumerate(tensor_bases(m)):
        for i, p in enumerate(expected):
            for page in range(per_slot):
                address = base + i * m._native.slot_bytes + page * cfg.page_bytes
                region = maps.at(address)
                ok = is_pool_page(region) if page < p else is_reserved_hole(region, mode)
                assert ok, f"tensor {t} slot {i} page {page} (expect {p} mapped, {mode}): {region}"
                if page >= p and mode == "zeros":
                    assert reads_zero(address, cfg.page_bytes), f"tensor {t} slot {i} page {page}"


# -- construction, views, rounding --------------------------------------------------


def test_views_are_zero_copy(manager):
    cfg, native = manager.config, manager._native
    T, g = num_tensors(manager), cfg.layers_per_group
    assert len(manager.tensors) == T == native.num_tensors == cfg.num_tensors
    shape = (cfg.max_batch, manager.max_seq, cfg.kv_heads, cfg.head_dim)  # [MB, S, Hkv, D]
    if g > 1:
        shape = (cfg.max_batch, manager.max_seq, g, 2, cfg.kv_heads, cfg.head_dim)  # [MB, S, g, 2, Hkv, D]
    for t, view in enumerate(manager.tensors):
        assert view.shape == shape and view.dtype == cfg.jnp_dtype
        assert view.unsafe_buffer_pointer() == native.tensor_address(t)
    # The token stride and where each layer's K and V entries sit in it.
    entry = cfg.kv_heads * cfg.head_dim * 4
    assert native.entry_bytes == entry and native.token_bytes == entry * (1 if g == 1 else 2 * g) == cfg.token_bytes
    for layer in range(cfg.num_layers):
        for kv in (0, 1):
            tensor, index = (2 * layer + kv, 0) if g == 1 else (layer // g, 2 * (layer % g) + kv)
            assert cfg.locate(layer)[kv] == (tensor, index)
            assert native.locate(layer, kv) == (tensor, index * entry)
            assert native.entry_address(layer, kv) == native.tensor_address(tensor) + index * entry
    # Distinct, non-overlapping, page-aligned reservations.
    tensor_bytes = cfg.max_batch * native.slot_bytes
    assert native.tensor_bytes == tensor_bytes
    addresses = sorted(tensor_bases(manager))
    assert all(a % cfg.page_bytes == 0 for a in addresses)
    assert all(b - a >= tensor_bytes for a, b in zip(addresses, addresses[1:]))


def test_per_layer_arrays_exist_only_in_the_per_layer_layout(manager):
    cfg = manager.config
    if not cfg.interleaved:  # k[l] and v[l] are the very objects tensors[2l] and tensors[2l + 1]
        assert len(manager.k) == len(manager.v) == cfg.num_layers
        for layer in range(cfg.num_layers):
            assert manager.k[layer] is manager.tensors[2 * layer] and manager.v[layer] is manager.tensors[2 * layer + 1]
        return
    for name in ("k", "v"):
        with pytest.raises(CacheValueError, match=r"interleaved.*manager\.tensors.*config\.locate"):
            getattr(manager, name)


def test_view_reads_what_was_stored_raw(manager):
    slot = manager.allocate(40)
    data = fill_slot(manager, slot, 40, seed=1)
    # The jax view and the raw pointer see the same bytes (only the mapped pages are read).
    for (layer, kv), x in data.items():
        np.testing.assert_array_equal(view_tokens(manager, layer, kv, slot, 0, 40), x)


def test_fresh_manager_reserves_but_maps_nothing(manager):
    s = manager.stats()
    cfg = manager.config
    assert s.reserved_bytes == num_tensors(manager) * cfg.max_batch * manager._native.slot_bytes
    assert s.pages_created == s.pages_mapped == s.maps == 0
    assert s.pages_budget == num_tensors(manager) * cfg.max_batch * 4  # default pool: every slot at max_seq
    assert_consistent(manager, {}, set())


@pytest.mark.parametrize(
    "kv_heads, head_dim, dtype, max_seq, expected",
    [
        (2, 16, "float32", 128, 128),  # 128 B tokens divide the page: no rounding
        (2, 16, "float32", 100, 128),  # rounded up to whole pages (32 tokens each)
        (3, 16, "float32", 100, 128),  # 192 B tokens: lcm(192, 4096) = 64 tokens
        (3, 16, "float32", 64, 64),
        (5, 8, "bfloat16", 10, 256),  # 80 B tokens: lcm(80, 4096) = 256 tokens
    ],
)
def test_max_seq_rounding_is_reported(kv_heads, head_dim, dtype, max_seq, expected):
    cfg = make_config(kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, max_seq=max_seq)
    with jv.KVCacheManager(cfg) as m:
        assert m.max_seq == expected == m._native.max_seq
        assert m._native.slot_bytes == expected * cfg.token_bytes
        assert m._native.slot_bytes % cfg.page_bytes == 0
        assert all(view.shape[1] == expected for view in m.tensors)
        assert (f"rounded from {max_seq}" in repr(m)) == (expected != max_seq)
        # The whole padded range is usable.
        slot = m.allocate()
        m.grow(slot, m.max_seq)
        assert m.capacity(slot) == m.max_seq
        assert_consistent(m, {slot: pages_for(cfg, m.max_seq)}, {slot})


def test_tokens_straddling_pages_are_fully_backed():
    # 192 B tokens: token 21 spans bytes [4032, 4224), across the first page boundary.
    cfg = make_config(kv_heads=3, max_seq=128)
    with jv.KVCacheManager(cfg) as m:
        slot = m.allocate(21)
        assert m.capacity(slot) == 21  # floor(4096 / 192)
        assert_consistent(m, {slot: 1}, {slot})
        m.grow(slot, 22)
        assert m.capacity(slot) == 42
        assert_consistent(m, {slot: 2}, {slot})
        data = fill_slot(m, slot, 22, seed=3)  # would fault if the straddling token were half backed
        assert_slot_data(m, slot, data)


@pytest.mark.parametrize(
    "overrides",
    [dict(num_layers=0), dict(max_batch=-1), dict(max_seq=0), dict(head_dim=True), dict(dtype="int8"),
     dict(dtype="float64"), dict(page_bytes=0), dict(pool_bytes=0), dict(max_seq=2**31)],
)
def test_bad_config_is_rejected(overrides):
    with pytest.raises(CacheValueError):
        make_config(**overrides)


@pytest.mark.parametrize("overrides", [dict(page_bytes=PAGE + 512), dict(pool_bytes=PAGE - 1)])
def test_bad_config_is_rejected_by_the_core(overrides):
    with pytest.raises(CacheValueError, match="granularity|smaller than one page"):
        jv.KVCacheManager(make_config(**overrides))


@pytest.mark.parametrize(
    "num_layers, value, message",
    [
        (2, 0, r"layers_per_group must be an int in \[1, 2\] .*got 0$"),
        (2, -2, r"layers_per_group must be an int in \[1, 2\] .*got -2$"),
        (4, 3, r"layers_per_group=3 does not divide num_layers=4 \(choose one of \[1, 2, 4\]\)"),
        (2, 4, r"layers_per_group must be an int in \[1, 2\] .*got 4$"),
        (2, True, r"layers_per_group must be an int .*got True \(bool\)"),
        (2, 2.0, r"layers_per_group must be an int .*got 2\.0 \(float\)"),
        (2, "2", r"layers_per_group must be an int .*got '2' \(str\)"),
    ],
)
def test_bad_layers_per_group_is_rejected(num_layers, value, message):
    with pytest.raises(CacheValueError, match=message):
        make_config(num_layers=num_layers, layers_per_group=value, page_bytes=PAGE)


@pytest.mark.parametrize("num_layers, value", [(2, 0), (2, -1), (4, 3), (2, 4)])
def test_bad_layers_per_group_is_rejected_by_the_core(num_layers, value):
    """The native layout checks it too (positive, divides num_layers) and names both."""
    native = dict(max_batch=3, max_seq=128, kv_heads=2, head_dim=16, itemsize=4, page_bytes=PAGE, pool_bytes=1 << 20,
                  deferred_reclaim=True, backend="host", device_ordinal=0, unbacked_reads="zeros")
    with pytest.raises(CacheValueError, match=f"layers_per_group={value} .*num_layers={num_layers}"):
        _core.Manager(num_layers=num_layers, layers_per_group=value, **native)
    with pytest.raises(TypeError, match="layers_per_group must be an int"):
        _core.Manager(num_layers=num_layers, layers_per_group=2.0, **native)
    m = _core.Manager(num_layers=4, layers_per_group=4, **native)
    assert (m.num_tensors, m.entries_per_token, m.token_bytes, m.entry_bytes) == (1, 8, 8 * 128, 128)
    m.close()


# -- the page-count invariant over random operation sequences -------------------------

# Token counts around page boundaries (32 tokens per page) make best-fit choices matter.
TOKENS = st.one_of(st.sampled_from([0, 1, 32, 33, 64, 65, 96, 128]), st.integers(0, 128))
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("allocate"), TOKENS),
        st.tuples(st.just("grow"), st.integers(0, 5), TOKENS),
        st.tuples(st.just("free"), st.integers(0, 5)),
        st.tuples(st.just("trim")),
    ),
    max_size=25,
)


def best_fit(mapped: list[int], allocated: set[int], need: int) -> int | None:
    """Reference policy: fewest mapped pages that cover `need`, else most mapped; lowest index on ties."""
    free = [i for i in range(len(mapped)) if i not in allocated]
    if not free:
        return None
    fitting = [i for i in free if mapped[i] >= need]
    if fitting:
        return min(fitting, key=lambda i: (mapped[i], i))
    return max(free, key=lambda i: (mapped[i], -i))


def pick_slot(k: int, allocated: set[int]) -> int:
    """k < 4 names the k-th live slot (mostly valid operations); k >= 4 any slot (often invalid)."""
    live = sorted(allocated)
    return live[k % len(live)] if k < 4 and live else k % 4


@pytest.mark.parametrize("unbacked_reads", ["zeros", "fault"])
@pytest.mark.parametrize("deferred", [True, False])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops_list=OPS)
def test_page_accounting_matches_a_reference_model(deferred, unbacked_reads, ops_list):
    cfg = make_config(deferred_reclaim=deferred, unbacked_reads=unbacked_reads)
    with jv.KVCacheManager(cfg) as m:
        assert m.unbacked_reads == unbacked_reads
        mapped = [0] * cfg.max_batch  # reference: pages per tensor of each slot
        allocated: set[int] = set()
        for op in ops_list:
            if op[0] == "allocate":
                want = best_fit(mapped, allocated, pages_for(cfg, op[1]))
                if want is None:
                    with pytest.raises(SlotStateError):
                        m.allocate(op[1])
                    continue
                assert m.allocate(op[1]) == want
                allocated.add(want)
                need, T = pages_for(cfg, op[1]), num_tensors(m)
                available = m.stats().pages_budget - T * sum(mapped)
                can_back_all = m.stats().pages_budget >= cfg.max_batch * pages_for(cfg, m.max_seq) * T
                if mapped[want] - need > 0 and not can_back_all and available < (mapped[want] - need) * T:
                    mapped[want] = need  # under pressure the slot's excess pages go back to the pool
                mapped[want] = max(mapped[want], need)
            elif op[0] == "grow":
                slot, tokens = pick_slot(op[1], allocated), op[2]
                if slot not in allocated:
                    with pytest.raises(SlotStateError):
                        m.grow(slot, tokens)
                    continue
                m.grow(slot, tokens)
                mapped[slot] = max(mapped[slot], pages_for(cfg, tokens))  # never shrinks
            elif op[0] == "free":
                slot = pick_slot(op[1], allocated)
                if slot not in allocated:
                    with pytest.raises(SlotStateError):
                        m.free(slot)
                    continue
                m.free(slot)
                allocated.discard(slot)
                if not deferred:
                    mapped[slot] = 0
            else:
                reclaimable = sum(mapped[i] for i in range(cfg.max_batch) if i not in allocated)
                assert m.trim() == reclaimable * num_tensors(m)
                mapped = [p if i in allocated else 0 for i, p in enumerate(mapped)]
            assert_consistent(m, dict(enumerate(mapped)), allocated)
            dirty_mapped_pages(m)  # the next unmap must bring zeros (or the fault) back, not these words


# -- close() -------------------------------------------------------------------------


@pytest.mark.parametrize("unbacked_reads", ["zeros", "fault"])
def test_close_releases_every_page_and_reservation(unbacked_reads):
    m = jv.KVCacheManager(make_config(unbacked_reads=unbacked_reads))
    cfg = m.config
    a, b = m.allocate(100), m.allocate(5)
    m.free(b)  # deferred pages of a free slot must be released too
    fill_slot(m, a, 100, seed=0)
    tensor_bytes = cfg.max_batch * m._native.slot_bytes
    ranges = [(base, base + tensor_bytes) for base in tensor_bases(m)]
    before = MemoryMaps()
    for lo, hi in ranges:  # the checker sees the reservations while open
        kinds = {r[2] for r in before.overlapping(lo, hi)}
        assert kinds == {"rw-s", HOLE_PERMS[unbacked_reads]}, kinds
    assert m.stats().pages_created > 0

    m.close()
    after = MemoryMaps()  # read right away, before anything else can reuse the addresses
    for lo, hi in ranges:
        leftovers = [r for r in after.overlapping(lo, hi) if is_reserved_hole(r) or "jax_vattention_pool" in r[3]]
        assert not leftovers, leftovers
    s = m.stats()
    assert m.closed
    assert s.reserved_bytes == 0
    assert s.pages_created == s.pages_mapped == s.pages_free == s.mapped_bytes == s.physical_bytes == 0
    assert s.creates == s.destroys and s.maps == s.unmaps
    assert all(v.is_deleted() for v in m.tensors)
    m.close()  # idempotent


def test_close_with_a_view_held_elsewhere_neither_stalls_nor_crashes():
    """A zero-copy numpy array of a view outlives close(): close returns at once, the manager refuses every
    call, the array stays readable, and the memory is released when the array dies (it used to block for
    60 s, then unmap under the array: the next read was a segfault)."""
    m = jv.KVCacheManager(make_config())
    slot = m.allocate(5)
    held = np.from_dlpack(m.tensors[-1])
    t0 = time.monotonic()
    m.close()
    assert time.monotonic() - t0 < 5
    assert m.closed and m.pending_release
    with pytest.raises(CacheClosedError):
        m.allocate()
    assert held[slot, 3].ravel()[0] == 0  # backed memory, still mapped: readable
    assert m.stats().reserved_bytes > 0
    del held
    gc.collect()
    assert not m.pending_release and m.stats().reserved_bytes == 0


def test_context_manager_closes():
    with jv.KVCacheManager(make_config()) as m:
        m.allocate(10)
    assert m.closed and m.stats().reserved_bytes == 0


def test_use_after_close_raises_cache_closed():
    m = jv.KVCacheManager(make_config())
    slot = m.allocate(1)
    m.close()
    calls = [
        lambda: m.allocate(),
        lambda: m.grow(slot, 2),
        lambda: m.free(slot),
        lambda: m.trim(),
        lambda: m.capacity(slot),
        lambda: m.allocated(slot),
        lambda: m.check_device_errors(),
        lambda: m._inject_failures(creates=1),
        lambda: m.cache([slot], [1]),
        lambda: ops.grow(m, np.array([slot], np.int32), np.array([2], np.int32)),
        lambda: ops.write(m, 0, np.zeros((1, 1, 2, 16), np.float32), np.zeros((1, 1, 2, 16), np.float32),
                          np.array([slot], np.int32), np.array([0], np.int32), np.array([1], np.int32)),
        lambda: m._native.tensor_address(0),
        lambda: m._native.entry_address(0, 0),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(CacheClosedError):
            call()
            pytest.fail(f"call #{i} did not raise")


# -- bad input: right exception, process survives, other slots intact -------------------


@pytest.fixture
def populated(manager):
    """A manager with two slots holding known data: (manager, {slot: data})."""
    a = manager.allocate(50)
    b = manager.allocate(33)
    return manager, {a: fill_slot(manager, a, 50, seed=10), b: fill_slot(manager, b, 33, seed=11)}


def assert_all_intact(m, contents: dict) -> None:
    for slot, data in contents.items():
        assert_slot_data(m, slot, data)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: m.grow(4, 1), CacheValueError, r"slot 4 is out of range \[0, 4\)"),
        (lambda m: m.grow(-1, 1), CacheValueError, "out of range"),
        (lambda m: m.free(7), CacheValueError, "out of range"),
        (lambda m: m.capacity(-2), CacheValueError, "out of range"),
        (lambda m: m.allocated(4), CacheValueError, "out of range"),
        (lambda m: m.grow(2, 1), SlotStateError, "not allocated"),
        (lambda m: m.free(3), SlotStateError, "not allocated"),
        (lambda m: m.grow(0, 129), CacheValueError, r"max_seq=128"),
        (lambda m: m.grow(0, -1), CacheValueError, "outside"),
        (lambda m: m.allocate(129), CacheValueError, r"max_seq=128"),
        (lambda m: m.grow(0, 2.5), CacheValueError, "must be an int"),
        (lambda m: m.grow(True, 1), CacheValueError, "must be an int"),
        (lambda m: m.free("0"), CacheValueError, "must be an int"),
    ],
)
def test_bad_slot_or_length_raises_and_preserves_data(populated, call, error, message):
    m, contents = populated
    before = m.stats()
    with pytest.raises(error, match=message):
        call(m)
    assert m.stats() == before
    assert_all_intact(m, contents)
    assert_consistent(m, {0: 2, 1: 2}, {0, 1})


def test_double_free_raises_and_preserves_data(populated):
    m, contents = populated
    m.free(1)
    with pytest.raises(SlotStateError, match="double free"):
        m.free(1)
    assert_slot_data(m, 0, contents[0])
    assert_consistent(m, {0: 2, 1: 2}, {0})


def test_max_seq_limit_is_the_padded_one():
    cfg = make_config(max_seq=100)  # padded to 128
    with jv.KVCacheManager(cfg) as m:
        slot = m.allocate(m.max_seq)  # 128 > requested 100 is fine
        assert m.capacity(slot) == 128
        with pytest.raises(CacheValueError, match="max_seq=128"):
            m.grow(slot, m.max_seq + 1)
        assert m.capacity(slot) == 128


def test_all_slots_in_use(manager):
    slots = [manager.allocate() for _ in range(4)]
    assert sorted(slots) == [0, 1, 2, 3]
    with pytest.raises(SlotStateError, match="all 4 slots are in use"):
        manager.allocate()
    manager.free(2)
    assert manager.allocate() == 2


def test_pool_exhausted_reports_pages_needed_and_free():
    # Budget: 3 page indices across the T tensors.
    T = make_config().num_tensors
    cfg = make_config(pool_bytes=3 * T * make_config().page_bytes)
    with jv.KVCacheManager(cfg) as m:
        assert num_tensors(m) == T
        a = m.allocate(32)  # 1 page per tensor -> T pages
        data = fill_slot(m, a, 32, seed=5)
        b = m.allocate()
        before = m.stats()
        with pytest.raises(PoolExhaustedError, match=f"needs {3 * T} pages but only {2 * T} are free") as info:
            m.grow(b, 96)  # 3 pages per tensor
        assert isinstance(info.value, MemoryError)
        assert m.stats() == before  # all or nothing
        assert_slot_data(m, a, data)
        m.grow(b, 64)  # what fits still works
        assert_consistent(m, {a: 1, b: 2}, {a, b})
        with pytest.raises(PoolExhaustedError):
            m.allocate(1)  # the failed allocate must not leak its slot
        assert_consistent(m, {a: 1, b: 2}, {a, b})
        assert_slot_data(m, a, data)


# -- deferred reclamation, best fit, trim ------------------------------------------------


def test_free_keeps_pages_and_allocate_reuses_them_without_mapping(manager):
    a = manager.allocate(70)  # 3 pages
    data = fill_slot(manager, a, 70, seed=7)
    manager.free(a)
    s = manager.stats()
    assert s.pages_mapped_free_slots == 3 * num_tensors(manager) > 0
    assert_consistent(manager, {a: 3}, set())
    reused = manager.allocate(min_tokens=60)
    assert reused == a
    after = manager.stats()
    assert (after.maps, after.creates, after.unmaps) == (s.maps, s.creates, s.unmaps)
    assert after.pages_mapped_free_slots == 0
    assert_consistent(manager, {a: 3}, {a})
    assert_slot_data(manager, a, data)  # the same physical pages are still there


def test_allocate_picks_the_best_fitting_free_slot():
    with jv.KVCacheManager(make_config(max_batch=5)) as m:
        sizes = {0: 1, 1: 4, 2: 2, 3: 3}  # pages each slot keeps after free
        for slot, pages in sizes.items():
            assert m.allocate(pages * 32) == slot
        for slot in sizes:
            m.free(slot)
        maps = m.stats().maps
        assert m.allocate(0) == 4  # nothing needed: take the empty slot, keep deferred pages
        assert m.allocate(40) == 2  # needs 2 pages: smallest covering slot is 2 (not 3 or 1)
        assert m.allocate(65) == 3  # needs 3 pages: slot 3
        assert m.allocate(1) == 0  # needs 1: slot 0 (1 page) over slot 1 (4 pages)
        assert m.stats().maps == maps
        assert m.allocate(10) == 1
        assert_consistent(m, {0: 1, 1: 4, 2: 2, 3: 3}, {0, 1, 2, 3, 4})


def test_allocate_without_a_fitting_slot_takes_the_largest():
    with jv.KVCacheManager(make_config()) as m:
        for slot, pages in {0: 1, 1: 2, 2: 1}.items():
            assert m.allocate(pages * 32) == slot
        for slot in (0, 1, 2):
            m.free(slot)
        maps = m.stats().maps
        assert m.allocate(128) == 1  # 4 pages wanted, slot 1 has the most (2)
        assert m.stats().maps == maps + 2 * num_tensors(m)  # only the missing 2 pages x T tensors
        assert_consistent(m, {0: 1, 1: 4, 2: 1}, {1})


def test_no_deferred_reclaim_unmaps_on_free():
    with jv.KVCacheManager(make_config(deferred_reclaim=False)) as m:
        a = m.allocate(100)
        unmaps = m.stats().unmaps
        m.free(a)
        s = m.stats()
        assert s.pages_mapped == s.pages_mapped_free_slots == 0
        T = num_tensors(m)
        assert s.unmaps == unmaps + 4 * T
        assert s.pages_free == 4 * T and s.pages_created == 4 * T  # pages return to the pool, not the OS
        assert_consistent(m, {}, set())
        b = m.allocate(100)
        assert m.stats().creates == s.creates  # pool pages are reused
        assert_consistent(m, {b: 4}, {b})


def test_trim_unmaps_free_slots_and_release_physical_drops_pages(manager):
    a, b, c = manager.allocate(100), manager.allocate(40), manager.allocate(10)
    data = fill_slot(manager, b, 40, seed=9)
    T = num_tensors(manager)
    manager.free(a)
    manager.free(c)
    assert manager.stats().pages_mapped_free_slots == (4 + 1) * T
    assert manager.trim() == (4 + 1) * T
    s = manager.stats()
    assert s.pages_mapped_free_slots == 0
    assert s.pages_free == 5 * T and s.pages_created == 7 * T
    assert_consistent(manager, {b: 2}, {b})
    assert_slot_data(manager, b, data)  # the live slot is untouched
    assert manager.trim() == 0

    manager.free(b)
    assert manager.trim(release_physical=True) == 2 * T
    s = manager.stats()
    assert s.pages_created == s.pages_free == s.pages_mapped == 0
    assert s.destroys == s.creates == 7 * T
    assert_consistent(manager, {}, set())
    # Pages can be created again afterwards.
    d = manager.allocate(128)
    assert_consistent(manager, {d: 4}, {d})


def test_trim_with_a_page_limit(manager):
    a = manager.allocate(128)
    manager.free(a)
    T = num_tensors(manager)
    assert manager.trim(max_pages=T) == T  # one page index of each of the T tensors, from the tail
    assert_consistent(manager, {a: 3}, set())
    assert manager.trim(max_pages=0) == 0
    assert_consistent(manager, {a: 3}, set())


def test_allocate_under_pool_pressure_returns_a_reused_slots_excess_pages():
    T = make_config().num_tensors
    cfg = make_config(pool_bytes=5 * T * make_config().page_bytes)  # 5 page indices x T tensors
    with jv.KVCacheManager(cfg) as m:
        big = m.allocate(128)  # 4 pages: the pool has 1 page index left
        m.free(big)
        unmaps = m.stats().unmaps
        assert m.allocate(10) == big  # best fit: the only slot that covers 1 page, with 3 pages to spare
        # 3T spare pages, only T could be mapped afresh: the spare ones go back to the pool
        s = m.stats()
        assert s.unmaps == unmaps + 3 * T and s.pages_free == 3 * T
        assert_consistent(m, {big: 1}, {big})
        other = m.allocate(128)  # the returned pages back another request at once
        assert_consistent(m, {big: 1, other: 4}, {big, other})


def test_allocate_keeps_a_reused_slots_excess_pages_while_the_pool_has_room(manager):
    big = manager.allocate(128)
    manager.free(big)
    unmaps = manager.stats().unmaps
    assert manager.allocate(10) == big
    assert manager.stats().unmaps == unmaps  # deferred reclamation: nothing unmapped, nothing mapped
    assert_consistent(manager, {big: 4}, {big})


def test_grow_reclaims_deferred_pages_under_pool_pressure():
    T = make_config().num_tensors
    cfg = make_config(pool_bytes=4 * T * make_config().page_bytes)  # 4 page indices x T tensors
    with jv.KVCacheManager(cfg) as m:
        a = m.allocate(64)  # 2 pages -> 2T
        keep = m.allocate(1)  # 1 page -> T, data that must survive the reclaim
        data = fill_slot(m, keep, 32, seed=12)
        m.free(a)
        b = m.allocate(0)
        assert b not in (a, keep)  # best fit for 0 tokens: an empty slot
        assert m.stats().pages_created == 3 * T
        # b needs 2 pages per tensor = 2T, only T left in the budget: T come from a's tail.
        m.grow(b, 64)
        s = m.stats()
        assert s.pages_created == 4 * T and s.pages_free == 0
        assert_consistent(m, {a: 1, b: 2, keep: 1}, {b, keep})
        assert_slot_data(m, keep, data)
        # Now the pool is full of live pages, except a's last page index.
        m.grow(b, 96)
        assert_consistent(m, {b: 3, keep: 1}, {b, keep})
        with pytest.raises(PoolExhaustedError, match=f"needs {T} pages but only 0 are free"):
            m.grow(b, 128)
        assert_consistent(m, {b: 3, keep: 1}, {b, keep})
        assert_slot_data(m, keep, data)


# -- fault injection -------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [dict(creates=1), dict(maps=1)])
def test_backend_failure_rolls_back_and_retry_succeeds(populated, fault):
    m, contents = populated  # slots 0 and 1 live with 2 pages each
    slot = m.allocate()
    m._inject_failures(**fault)
    with pytest.raises(BackendError, match="injected"):
        m.grow(slot, 80)
    s = m.stats()
    assert s.pages_mapped % num_tensors(m) == 0
    assert_consistent(m, {0: 2, 1: 2}, {0, 1, slot})
    assert_all_intact(m, contents)
    m.grow(slot, 80)  # the retry succeeds
    assert_consistent(m, {0: 2, 1: 2, slot: 3}, {0, 1, slot})
    assert_all_intact(m, contents)


def test_create_failure_in_the_middle_of_a_grow_is_rolled_back():
    # 4 layers: 8 per-layer tensors, or 2 interleaved ones (2 layers each): a grow maps one run per tensor.
    with jv.KVCacheManager(make_config(num_layers=4)) as m:
        assert num_tensors(m) >= 2
        keep = m.allocate(40)
        contents = {keep: fill_slot(m, keep, 40, seed=13)}
        slot = m.allocate()
        # A failed map returns its freshly created page to the free list: 1 page on it.
        m._inject_failures(maps=1)
        with pytest.raises(BackendError):
            m.grow(slot, 1)
        assert m.stats().pages_free == 1
        # Now tensor 0 maps the free-list page and tensor 1 fails to create one:
        # the page already mapped into tensor 0 must be unmapped again.
        m._inject_failures(creates=1)
        with pytest.raises(BackendError, match="create_page"):
            m.grow(slot, 1)
        s = m.stats()
        assert s.pages_free == 1 and s.maps - s.unmaps == s.pages_mapped
        assert_consistent(m, {keep: 2}, {keep, slot})  # includes the /proc/self/maps hole check
        # A run of 3 pages per tensor: the first comes from the free list, creating the second fails.
        m._inject_failures(creates=1)
        with pytest.raises(BackendError, match="create_page"):
            m.grow(slot, 96)
        assert m.stats().pages_free == 1
        assert_consistent(m, {keep: 2}, {keep, slot})
        m.grow(slot, 1)
        assert_consistent(m, {keep: 2, slot: 1}, {keep, slot})
        assert_all_intact(m, contents)


def test_failed_allocate_does_not_take_the_slot(manager):
    manager._inject_failures(creates=1)
    with pytest.raises(BackendError):
        manager.allocate(10)
    assert manager.stats().live_slots == 0
    assert manager.allocate(10) == 0
    assert_consistent(manager, {0: 1}, {0})


def test_one_token_request_maps_one_page_per_tensor():
    """The smallest request's footprint is min_request_bytes: one page in each tensor. Interleaving every layer
    into one tensor makes it one page (here of 32 tokens), instead of one page per layer's K and V."""
    for g in (1, 4):
        with jv.KVCacheManager(make_config(num_layers=4, layers_per_group=g)) as m:
            slot = m.allocate(1)
            s = m.stats()
            assert s.pages_mapped == num_tensors(m) == (8 if g == 1 else 1)
            assert s.mapped_bytes == m.min_request_bytes == num_tensors(m) * m.config.page_bytes
            assert m.tokens_per_page == m.capacity(slot) == 32
            assert f"{m.tokens_per_page} tokens/page" in repr(m)
            assert ("interleaved in 1 x [4, 128, 4, 2, 2, 16]" in repr(m)) == (g == 4)


def test_errors_are_vattention_errors():
    for cls in (BackendError, CacheClosedError, CacheValueError, PoolExhaustedError, SlotStateError):
        assert issubclass(cls, jv.VAttentionError)
    assert issubclass(CacheValueError, ValueError) and issubclass(PoolExhaustedError, MemoryError)
