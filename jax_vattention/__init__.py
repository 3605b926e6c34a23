"""jax_vattention: vAttention KV caches for JAX.

Each layer's K and V cache is one contiguous virtual range
``[max_batch, max_seq, kv_heads, head_dim]``; physical pages are mapped into a
slot only as its context grows (CUDA VMM on GPU, memfd+mmap on the host).

Layers, bottom up: ``config``/``errors``/``manager``/``ops`` (the native cache
and its FFI calls), ``cache`` (the cache and pool protocols, the vAttention cache
and the static and paged baselines), ``attention`` (kernels, references and
their dispatch), ``sampling``/``inputs``/``hlo`` (shared by everything that
generates), ``engine`` (the serving engine). Nothing here imports ``models``.

``from jax_vattention import LLM, SamplingParams`` (vLLM's spelling) imports the engine on first use.
"""

from typing import Any

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

_ENGINE = ("LLM", "AsyncLLM", "EngineConfig", "RequestOutput", "CompletionOutput", "RequestMetrics")


def __getattr__(name: str) -> Any:
    """The engine's names, imported on first use (importing the cache alone stays light)."""
    if name in _ENGINE:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LLM",
    "AsyncLLM",
    "BackendError",
    "CacheClosedError",
    "CacheConfig",
    "CacheState",
    "CacheStats",
    "CacheValueError",
    "CompletionOutput",
    "EngineConfig",
    "KVCache",
    "KVCacheManager",
    "PoolExhaustedError",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "SlotStateError",
    "VAttentionError",
    "default_device",
    "grow",
    "write",
]
