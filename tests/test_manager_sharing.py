"""Prefix sharing by page aliasing (issue 20) on the host backend: reference-counted pages, pin_pages /
unpin_pages / map_shared, read-only shared ranges.

On the host backend a page handle is the page's offset in the pool's memfd, and /proc/self/maps shows which
offset backs every page of the reservations, so the tests check the aliasing itself, not only the manager's word.
Every test runs in both layouts (per-layer tensors, and both layers interleaved in one tensor), at 64 tokens per
page. The state machine at the end drives allocate / grow / free / pin / unpin / map_shared / trim / writes and
checks reference counts and the pool's accounting against a pure-Python model after every step.
"""

from __future__ import annotations

import ctypes
from collections import Counter

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import jax_vattention as jv
from jax_vattention import ops
from jax_vattention.errors import BackendError, CacheValueError, SlotStateError

SHAPE = dict(num_layers=2, max_batch=4, max_seq=256, kv_heads=1, head_dim=16, dtype="float32")
CONFIGS = {
    # 4 tensors of 64 B tokens: 64 tokens per 4 KiB page, 4 pages per slot; budget below the 64 of a full cache.
    "per-layer": dict(page_bytes=4096, pool_bytes=40 * 4096),
    # 1 tensor of 256 B tokens (K, V of both layers): 64 tokens per 16 KiB page; budget below its 16 pages.
    "interleaved": dict(layers_per_group=2, page_bytes=4 * 4096, pool_bytes=10 * 4 * 4096),
}
TOKENS_PER_PAGE = 64
_LAYOUT = {"name": "per-layer"}


@pytest.fixture(autouse=True, params=sorted(CONFIGS))
def layout(request):
    _LAYOUT["name"] = request.param
    yield request.param
    _LAYOUT["name"] = "per-layer"


def make_config(**overrides) -> jv.CacheConfig:
    return jv.CacheConfig(**{**SHAPE, **CONFIGS[_LAYOUT["name"]], **overrides})


@pytest.fixture
def manager():
    with jv.KVCacheManager(make_config(), device=jax.devices("cpu")[0]) as m:
        yield m


def i32(x) -> np.ndarray:
    return np.asarray(x, np.int32)


def rows(m, seed: int, count: int) -> np.ndarray:
    """Distinct K rows [1, count, Hkv, D]."""
    cfg = m.config
    return np.random.default_rng(seed).standard_normal((1, count, cfg.kv_heads, cfg.head_dim)).astype(np.float32)


def write(m, slot: int, start: int, k: np.ndarray) -> None:
    """Write k (and -k as V) at tokens [start, start + T) of every layer of the slot."""
    for layer in range(m.config.num_layers):
        out = ops.write(m, layer, k * (layer + 1), -k, i32([slot]), i32([start]), i32([k.shape[1]]))
        assert int(out[0]) == start + k.shape[1]


