"""jax_vattention: vAttention KV caches for JAX.

Each layer's K and V cache is one contiguous virtual range
``[max_batch, max_seq, kv_heads, head_dim]``; physical pages are mapped into a
slot only as its context grows (CUDA VMM on GPU, memfd+mmap on the host).

Layers, bottom up: ``config``/``errors``/``manager``/``ops`` (the native cache
and its FFI calls), ``cache`` (the cache and pool protocols, the vAttention cache
and the static and paged baselines), ``attention`` (kernels, references and
their dispatch), ``sampling``/``inputs``/``hlo`` (shared by everything that
generates), ``engine`` (the serving engine). Nothing here imports ``models``.
"""

from .cache import CacheState, KVCache
from .config import CacheConfig
from .errors import (
    BackendError,
    CacheClosedError,
    CacheValueError,
    PoolExhaustedError,
    SlotStateError,
    VAttentionError,
)
from .manager import CacheStats, KVCacheManager, default_device
from .ops import grow, write
from .sampling import SamplingParams

__all__ = [
    "BackendError",
    "CacheClosedError",
    "CacheConfig",
    "CacheState",
    "CacheStats",
    "CacheValueError",
    "KVCache",
    "KVCacheManager",
    "PoolExhaustedError",
    "SamplingParams",
    "SlotStateError",
    "VAttentionError",
    "default_device",
    "grow",
    "write",
]
