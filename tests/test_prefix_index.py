"""The prefix index (``jax_vattention.cache.prefix_index``): hash-chained full pages, holders, LRU leaf eviction.

A hypothesis state machine drives requests through admit (acquire the longest cached prefix), finish (index the
request's full pages, then release), preempt and cancel (release without indexing) and eviction under pressure,
against a model pool of pinned physical pages; after every step the index and the pool agree: every indexed
page's handles are pinned exactly once by the index, a held page is never evicted, nothing is leaked or unpinned
twice, and every cached page's content is the tokens its key was made from.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jax_vattention.cache.prefix_index import ROOT, PrefixIndex

TPP = 4


def test_keys_chain_over_whole_prefixes():
    idx = PrefixIndex(TPP, namespace="llama-3-8b/interleaved")
    a = idx.page_keys([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert len(a) == 2  # full pages only
    b = idx.page_keys([1, 2, 3, 4, 5, 6, 7, 0])
    assert a[0] == b[0] and a[1] != b[1]
    c = idx.page_keys([9, 2, 3, 4, 5, 6, 7, 8])
    assert c[1] != a[1]  # page 1's tokens equal, the prefix before differs: another key
    assert PrefixIndex(TPP, namespace="other").page_keys([1, 2, 3, 4]) != a[:1]
    assert idx.page_keys(range(12), max_pages=2) == idx.page_keys(range(8))


def test_match_insert_release_evict():
    idx = PrefixIndex(TPP)
    toks = list(range(12))
    keys = idx.page_keys(toks)
    parent = ROOT
    for d, k in enumerate(keys):
        assert idx.insert(k, parent, d, (100 + d,)) is not None
        parent = k
    assert idx.insert(keys[0], ROOT, 0, (7,)) is None  # already cached: the caller keeps its pin to drop
    assert [p.depth for p in idx.match(toks + [99])] == [0, 1, 2]
    assert [p.depth for p in idx.match(toks, max_pages=2)] == [0, 1]
    idx.release(idx.match(toks))  # the writer stops holding them
    assert idx.evictable == 3
    held = idx.acquire(toks[:8] + [50, 51, 52, 53])
    assert [p.depth for p in held] == [0, 1] and idx.evictable == 1
    assert idx.evict(5) == [(102,)]  # only the unheld leaf
    idx.release(held)
    assert idx.evict(1) == [(101,)] and idx.evict(5) == [(100,)] and len(idx) == 0
    with pytest.raises(ValueError, match="not held"):
        idx.release(held)
    s = idx.stats()
    assert s["hit_tokens"] == 8 and s["query_tokens"] == 12 and s["hit_rate"] == pytest.approx(8 / 12)
    with pytest.raises(ValueError, match="tokens_per_page"):
        PrefixIndex(0)


class IndexMachine(RuleBasedStateMachine):
    """Requests over a small vocabulary (so prefixes repeat) against a pool model of pinned pages."""

    def __init__(self):
        super().__init__()
        self.idx = PrefixIndex(TPP, namespace="m")
        self.pins: dict[int, int] = {}  # handle -> pins (the pool's refcount from pins)
        self.content: dict[int, tuple] = {}  # handle -> the tokens written to it
        self.next_handle = 0
        self.running: dict[int, tuple] = {}  # request -> (tokens, held pages)
        self.next_req = 0

    def _pin_new(self, tokens) -> int:
        h = self.next_handle
        self.next_handle += 1
        self.pins[h] = 1
        self.content[h] = tuple(tokens)
        return h

    def _unpin(self, handles):
        for h in handles:
            assert self.pins.get(h, 0) > 0, f"handle {h} unpinned twice"
            self.pins[h] -= 1
            if not self.pins[h]:
                del self.pins[h]

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=14))
    def admit(self, prompt):
        max_pages = (len(prompt) - 1) // TPP  # the last token is always computed: its logits are needed
        held = self.idx.acquire(prompt, max_pages)
        for p in held:  # a hit maps exactly the tokens the request would have written
            assert self.content[p.handles[0]] == tuple(prompt[p.depth * TPP:(p.depth + 1) * TPP])
        self.running[self.next_req] = (tuple(prompt), held)
        self.next_req += 1

    @precondition(lambda self: self.running)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), max_size=6))
    def finish(self, data, extra):
        """The request ran to completion: its full pages (prompt and output) are indexed, then released."""
        rid = data.draw(st.sampled_from(sorted(self.running)))
        tokens, held = self.running.pop(rid)
        tokens = tokens + tuple(extra)
        keys = self.idx.page_keys(tokens)
        parent, mine = ROOT, list(held)
        for d, key in enumerate(keys):
            if d < len(held):
                parent = key
                continue
            h = self._pin_new(tokens[d * TPP:(d + 1) * TPP])
            page = self.idx.insert(key, parent, d, (h,))
            if page is None:  # already cached by another request: drop our pin, stop the chain here
                self._unpin([h])
                break
            mine.append(page)
            parent = key
        self.idx.release(mine)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def preempt_or_cancel(self, data):
        rid = data.draw(st.sampled_from(sorted(self.running)))
        self.idx.release(self.running.pop(rid)[1])

    @rule(n=st.integers(1, 6))
    def evict(self, n):
        before = self.idx.evictable
        held = {p.key for _, pages in self.running.values() for p in pages}
        out = self.idx.evict(n)
        assert len(out) == min(n, before)
        self._unpin([h for handles in out for h in handles])
        assert held <= set(self.idx.pages)  # a held page is never evicted

    @invariant()
    def index_and_pool_agree(self):
        self.idx.check()
        indexed = [h for p in self.idx.pages.values() for h in p.handles]
        assert sorted(indexed) == sorted(self.pins)  # each indexed handle pinned once; nothing leaked
        assert all(c == 1 for c in self.pins.values())
        holders = {}
        for _, pages in self.running.values():
            for p in pages:
                holders[p.key] = holders.get(p.key, 0) + 1
        for p in self.idx.pages.values():
            assert p.holders == holders.get(p.key, 0), p
            expect = self.idx.page_keys(_tokens_of(self, p))[-1]
            assert expect == p.key  # its content hashes to its key


def _tokens_of(machine, page):
    """The tokens of ``page``'s whole prefix, from the pool's content of its chain."""
    chain = []
    while True:
        chain.append(machine.content[page.handles[0]])
        if page.parent == ROOT:
            break
        page = machine.idx.pages[page.parent]
    return np.concatenate([np.asarray(c) for c in reversed(chain)])


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