def view_k(m, layer: int, slot: int, start: int, count: int) -> np.ndarray:
    """Layer ``layer``'s K of tokens [start, start + count) through the jax view. -> [count, Hkv, D]"""
    tensor, entry = m.config.locate(layer)[0]
    v = np.asarray(m.tensors[tensor][slot, start:start + count])
    return v if not m.config.interleaved else v[:, entry // 2, entry % 2]


def pool_pages(m) -> dict[tuple[int, int, int], int]:
    """(tensor, slot, page) -> memfd offset (the page handle) of every pool page mapped in the reservations."""
    cfg, native = m.config, m._native
    bases = [native.tensor_address(t) for t in range(cfg.num_tensors)]
    span = cfg.max_batch * native.slot_bytes
    found = {}
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 6 or "jax_vattention_pool" not in parts[5]:
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            for t, base in enumerate(bases):
                for addr in range(max(lo, base), min(hi, base + span), cfg.page_bytes):
                    slot, rest = divmod(addr - base, native.slot_bytes)
                    found[t, slot, rest // cfg.page_bytes] = int(parts[2], 16) + addr - lo
    return found


def handles_of(m, slot: int, n_pages: int) -> tuple[int, ...]:
    """The handles backing pages [0, n_pages) of a slot, [page][tensor], read from /proc/self/maps."""
    pages = pool_pages(m)
    return tuple(pages[t, slot, p] for p in range(n_pages) for t in range(m.config.num_tensors))


# -- aliasing --------------------------------------------------------------------


def test_shared_pages_alias_the_source_and_are_read_only(manager):
    m, cfg, T = manager, manager.config, manager.config.num_tensors
    assert m.tokens_per_page == TOKENS_PER_PAGE
    a = m.allocate(100)  # 2 pages
    k = rows(m, 1, 100)
    write(m, a, 0, k)
    handles = m.pin_pages(a, 1)
    assert len(handles) == T and handles == handles_of(m, a, 1)
    s = m.stats()
    assert (s.pages_pinned, s.pages_shared, s.pages_in_use, s.pages_mapped) == (T, T, 2 * T, 2 * T)

    b = m.allocate(0)
    m.map_shared(b, handles)
    assert m.shared_pages(b) == 1 and m.capacity(b) == TOKENS_PER_PAGE
    assert handles_of(m, b, 1) == handles  # the same physical pages at b's page 0
    for layer in range(cfg.num_layers):
        np.testing.assert_array_equal(view_k(m, layer, b, 0, 64), k[0, :64] * (layer + 1))
    s = m.stats()
    assert (s.pages_in_use, s.pages_mapped, s.pages_shared) == (2 * T, 3 * T, T)  # mappings count per slot
    assert s.slot_shared_pages[b] == 1

    m.grow(b, 70)  # an owned page after the shared one
    with pytest.raises(jax.errors.JaxRuntimeError, match="CacheValueError: write: .*read-only shared range"):
        ops.write(m, 0, k[:, :1], k[:, :1], i32([b]), i32([63]), i32([1]))
    # a write of 0 tokens touches nothing, so it may start anywhere (padding rows write 0 tokens at token 0)
    jax.block_until_ready(ops.write(m, 0, k[:, :0], k[:, :0], i32([b]), i32([0]), i32([0])))
    np.testing.assert_array_equal(view_k(m, 0, a, 0, 64), k[0, :64])  # nothing was written
    k2 = rows(m, 2, 6)
    write(m, b, 64, k2)  # right after the shared range
    np.testing.assert_array_equal(view_k(m, 0, b, 64, 6), k2[0])
    np.testing.assert_array_equal(view_k(m, 0, a, 64, 6), k[0, 64:70])  # a's own second page is untouched

    m.free(a)
    m.trim()  # a's pages: page 1 freed, page 0 still pinned and mapped by b
    s = m.stats()
    assert s.pages_in_use == 2 * T and s.pages_free == s.pages_created - 2 * T
    for layer in range(cfg.num_layers):
        np.testing.assert_array_equal(view_k(m, layer, b, 0, 64), k[0, :64] * (layer + 1))
    m.unpin_pages(handles)
    assert m.stats().pages_pinned == 0 and m.stats().pages_shared == 0
    np.testing.assert_array_equal(view_k(m, 0, b, 0, 64), k[0, :64])  # b's mapping still holds them
    m.free(b)
    assert m.shared_pages(b) == 0
    m.trim()
    s = m.stats()
    assert (s.pages_in_use, s.pages_mapped, s.pages_pinned, s.pages_shared) == (0, 0, 0, 0)
    assert s.pages_free == s.pages_created
    assert s.maps - s.unmaps == 0
    m.trim(release_physical=True)
    assert m.stats().pages_created == 0 and m.stats().creates == m.stats().destroys


def test_a_pinned_page_outlives_every_mapping_and_counts_against_the_budget():
    cfg = make_config()
    T = cfg.num_tensors
    with jv.KVCacheManager(cfg, device=jax.devices("cpu")[0]) as m:
        a = m.allocate(64)
        k = rows(m, 3, 64)
        write(m, a, 0, k)
        handles = m.pin_pages(a, 1)
        m.free(a)
        m.trim(release_physical=True)
        assert m.stats().pages_in_use == T and m.stats().pages_mapped == 0  # pinned, mapped nowhere
        # The budget is 10 page indices: the pinned one and two full slots leave one free.
        full = [m.allocate(m.max_seq) for _ in range(2)]
        assert m.stats().pages_in_use == 9 * T <= m.stats().pages_budget
        with pytest.raises(jv.PoolExhaustedError):
            m.allocate(128)
        m.free(full[0])
        b = m.allocate(0)
        m.map_shared(b, handles)
        np.testing.assert_array_equal(view_k(m, 0, b, 0, 64), k[0])  # survived the pool pressure
        m.unpin_pages(handles)
        m.free(b)
        m.trim()
        assert m.stats().pages_in_use == 4 * T  # the other full slot
    assert m.stats().pages_created == 0


def written_and_pinned(m, seed: int, n_pages: int):
    """A slot with 128 tokens of fresh rows written, and its first ``n_pages`` pages pinned: (slot, rows, handles)."""
    a = m.allocate(128)
    k = rows(m, seed, 128)
    write(m, a, 0, k)
    return a, k, m.pin_pages(a, n_pages)


def test_map_shared_accepts_mapped_unpinned_handles_and_self_aliasing(manager):
    m, T = manager, manager.config.num_tensors
    a, k, handles = written_and_pinned(m, 4, 2)
    m.unpin_pages(handles)  # still mapped by a: still valid handles
    b = m.allocate(64)  # b's own page is given back by map_shared
    m.map_shared(b, handles[:T])
    assert handles_of(m, b, 1) == handles[:T] and m.capacity(b) == 64
    np.testing.assert_array_equal(view_k(m, 0, b, 0, 64), k[0, :64])
    # A slot may alias its own pages (the handles' other references keep them alive across the unmap).
    mine = m.pin_pages(a, 2)
    m.map_shared(a, mine)
    assert handles_of(m, a, 2) == mine and m.shared_pages(a) == 2
    np.testing.assert_array_equal(view_k(m, 0, a, 0, 128), k[0])
    m.unpin_pages(mine)
    m.free(a)
    m.free(b)
    m.trim()
    assert m.stats().pages_in_use == 0


def test_a_reused_slot_never_gets_pages_that_others_read(manager):
    m, T = manager, manager.config.num_tensors
    a, k, handles = written_and_pinned(m, 5, 1)
    b = m.allocate(0)
    m.map_shared(b, handles)
    m.free(a)  # deferred: a keeps both pages mapped, page 0 shared
    assert m.stats().pages_mapped_free_slots == 2 * T
    c = m.allocate(0)
    assert c == a  # best fit picks the freed slot; its shared page 0 (and so page 1) is unmapped first
    assert m.capacity(c) == 0 and m.shared_pages(c) == 0
    m.grow(c, 64)
    assert not set(handles_of(m, c, 1)) & set(handles)
    write(m, c, 0, rows(m, 6, 64))
    np.testing.assert_array_equal(view_k(m, 0, b, 0, 64), k[0, :64])
    m.unpin_pages(handles)


def test_without_deferred_reclamation_free_gives_back_only_unreferenced_pages():
    cfg = make_config(deferred_reclaim=False)
    T = cfg.num_tensors
    with jv.KVCacheManager(cfg, device=jax.devices("cpu")[0]) as m:
        a = m.allocate(128)
        handles = m.pin_pages(a, 1)
        b = m.allocate(0)
        m.map_shared(b, handles)
        m.grow(b, 100)
        m.free(b)
        s = m.stats()
        assert (s.pages_mapped, s.pages_in_use, s.pages_free) == (2 * T, 2 * T, T)
        m.free(a)
        assert m.stats().pages_in_use == T  # pinned only
        m.unpin_pages(handles)
        assert m.stats().pages_in_use == 0 and m.stats().pages_free == m.stats().pages_created


def test_close_releases_pinned_and_shared_pages():
    m = jv.KVCacheManager(make_config(), device=jax.devices("cpu")[0])
    a = m.allocate(100)
    b = m.allocate(0)
    m.map_shared(b, m.pin_pages(a, 1))
    m.pin_pages(b, 1)
    m.close()
    s = m.stats()
    assert (s.pages_created, s.pages_in_use, s.pages_pinned, s.pages_mapped, s.reserved_bytes) == (0, 0, 0, 0, 0)
    assert s.creates == s.destroys


# -- errors: clear, and nothing changes --------------------------------------------


def snapshot(m):
    s = m.stats()
    return s, pool_pages(m)


def test_bad_sharing_calls_raise_and_change_nothing(manager):
    m, T = manager, manager.config.num_tensors
    a = m.allocate(100)
    write(m, a, 0, rows(m, 7, 100))
    handles = m.pin_pages(a, 1)
    b = m.allocate(64)
    before = snapshot(m)
    with pytest.raises(CacheValueError, match=r"pin_pages: n_pages=3 is outside \[0, 2\]"):
        m.pin_pages(a, 3)
    with pytest.raises(CacheValueError, match="n_pages must be"):
        m.pin_pages(a, -1)
    with pytest.raises(SlotStateError, match="pin_pages: slot 2 is not allocated"):
        m.pin_pages(2, 0)
    unknown = max(handles) + 1000 * m.config.page_bytes
    with pytest.raises(CacheValueError, match=rf"unpin_pages: handles\[1\] = {unknown} is not a pinned page"):
        m.unpin_pages([handles[0], unknown])
    with pytest.raises(CacheValueError, match="listed more often than its 1 pin"):
        m.unpin_pages([handles[0], handles[0]])
    with pytest.raises(CacheValueError, match="handles must be a tuple or list"):
        m.unpin_pages(handles[0])
    with pytest.raises(CacheValueError, match=r"handles\[0\] must be an int"):
        m.unpin_pages([-1])
    with pytest.raises(SlotStateError, match="map_shared: slot 3 is not allocated"):
        m.map_shared(3, handles)
    with pytest.raises(CacheValueError, match="is not a pinned or mapped page"):
        m.map_shared(b, (unknown,) * T)
    if T > 1:
        with pytest.raises(CacheValueError, match=f"are not a multiple of the {T} reserved tensors"):
            m.map_shared(b, handles[:-1])
    with pytest.raises(CacheValueError, match="slot must be an int"):
        m.map_shared(True, handles)
    assert snapshot(m) == before  # pins, mappings and the free list as they were
    m.unpin_pages(handles)


def test_a_failed_map_shared_keeps_the_slot_and_every_count(manager):
    m = manager
    a = m.allocate(64)
    handles = m.pin_pages(a, 1)
    b = m.allocate(100)
    kb = rows(m, 8, 100)
    write(m, b, 0, kb)
    before = snapshot(m)
    m._inject_failures(maps=1)  # the first shared run fails; b's own pages are mapped back
    with pytest.raises(BackendError, match="injected map failure"):
        m.map_shared(b, handles)
    after = snapshot(m)
    assert after[1] == before[1]  # every page where it was
    keys = ("pages_in_use", "pages_free", "pages_pinned", "pages_shared", "pages_mapped", "slot_capacity",
            "slot_shared_pages")
    assert {k: getattr(after[0], k) for k in keys} == {k: getattr(before[0], k) for k in keys}
    np.testing.assert_array_equal(view_k(m, 0, b, 0, 100), kb[0])
    m.map_shared(b, handles)
    assert m.shared_pages(b) == 1
    m.unpin_pages(handles)


def test_a_map_shared_that_cannot_even_restore_leaves_the_slot_empty_and_counts_right(manager):
    m, T = manager, manager.config.num_tensors
    a = m.allocate(64)
    handles = m.pin_pages(a, 1)
    b = m.allocate(100)
    m._inject_failures(maps=1000)
    with pytest.raises(BackendError, match="injected map failure"):
        m.map_shared(b, handles)
    m._inject_failures(maps=0)
    s = m.stats()
    assert m.capacity(b) == 0 and m.shared_pages(b) == 0 and m.allocated(b)
    assert (s.pages_in_use, s.pages_mapped, s.pages_pinned, s.pages_shared) == (T, T, T, T)
    assert set(pool_pages(m)) == {(t, a, 0) for t in range(T)}
    m.unpin_pages(handles)
    m.free(a)
    m.trim()
    assert m.stats().pages_in_use == 0 and m.stats().pages_free == m.stats().pages_created


# -- the state machine ------------------------------------------------------------


class SharingMachine(RuleBasedStateMachine):
    """Model: the pins (a multiset of handles, in groups as pin_pages returned them), the shared prefix each live
    slot was given, and a marker word per page written at the start of every page a live slot acquired. The truth:
    /proc/self/maps (which handle backs every page) and the manager's stats."""

    DEFERRED = True

    def __init__(self):
        super().__init__()
        self.cfg = make_config(deferred_reclaim=self.DEFERRED)
        self.T = self.cfg.num_tensors
        self.m = jv.KVCacheManager(self.cfg, device=jax.devices("cpu")[0])
        self.live: set[int] = set()
        self.groups: list[tuple[int, ...]] = []  # pins outstanding
        self.shared: dict[int, tuple[int, ...]] = {}  # live slot -> handles it maps read-only
        self.pages: dict[tuple[int, int, int], int] = {}  # (tensor, slot, page) -> handle, as of the last check
        self.markers: dict[int, int] = {}  # handle -> the word at its start
        self.next_marker = 1
        self.mapped_into: int | None = None  # the slot the step's map_shared mapped (its prefix is not "acquired")

    def teardown(self):
        self.m.close()
        s = self.m.stats()
        assert (s.pages_created, s.pages_in_use, s.pages_pinned, s.reserved_bytes) == (0, 0, 0, 0)

    def pins(self) -> Counter:
        return Counter(h for g in self.groups for h in g)

    def page_address(self, t: int, slot: int, page: int) -> int:
        return self.m._native.tensor_address(t) + slot * self.m._native.slot_bytes + page * self.cfg.page_bytes

    @precondition(lambda self: len(self.live) < self.cfg.max_batch)
    @rule(min_tokens=st.integers(0, 256))
    def allocate(self, min_tokens):
        try:
            slot = self.m.allocate(min_tokens)
        except (SlotStateError, jv.PoolExhaustedError):
            return
        self.live.add(slot)
        self.shared.pop(slot, None)
        assert self.m.capacity(slot) >= min_tokens and self.m.shared_pages(slot) == 0

    @precondition(lambda self: self.live)
    @rule(data=st.data(), tokens=st.integers(0, 256))
    def grow(self, data, tokens):
        slot = data.draw(st.sampled_from(sorted(self.live)))
        before = (self.m.capacity(slot), self.m.shared_pages(slot))
        try:
            self.m.grow(slot, tokens)
            grown = True
        except jv.PoolExhaustedError:
            grown = False
        # a grow maps owned pages after the shared ones, never over them; a refused one changes nothing
        assert self.m.shared_pages(slot) == before[1]
        assert self.m.capacity(slot) >= tokens if grown else self.m.capacity(slot) == before[0]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        slot = data.draw(st.sampled_from(sorted(self.live)))
        self.m.free(slot)
        self.live.discard(slot)
        self.shared.pop(slot, None)
        assert self.m.shared_pages(slot) == 0

    @precondition(lambda self: self.live)
    @rule(data=st.data(), extra=st.booleans())
    def pin(self, data, extra):
        slot = data.draw(st.sampled_from(sorted(self.live)))
        mapped = self.m.stats().slot_capacity[slot] // TOKENS_PER_PAGE
        if extra:  # one page too many: refused, nothing pinned
            with pytest.raises(CacheValueError, match="pin_pages: n_pages"):
                self.m.pin_pages(slot, mapped + 1)
            return
        n = data.draw(st.integers(0, mapped))
        handles = self.m.pin_pages(slot, n)
        assert handles == tuple(self.pages[t, slot, p] for p in range(n) for t in range(self.T))
        self.groups.append(handles)

    @precondition(lambda self: self.groups)
    @rule(data=st.data(), bad=st.booleans())
    def unpin(self, data, bad):
        i = data.draw(st.integers(0, len(self.groups) - 1))
        if bad:  # a group plus a handle that has no pin: refused as a whole
            unknown = max(self.pages.values(), default=0) + 10_000 * self.cfg.page_bytes
            with pytest.raises(CacheValueError, match="is not a pinned page"):
                self.m.unpin_pages(list(self.groups[i]) + [unknown])
            return
        self.m.unpin_pages(self.groups.pop(i))

    @precondition(lambda self: self.live and (self.groups or self.pages))
    @rule(data=st.data(), pinned=st.booleans())
    def map_shared(self, data, pinned):
        slot = data.draw(st.sampled_from(sorted(self.live)))
        if self.groups and (pinned or not self.pages):
            group = data.draw(st.sampled_from(self.groups))
        else:  # the pages another slot maps now, pinned or not (any mapped page is a valid handle)
            source = data.draw(st.sampled_from(sorted({src for (_, src, _) in self.pages})))
            n = data.draw(st.integers(0, self.m.stats().slot_capacity[source] // TOKENS_PER_PAGE))
            group = tuple(self.pages[t, source, p] for p in range(n) for t in range(self.T))
        self.m.map_shared(slot, group)
        n = len(group) // self.T
        assert self.m.shared_pages(slot) == n and self.m.capacity(slot) == n * TOKENS_PER_PAGE
        self.shared[slot] = group
        self.mapped_into = slot

    @rule(max_pages=st.none() | st.integers(0, 20), release=st.booleans())
    def trim(self, max_pages, release):
        self.m.trim(max_pages, release_physical=release)

    @precondition(lambda self: any(self.m.shared_pages(s) for s in self.live))
    @rule(data=st.data(), layer=st.integers(0, 1))
    def write_shared(self, data, layer):
        """Writes starting in the shared range are refused; one right after it lands."""
        slot = data.draw(st.sampled_from(sorted(s for s in self.live if self.m.shared_pages(s))))
        end = self.m.shared_pages(slot) * TOKENS_PER_PAGE
        start = data.draw(st.integers(0, end - 1).map(lambda x: x - x % TOKENS_PER_PAGE))  # a page's first token
        x = np.full((1, 1, self.cfg.kv_heads, self.cfg.head_dim), 7.0, np.float32)
        with pytest.raises(jax.errors.JaxRuntimeError, match="read-only shared range"):
            ops.write(self.m, layer, x, x, i32([slot]), i32([start]), i32([1]))
        if self.m.capacity(slot) == end and end < self.m.max_seq:
            try:
                self.m.grow(slot, end + 1)  # an owned page after the shared ones
            except jv.PoolExhaustedError:
                pass
        if self.m.capacity(slot) > end:
            assert int(ops.write(self.m, layer, x, x, i32([slot]), i32([end]), i32([1]))[0]) == end + 1
            for t in range(self.T):  # the page after the shared range (its marker may be overwritten)
                h = pool_pages(self.m)[t, slot, end // TOKENS_PER_PAGE]
                self.markers[h] = ctypes.c_uint64.from_address(self.page_address(t, slot, end // TOKENS_PER_PAGE)).value

    @invariant()
    def consistent(self):
        m, T, cfg = self.m, self.T, self.cfg
        s = m.stats()
        pages = pool_pages(m)
        pins = self.pins()
        # Slots map a prefix of page indices, the same count in every tensor, as the stats say.
        mapped = {slot: s.slot_capacity[slot] // TOKENS_PER_PAGE for slot in range(cfg.max_batch)}
        assert set(pages) == {(t, slot, p) for slot, n in mapped.items() for p in range(n) for t in range(T)}
        # Reference counts: one per mapping, one per pin; the pool's accounting follows them.
        refs = Counter(pages.values()) + pins
        assert s.pages_mapped == len(pages) and s.maps - s.unmaps == len(pages)
        assert s.pages_in_use == len(refs) == s.pages_created - s.pages_free
        assert s.pages_in_use <= s.pages_budget
        assert s.pages_pinned == len(pins)
        assert s.pages_shared == sum(1 for n in refs.values() if n > 1)
        # What live slots hold counts an aliased page once (the engine's admission budget).
        assert s.pages_live == len({h for (_, slot, _), h in pages.items() if slot in self.live})
        # Shared prefixes: exactly the handles given, read-only; freed slots share nothing.
        for slot in range(cfg.max_batch):
            given = self.shared.get(slot, ())
            assert s.slot_shared_pages[slot] == len(given) // T == m.shared_pages(slot)
            assert tuple(pages[t, slot, p] for p in range(len(given) // T) for t in range(T)) == given
        # No page is in the owned part of two live slots; a page a live slot newly acquired had no other
        # reference (it came from the free list, so nothing free was referenced).
        owned = [h for (t, slot, p), h in pages.items() if slot in self.live and p >= s.slot_shared_pages[slot]]
        assert len(owned) == len(set(owned))
        for key, h in pages.items():
            t, slot, p = key
            if self.pages.get(key) == h or (slot == self.mapped_into and p < s.slot_shared_pages[slot]):
                continue
            assert slot in self.live and refs[h] == 1, f"{key} acquired page {h} with {refs[h]} references"
            self.markers[h] = self.next_marker
            ctypes.c_uint64.from_address(self.page_address(t, slot, p)).value = self.next_marker
            self.next_marker += 1
        # Content: a page keeps its marker through pins, sharing and the owner's free, wherever it is mapped.
        self.markers = {h: v for h, v in self.markers.items() if h in refs}
        for (t, slot, p), h in pages.items():
            if h in self.markers:
                assert ctypes.c_uint64.from_address(self.page_address(t, slot, p)).value == self.markers[h]
        self.pages = pages
        self.mapped_into = None


@pytest.mark.parametrize("deferred", [True, False], ids=["deferred", "eager"])
def test_sharing_state_machine(deferred):
    machine = type("SharingMachineRun", (SharingMachine,), {"DEFERRED": deferred})
    run = settings(max_examples=30, stateful_step_count=50, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])(machine)
    run.TestCase().runTest()
