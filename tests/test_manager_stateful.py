"""Randomized stateful test of the cache manager on the host backend.

A hypothesis rule-based state machine drives allocate / grow / write / free /
trim / pool exhaustion and bad calls against one manager, and after every step
checks the invariants against a shadow model and against memory itself:

* mapped pages == what the slots' capacities need (live and deferred) in all reserved tensors
* pages_created == mapped + free list, and never exceeds the budget
* no physical page is mapped twice (memfd offsets read from /proc/self/maps), and
  everything else in the reservations is a read-only anonymous hole (the
  default ``unbacked_reads="zeros"``) that reads zeros past each slot's pages
* every written token still holds its bytes (numpy over the raw address), whatever
  the other slots did
* after close() nothing is reserved or mapped (no pool page, no hole left)

The machine runs in both layouts (per-layer tensors, and both layers interleaved
in one tensor, at the same 64 tokens per page); the settings run at least 10,000
operations per CI run in all.
"""

import bisect
import ctypes
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import jax_vattention as jv

SHAPE = dict(num_layers=2, max_batch=6, max_seq=256, kv_heads=1, head_dim=16, dtype="float32")
CONFIGS = {
    # 4 tensors of 64 B tokens, 64 tokens per 4 KiB page; budget below the 96 pages a full cache needs.
    "per-layer": jv.CacheConfig(**SHAPE, page_bytes=4096, pool_bytes=40 * 4096),
    # 1 tensor of 256 B tokens (K, V of both layers), 64 tokens per 16 KiB page; budget below its 24 pages.
    "interleaved": jv.CacheConfig(**SHAPE, layers_per_group=2, page_bytes=4 * 4096, pool_bytes=10 * 4 * 4096),
}
CFG = CONFIGS["per-layer"]  # the layout the machine runs now (test_cache_state_machine sets it)
TENSORS = 4
TOKENS_PER_PAGE = 64
WRITE_T = 4  # tokens per write call: one compiled shape for every write
STEPS = 100
EXAMPLES = 70  # per layout: about 2 * EXAMPLES * STEPS operations; at least 10,000 are asserted
OPERATIONS = {"steps": 0, "faults": 0, "bad_inputs": 0}


def counted(rule_fn):
    """Count every rule execution (the 10,000-operation floor is asserted)."""

    def wrapper(self, *args, **kwargs):
        OPERATIONS["steps"] += 1
        return rule_fn(self, *args, **kwargs)

    wrapper.__name__ = rule_fn.__name__
    wrapper.__doc__ = rule_fn.__doc__
    return wrapper


def pages_for(tokens: int) -> int:
    return math.ceil(tokens * CFG.token_bytes / CFG.page_bytes)


def read_token(m, layer, kv, slot, pos) -> np.ndarray:
    """Layer ``layer``'s K (kv=0) or V of one token, at its entry of the token (token_bytes apart)."""
    addr = m._native.entry_address(layer, kv) + slot * m._native.slot_bytes + pos * CFG.token_bytes
    return np.ctypeslib.as_array((ctypes.c_float * (CFG.kv_heads * CFG.head_dim)).from_address(addr)).copy()


def maps_inside(ranges) -> list[tuple[int, int, list[str]]]:
    """``(start, end, fields)`` of every /proc/self/maps line overlapping ``ranges``.

    The file is sorted by address, and after many XLA compiles it holds thousands of
    lines (the executables' code): bisect to each range instead of parsing them all.
    """
    with open("/proc/self/maps") as f:
        lines = f.read().splitlines()

    def start_of(line: str) -> int:
        return int(line[: line.index("-")], 16)

    found = []
    for lo, hi in sorted(ranges):
        i = max(0, bisect.bisect_right(lines, lo, key=start_of) - 1)  # the mapping that may hold lo
        for line in lines[i:]:
            parts = line.split()
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start >= hi:
                break
            if end > lo:
                found.append((start, end, parts))
    return found


def memfd_pages_by_address(ranges) -> dict[int, int]:
    """Virtual page -> memfd offset for every pool page mapped inside `ranges`."""
    pages = {}
    for start, end, parts in maps_inside(ranges):
        if len(parts) < 6 or "jax_vattention_pool" not in parts[5]:
            continue
        if not any(lo <= start < hi for lo, hi in ranges):
            continue
        offset = int(parts[2], 16)
        for addr in range(start, end, CFG.page_bytes):
            pages[addr] = offset + (addr - start)
    return pages


def anonymous_holes(ranges) -> dict[str, int]:
    """Bytes of anonymous (non-memfd) mappings inside `ranges`, by permissions."""
    holes: dict[str, int] = {}
    seen = set()
    for start, end, parts in maps_inside(ranges):
        if len(parts) >= 6 or (start, end) in seen:
            continue  # named: memfd pages (or something else entirely); a mapping spanning two ranges once
        seen.add((start, end))
        inside = sum(max(0, min(end, hi) - max(start, lo)) for lo, hi in ranges)
        if inside:
            holes[parts[1]] = holes.get(parts[1], 0) + inside
    return holes


