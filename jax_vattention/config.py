"""Frozen configuration of a vAttention KV cache."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from .errors import CacheValueError

MIB = 1 << 20
# dtypes the cache can hold, with their DLPack (type code, bits).
SUPPORTED_DTYPES = {
    "bfloat16": (4, 16),
    "float16": (2, 16),
    "float32": (2, 32),
}


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Shape and memory policy of a cache of ``num_layers`` K and V tensors.

    Each tensor is reserved as one contiguous virtual range, token-major:
    ``[max_batch, max_seq, kv_heads, head_dim]``. ``max_seq`` is rounded up so
    that each batch slot is a whole number of pages (see
    ``KVCacheManager.max_seq``).

    Attributes:
      page_bytes: physical page size. Must be a multiple of the backend's
        mapping granularity (2 MiB for CUDA VMM, 4 KiB on the host).
      pool_bytes: physical memory budget for all pages of all tensors. ``None``
        means "enough for every slot at max_seq" (no oversubscription).
      deferred_reclaim: when True, a freed slot keeps its pages mapped so the
        next request reuses them without mapping; ``trim()`` or pool pressure
        reclaims them.
    """

    num_layers: int
    max_batch: int
    max_seq: int
    kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    page_bytes: int = 2 * MIB
    pool_bytes: int | None = None
    deferred_reclaim: bool = True

    def __post_init__(self):
        for name in ("num_layers", "max_batch", "max_seq", "kv_heads", "head_dim", "page_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise CacheValueError(f"CacheConfig.{name} must be a positive int, got {value!r}")
        if self.max_seq >= 2**31:
            raise CacheValueError(f"CacheConfig.max_seq must be < 2**31, got {self.max_seq}")
        if self.pool_bytes is not None and (
            isinstance(self.pool_bytes, bool) or not isinstance(self.pool_bytes, (int, np.integer))
            or self.pool_bytes <= 0
        ):
            raise CacheValueError(f"CacheConfig.pool_bytes must be a positive int or None, got {self.pool_bytes!r}")
        name = jnp.dtype(self.dtype).name if _is_dtype(self.dtype) else str(self.dtype)
        if name not in SUPPORTED_DTYPES:
            raise CacheValueError(f"CacheConfig.dtype must be one of {sorted(SUPPORTED_DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", name)

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def itemsize(self) -> int:
        return self.jnp_dtype.itemsize

    @property
    def token_bytes(self) -> int:
        """Bytes one token occupies in one K (or V) tensor."""
        return self.kv_heads * self.head_dim * self.itemsize


def _is_dtype(x) -> bool:
    try:
        jnp.dtype(x)
        return True
    except TypeError:
        return False
