"""Frozen configuration of a vAttention KV cache."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .errors import CacheValueError
from .validation import check_int

INT64_MAX = 2**63 - 1  # sizes cross into the native layer as int64
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
        # Python ints from here on: numpy integers (np.uint16 too) would overflow in the layout arithmetic.
        for name in ("num_layers", "max_batch", "kv_heads", "head_dim", "page_bytes"):
            value = check_int(f"CacheConfig.{name}", getattr(self, name), low=1, high=INT64_MAX, error=CacheValueError)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "max_seq", check_int("CacheConfig.max_seq", self.max_seq, low=1, high=2**31 - 1,
                                                      error=CacheValueError))
        if self.pool_bytes is not None:
            object.__setattr__(self, "pool_bytes", check_int("CacheConfig.pool_bytes", self.pool_bytes, low=1,
                                                             high=INT64_MAX, hint="or None", error=CacheValueError))
        if not isinstance(self.deferred_reclaim, bool):
            raise CacheValueError(f"CacheConfig.deferred_reclaim must be a bool, got {self.deferred_reclaim!r}")
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