def first_unbacked_word(m, tensor, slot, capacity) -> int | None:
    """The 8 bytes at the start of the first page past `capacity` tokens of a slot (None when the slot is full)."""
    page = pages_for(capacity)
    if page * CFG.page_bytes >= m._native.slot_bytes:
        return None
    addr = m._native.tensor_address(tensor) + slot * m._native.slot_bytes + page * CFG.page_bytes
    return ctypes.c_uint64.from_address(addr).value


class CacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.m = jv.KVCacheManager(CFG, device=jax.devices("cpu")[0])
        assert self.m.unbacked_reads == "zeros"  # the host default
        assert self.m.tokens_per_page == TOKENS_PER_PAGE and len(self.m.tensors) == TENSORS
        self.live: set[int] = set()
        self.shadow: dict[tuple[int, int, int], float] = {}  # (slot, layer, pos) -> value
        self.next_value = 1.0
        tensor_bytes = CFG.max_batch * self.m._native.slot_bytes
        self.ranges = [(self.m._native.tensor_address(t), self.m._native.tensor_address(t) + tensor_bytes)
                       for t in range(TENSORS)]
        self.steps = 0

    def teardown(self):
        self.m.close()
        s = self.m.stats()
        assert (s.reserved_bytes, s.pages_created, s.pages_mapped) == (0, 0, 0)
        assert memfd_pages_by_address(self.ranges) == {}
        assert anonymous_holes(self.ranges) == {}

    def slot_strategy(self, data):
        return data.draw(st.sampled_from(sorted(self.live)))

    @rule(min_tokens=st.integers(0, CFG.max_seq))
    @counted
    def allocate(self, min_tokens):
        try:
            slot = self.m.allocate(min_tokens)
        except jv.SlotStateError:
            assert len(self.live) == CFG.max_batch
            return
        except jv.PoolExhaustedError as e:
            assert "needs" in str(e) and "free" in str(e)
            return
        assert slot not in self.live
        self.live.add(slot)
        assert self.m.capacity(slot) >= min_tokens

    @precondition(lambda self: self.live)
    @rule(data=st.data(), tokens=st.integers(0, CFG.max_seq))
    @counted
    def grow(self, data, tokens):
        slot = self.slot_strategy(data)
        before = self.m.capacity(slot)
        try:
            self.m.grow(slot, tokens)
        except jv.PoolExhaustedError:
            assert self.m.capacity(slot) == before
            return
        assert self.m.capacity(slot) >= max(before, tokens) or self.m.capacity(slot) >= tokens

    @precondition(lambda self: any(self.m.capacity(s) >= 1 for s in self.live))
    @rule(data=st.data(), layer=st.integers(0, CFG.num_layers - 1), count=st.integers(0, WRITE_T))
    @counted
    def write(self, data, layer, count):
        slot = data.draw(st.sampled_from(sorted(s for s in self.live if self.m.capacity(s) >= 1)))
        cap = self.m.capacity(slot)
        count = min(count, cap)
        start = data.draw(st.integers(0, cap - count))
        vals = self.next_value + np.arange(WRITE_T, dtype=np.float32)
        self.next_value += WRITE_T
        k = jnp.asarray(np.broadcast_to(vals[None, :, None, None], (1, WRITE_T, CFG.kv_heads, CFG.head_dim)))
        out = jv.ops.write(self.m, layer, k, -k, *(jnp.array([x], jnp.int32) for x in (slot, start, count)))
        assert int(out[0]) == start + count
        for i in range(count):
            self.shadow[(slot, layer, start + i)] = float(vals[i])

    @precondition(lambda self: self.live)
    @rule(data=st.data(), past=st.integers(1, 8))
    @counted
    def write_past_capacity_is_refused(self, data, past):
        slot = self.slot_strategy(data)
        start = self.m.capacity(slot) - 1 + past
        k = jnp.zeros((1, WRITE_T, CFG.kv_heads, CFG.head_dim), jnp.float32)
        with pytest.raises(jax.errors.JaxRuntimeError, match="CacheValueError"):
            jv.ops.write(self.m, 0, k, k, *(jnp.array([x], jnp.int32) for x in (slot, start, 1))).block_until_ready()
        OPERATIONS["bad_inputs"] += 1

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    @counted
    def free(self, data):
        slot = self.slot_strategy(data)
        self.m.free(slot)
        self.live.remove(slot)
        self.shadow = {key: v for key, v in self.shadow.items() if key[0] != slot}
        with pytest.raises(jv.SlotStateError):
            self.m.free(slot)  # double free
        OPERATIONS["bad_inputs"] += 1

    @rule(slot=st.integers(-3, CFG.max_batch + 3), tokens=st.integers(-5, CFG.max_seq + 300))
    @counted
    def bad_grow(self, slot, tokens):
        if 0 <= slot < CFG.max_batch and slot in self.live and 0 <= tokens <= self.m.max_seq:
            return  # a valid call; the grow rule covers it
        with pytest.raises((jv.CacheValueError, jv.SlotStateError)):
            self.m.grow(slot, tokens)
        OPERATIONS["bad_inputs"] += 1

    @rule(max_pages=st.one_of(st.none(), st.integers(0, 40)), release=st.booleans())
    @counted
    def trim(self, max_pages, release):
        before = self.m.stats()
        got = self.m.trim(max_pages, release_physical=release)
        after = self.m.stats()
        assert before.pages_mapped - after.pages_mapped == got
        assert (after.pages_mapped - after.pages_mapped_free_slots
                == before.pages_mapped - before.pages_mapped_free_slots)
        if release:
            assert after.pages_free == 0

    @rule(data=st.data())
    @counted
    def exhaust_pool(self, data):
        """Ask one free-capacity slot for more than the whole budget can give."""
        if len(self.live) == CFG.max_batch:
            return
        slot = self.m.allocate()
        self.live.add(slot)
        others = sum(pages_for(self.m.capacity(s)) for s in self.live if s != slot) * TENSORS
        if others + pages_for(CFG.max_seq) * TENSORS <= self.m.stats().pages_budget:
            return  # the budget could cover it; not an exhaustion case
        with pytest.raises(jv.PoolExhaustedError, match="needs"):
            self.m.grow(slot, CFG.max_seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), kind=st.sampled_from(["create", "map"]))
    @counted
    def grow_with_injected_fault(self, data, kind):
        """The backend fails to create or map a page: an exception, consistent state, a working retry."""
        slot = self.slot_strategy(data)
        cap = self.m.capacity(slot)
        target = min(self.m.max_seq, cap + TOKENS_PER_PAGE)
        if target == cap:
            return
        self.m._inject_failures(creates=int(kind == "create"), maps=int(kind == "map"))
        try:
            self.m.grow(slot, target)
        except jv.BackendError as e:
            OPERATIONS["faults"] += 1
            assert "injected" in str(e)
            assert self.m.capacity(slot) == cap  # the page index in progress was rolled back
        except jv.PoolExhaustedError:
            return
        finally:
            self.m._inject_failures(0, 0)
        self.accounting_matches_capacities()
        try:
            self.m.grow(slot, target)  # the fault has cleared
        except jv.PoolExhaustedError:
            return
        assert self.m.capacity(slot) >= target

    @invariant()
    def accounting_matches_capacities(self):
        s = self.m.stats()
        want = sum(pages_for(c) for c in s.slot_capacity) * TENSORS
        assert s.pages_mapped == want
        free_slots = [i for i, a in enumerate(s.slot_allocated) if not a]
        assert s.pages_mapped_free_slots == sum(pages_for(s.slot_capacity[i]) for i in free_slots) * TENSORS
        assert s.pages_created == s.pages_mapped + s.pages_free
        assert s.pages_created <= s.pages_budget
        assert {i for i, a in enumerate(s.slot_allocated) if a} == self.live

    @invariant()
    def memory_matches(self):
        self.steps += 1
        for (slot, layer, pos), value in self.shadow.items():
            np.testing.assert_array_equal(read_token(self.m, layer, 0, slot, pos), value)
            np.testing.assert_array_equal(read_token(self.m, layer, 1, slot, pos), -value)
        if self.steps % 10 == 0:  # /proc/self/maps is slower: every 10th step
            pages = memfd_pages_by_address(self.ranges)
            assert len(pages) == self.m.stats().pages_mapped
            assert len(set(pages.values())) == len(pages), "a physical page is mapped twice"
            # The rest of the reservations: read-only anonymous holes, exactly the unmapped pages.
            reserved = sum(hi - lo for lo, hi in self.ranges)
            assert anonymous_holes(self.ranges) == {"r--p": reserved - len(pages) * CFG.page_bytes}
            for slot, capacity in enumerate(self.m.stats().slot_capacity):
                for tensor in range(TENSORS):
                    assert first_unbacked_word(self.m, tensor, slot, capacity) in (None, 0), (slot, tensor)


CacheMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_cache_state_machine():
    """Both layouts in one test, so the 10,000-operation floor counts them together."""
    global CFG, TENSORS
    OPERATIONS.update(steps=0, faults=0, bad_inputs=0)
    per_layout = {}
    try:
        for name, cfg in CONFIGS.items():
            CFG, TENSORS = cfg, cfg.num_tensors
            assert cfg.page_bytes // cfg.token_bytes == TOKENS_PER_PAGE
            before = dict(OPERATIONS)
            CacheMachine.TestCase().runTest()
            per_layout[name] = {k: OPERATIONS[k] - before[k] for k in OPERATIONS}
    finally:
        CFG, TENSORS = CONFIGS["per-layer"], 4
    print(f"state machine: {per_layout}")
    for name, ops in per_layout.items():
        assert ops["faults"] > 0 and ops["bad_inputs"] > 0, (name, ops)
    assert OPERATIONS["steps"] >= 10_000, OPERATIONS
