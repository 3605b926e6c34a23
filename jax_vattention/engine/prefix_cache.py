"""Prefix caching (``EngineConfig.enable_prefix_caching``): a ``PrefixIndex`` over a pool's shareable pages.

On admission a request maps the longest cached run of full pages that starts its known tokens into its new slot
(``KVPool.map_prefix``: the same physical pages at the same page indices, read-only for the slot) and prefills
only the rest. The last known token is always computed (its logits are the next token's), so at most
``(num_tokens - 1) // tokens_per_page`` pages are reused, and the first token a request writes lies in a page it
owns. After each prefill chunk, and when a request releases its slot (finished, preempted, cancelled or failed),
its full pages whose tokens are computed and known are pinned (``KVPool.pin_prefix``) and indexed (``commit``),
so requests admitted while it still runs reuse its prompt, as vLLM caches a block once it is full; a page some
other request indexed first is held instead, not indexed twice. The request holds what it indexed until it
releases its slot. Unheld cached pages are evicted in LRU order when the pool runs short (``evict``).
"""

from __future__ import annotations

import math

from ..cache.prefix_index import ROOT, CachedPage, PrefixIndex
from ..cache.protocol import GROWN, GrowResult, KVPool, SharingPool
from .request import Request


def prefix_namespace(model_config, pool) -> str:
    """What a cached page's key depends on besides its tokens: the model (its config) and the pool's layout."""
    layout = getattr(getattr(pool, "manager", None), "config", None)
    return f"{model_config!r}/{layout!r}/{pool.tokens_per_page}"


class PrefixCache:
    """The index and the pool's pins kept in agreement (module docstring)."""

    def __init__(self, pool: KVPool, namespace: str):
        if not isinstance(pool, SharingPool):
            raise TypeError(f"prefix caching needs a pool that shares pages (SharingPool), got {type(pool).__name__}")
        self.pool: SharingPool = pool
        self.tokens_per_page = int(pool.tokens_per_page)
        self.index = PrefixIndex(self.tokens_per_page, namespace)
        self._held: dict[int, list[CachedPage]] = {}  # request id -> the cached pages it maps or indexed, in order
        self.evicted_pages = 0

    def admit(self, r: Request, slot: int) -> tuple[int, GrowResult]:
        """Map ``r``'s cached prefix into its new ``slot``; ``(tokens reused, result)``. On a failure nothing is
        mapped or held."""
        tokens = r.token_slice(0, r.num_tokens)
        pages = self.index.acquire(tokens, (len(tokens) - 1) // self.tokens_per_page)
        if not pages:
            return 0, GROWN
        result = self.pool.map_prefix(slot, [h for p in pages for h in p.handles])
        if not result.ok:
            self.index.release(pages)
            return 0, result
        self._held[r.request_id] = pages
        return len(pages) * self.tokens_per_page, GROWN

    def commit(self, r: Request) -> None:
        """Index ``r``'s full pages whose tokens are computed and known, held by ``r`` from now on. A page that is
        cached already (another request computed the same tokens) is held as it is; the chain stops at a page
        that can be neither (its parent was evicted), to go on at ``r``'s next commit."""
        held = self._held.setdefault(r.request_id, [])
        tokens = r.token_slice(0, min(r.num_cached, r.num_tokens))
        full = len(tokens) // self.tokens_per_page
        if r.slot is None or full <= len(held):
            return
        keys = self.index.page_keys(tokens)
        pinned: list[tuple[int, ...]] = []  # per page [0, full): its handles, once the pages are pinned
        used: set[int] = set()  # pages whose pin an index entry keeps
        for d in range(len(held), full):
            page = self.index.hold(keys[d])
            if page is None:
                if not pinned:
                    handles = self.pool.pin_prefix(r.slot, full)  # [full * tensors]: pages [0, full) pinned again
                    per = len(handles) // full
                    pinned = [handles[i * per:(i + 1) * per] for i in range(full)]
                page = self.index.insert(keys[d], held[-1].key if held else ROOT, d, pinned[d])
                if page is None:
                    break
                used.add(d)
            held.append(page)
        if pinned:
            self.pool.unpin([h for d, hs in enumerate(pinned) if d not in used for h in hs])

    def retire(self, r: Request) -> None:
        """``r`` is about to release its slot: index its full, known pages, then stop holding its cached ones."""
        self.commit(r)
        held = self._held.pop(r.request_id, [])
        if held:
            self.index.release(held)

    def evict(self, pages_wanted: int) -> int:
        """Unpin unheld cached pages (LRU leaves first) worth ``pages_wanted`` pool pages; returns the pool pages
        unpinned (a page mapped by a free slot's deferred mapping is freed when that mapping goes too)."""
        per = max(1, self.pool.pages_needed(self.tokens_per_page))
        dropped = self.index.evict(math.ceil(pages_wanted / per))
        handles = [h for hs in dropped for h in hs]
        if handles:
            self.pool.unpin(handles)
        self.evicted_pages += len(dropped)
        return len(handles)

    def stats(self) -> dict:
        s = self.index.stats()
        return dict(prefix_cache_hit_rate=s["hit_rate"], prefix_cache_hit_tokens=s["hit_tokens"],
                    prefix_cache_query_tokens=s["query_tokens"], prefix_cache_pages=s["cached_pages"],
                    prefix_cache_evicted_pages=self.evicted_pages)
