"""Prefix index for prefix caching: full pages of cached tokens, keyed by a hash chain (vLLM's block hashes).

Page ``i`` of a sequence (tokens ``[i * tpp, (i + 1) * tpp)``, ``tpp`` tokens per page) has the key
``H(key(i - 1), tokens of page i)``, with the chain's root keyed by a ``namespace`` (the model and the cache
layout): two sequences share page i's key only when their first ``(i + 1) * tpp`` tokens are equal. Only full
pages are indexed, so a request that reuses a cached prefix diverges in a page it owns.

The index holds, per cached page, the physical page ``handles`` a pool pinned for it (one per reserved tensor)
and who uses it:

* ``holders``: running requests mapping the page. A held page is never evicted.
* ``children``: cached pages that extend it. Only leaves are evicted (a parent's key is part of its children's).
* ``last_used``: a logical clock, for LRU order among the unheld leaves.

It owns no memory: ``insert`` records handles the caller pinned, ``evict`` returns the handles the caller must
unpin. ``PrefixIndex.check`` states the invariants the pool's accounting must agree with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
from collections.abc import Sequence

import numpy as np

ROOT = b""


@dataclasses.dataclass
class CachedPage:
    """One indexed page: its key, its parent's, its pinned handles and its use."""

    key: bytes
    parent: bytes  # ROOT for page 0
    depth: int  # page index in the sequence
    handles: tuple[int, ...]
    holders: int = 0
    children: int = 0
    last_used: int = 0


class PrefixIndex:
    """Hash-chained full pages of ``tokens_per_page`` tokens (module docstring)."""

    def __init__(self, tokens_per_page: int, namespace: bytes | str = b""):
        if isinstance(tokens_per_page, bool) or not isinstance(tokens_per_page, int) or tokens_per_page < 1:
            raise ValueError(f"tokens_per_page must be a positive int, got {tokens_per_page!r}")
        self.tokens_per_page = tokens_per_page
        self.namespace = namespace.encode() if isinstance(namespace, str) else bytes(namespace)
        self.pages: dict[bytes, CachedPage] = {}
        self._clock = 0
        self.queries = self.query_tokens = self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self.pages)

    # -- keys --------------------------------------------------------------------
    def page_keys(self, tokens: Sequence[int] | np.ndarray, max_pages: int | None = None) -> list[bytes]:
        """The keys of ``tokens``' full pages (at most ``max_pages``), in order."""
        t = np.asarray(tokens, np.int64)
        n = len(t) // self.tokens_per_page
        n = n if max_pages is None else min(n, max_pages)
        keys, key = [], hashlib.blake2b(self.namespace, digest_size=16).digest()
        for i in range(n):
            page = t[i * self.tokens_per_page:(i + 1) * self.tokens_per_page]
            key = hashlib.blake2b(key + page.tobytes(), digest_size=16).digest()
            keys.append(key)
        return keys

    # -- lookups -----------------------------------------------------------------
    def match(self, tokens: Sequence[int] | np.ndarray, max_pages: int | None = None) -> list[CachedPage]:
        """The longest run of cached pages that starts ``tokens`` (nothing is held or counted)."""
        out = []
        for key in self.page_keys(tokens, max_pages):
            page = self.pages.get(key)
            if page is None:
                break
            out.append(page)
        return out

    def acquire(self, tokens: Sequence[int] | np.ndarray, max_pages: int | None = None) -> list[CachedPage]:
        """``match``, held for a request that will map them (``release`` them when it stops using them); counted in
        the hit statistics."""
        pages = self.match(tokens, max_pages)
        self._tick(pages, +1)
        self.queries += 1
        self.query_tokens += len(tokens)
        self.hit_tokens += len(pages) * self.tokens_per_page
        return pages

    def hold(self, key: bytes) -> CachedPage | None:
        """The cached page ``key``, held for one more request (which computed the same tokens itself), or None
        (not counted in the hit statistics)."""
        page = self.pages.get(key)
        if page is not None:
            self._tick([page], +1)
        return page

    def release(self, pages: Sequence[CachedPage]) -> None:
        """A request stopped using ``pages`` (finished, preempted or cancelled)."""
        for p in pages:
            if p.holders <= 0 or self.pages.get(p.key) is not p:
                raise ValueError(f"page at depth {p.depth} is not held in this index")
        self._tick(pages, -1)

    def _tick(self, pages: Sequence[CachedPage], delta: int) -> None:
        self._clock += 1
        for p in pages:
            p.holders += delta
            p.last_used = self._clock

    # -- updates -----------------------------------------------------------------
    def insert(self, key: bytes, parent: bytes, depth: int, handles: Sequence[int]) -> CachedPage | None:
        """Index a page the caller pinned (``handles``), held by the request that wrote it. Returns the new entry,
        or None when ``key`` is already cached (the caller unpins its handles) or its parent is not (a chain is
        indexed from its root)."""
        if key in self.pages or (parent != ROOT and parent not in self.pages):
            return None
        if (parent == ROOT) != (depth == 0):
            raise ValueError(f"page at depth {depth} must have {'no' if depth == 0 else 'a'} parent")
        self._clock += 1
        page = CachedPage(key, parent, depth, tuple(int(h) for h in handles), holders=1, last_used=self._clock)
        self.pages[key] = page
        if parent != ROOT:
            self.pages[parent].children += 1
        return page

    def evict(self, n_pages: int) -> list[tuple[int, ...]]:
        """Drop up to ``n_pages`` unheld pages, least recently used leaves first (a parent becomes a leaf when its
        last child goes); returns their handles, which the caller unpins."""
        heap = [(p.last_used, p.key) for p in self.pages.values() if p.holders == 0 and p.children == 0]
        heapq.heapify(heap)
        out: list[tuple[int, ...]] = []
        while heap and len(out) < n_pages:
            _, key = heapq.heappop(heap)
            page = self.pages.pop(key)
            out.append(page.handles)
            parent = self.pages.get(page.parent)
            if parent is not None:
                parent.children -= 1
                if parent.children == 0 and parent.holders == 0:
                    heapq.heappush(heap, (parent.last_used, parent.key))
        return out

    @property
    def evictable(self) -> int:
        """Pages ``evict`` could drop now: unheld pages none of whose descendants is held."""
        held = set()
        for p in self.pages.values():
            if p.holders:
                key = p.key
                while key != ROOT and key not in held:
                    held.add(key)
                    key = self.pages[key].parent
        return len(self.pages) - len(held)

    # -- reporting ---------------------------------------------------------------
    def stats(self) -> dict:
        return dict(cached_pages=len(self.pages), queries=self.queries, query_tokens=self.query_tokens,
                    hit_tokens=self.hit_tokens,
                    hit_rate=self.hit_tokens / self.query_tokens if self.query_tokens else 0.0)

    def check(self) -> None:
        """Raise ``AssertionError`` unless the index is consistent: every parent cached, children counts exact,
        holders non-negative, no handle in two pages."""
        children: dict[bytes, int] = {}
        seen: set[int] = set()
        for p in self.pages.values():
            assert p.holders >= 0, p
            assert (p.parent == ROOT) == (p.depth == 0), p
            if p.parent != ROOT:
                assert p.parent in self.pages and self.pages[p.parent].depth == p.depth - 1, p
                children[p.parent] = children.get(p.parent, 0) + 1
            assert not seen & set(p.handles), f"a handle of {p} is in another page"
            seen |= set(p.handles)
        for p in self.pages.values():
            assert p.children == children.get(p.key, 0), p
