"""KV memories behind one protocol: the vAttention cache and the static and paged baselines.

* ``protocol``: ``KVCacheLike`` (jit side: ``grow``, ``write``, ``attention``,
  ``export``/``restore``) and ``KVPool`` (host side: slots, pages, accounting,
  typed ``GrowResult``), with the ``CacheRows`` base every cache shares.
* ``vattention``: ``KVCache``, zero-copy views of a ``KVCacheManager``.
* ``static``: ``StaticKVCache``, ``max_batch x max_seq`` XLA buffers.
* ``paged``: ``PagedKVCache``, vLLM-style block tables over JAX's ``paged_attention``.
* ``pools``, ``paged_pool``: ``VAttentionPool``, ``StaticPool``, ``PagedKVPool``.
"""

from .paged import PagedCacheState, PagedKVCache
from .paged_pool import PagedKVPool
from .pools import StaticPool, VAttentionPool
from .protocol import EXHAUSTED, GROWN, Allocation, CacheRows, GrowResult, KVCacheLike, KVPool
from .static import StaticKVCache
from .vattention import CacheState, KVCache

__all__ = [
    "EXHAUSTED",
    "GROWN",
    "Allocation",
    "CacheRows",
    "CacheState",
    "GrowResult",
    "KVCache",
    "KVCacheLike",
    "KVPool",
    "PagedCacheState",
    "PagedKVCache",
    "PagedKVPool",
    "StaticKVCache",
    "StaticPool",
    "VAttentionPool",
]
