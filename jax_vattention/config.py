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
# What reading reserved cache memory with no page behind it gives (CacheConfig.unbacked_reads).
UNBACKED_READS = ("zeros", "fault")
# The default per backend when CacheConfig.unbacked_reads is None: flip a backend's default here, and only here.
# host: "zeros" costs nothing (a private read-only anonymous mapping reads the kernel's zero page).
# cuda: "fault", chosen from benchmarks/results/zero_mapping_nvidia-h200.md: a read-only zero page costs one
#   cuMemMap (2.2 us) + cuMemSetAccess (36.5 us) per 2 MiB page at start-up (10 s for a Llama-3-8B reservation of
#   B=128 x 32K), and every page grow maps pays one more cuMemUnmap (24.2 us on top of 53 us, +46%).
DEFAULT_UNBACKED_READS = {"host": "zeros", "cuda": "fault"}


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Shape, layout and memory policy of a KV cache of ``num_layers`` layers.

    Each reserved tensor is one contiguous virtual range, token-major, and
    ``max_seq`` is rounded up so that each batch slot is a whole number of pages
    (see ``KVCacheManager.max_seq``). ``layers_per_group`` (g) picks the layout:

    * ``g = 1`` (per-layer): ``2 * num_layers`` tensors, each one layer's K or V,
      ``[max_batch, max_seq, kv_heads, head_dim]``. A 2 MiB page holds 1024 tokens
      of one tensor for Llama-3-8B (Hkv=8, D=128, bf16), so the smallest request
      maps ``2 * num_layers`` pages (128 MiB).
    * ``g > 1`` (interleaved): ``num_layers / g`` tensors, each
      ``[max_batch, max_seq, g, 2, kv_heads, head_dim]``: a token holds K then V of
      every layer of its group. With ``g = num_layers`` a token of Llama-3-8B is
      128 KiB and a 2 MiB page holds 16 tokens of the whole model: block-table
      granularity. A layer's K is still an ordinary strided tensor (token stride
      ``token_bytes``); the kernels read it in place.

    Attributes:
      page_bytes: physical page size. Must be a multiple of the backend's
        mapping granularity (2 MiB for CUDA VMM, 4 KiB on the host).
      pool_bytes: physical memory budget for all pages of all tensors. ``None``
        means "enough for every slot at max_seq" (no oversubscription).
      deferred_reclaim: when True, a freed slot keeps its pages mapped so the
        next request reuses them without mapping; ``trim()`` or pool pressure
        reclaims them.
      unbacked_reads: what reading reserved memory with no page behind it gives
        (a view is ``max_batch x max_seq``, mostly unbacked). ``"zeros"``: zeros,
        so printing, ``repr`` or reducing a view (debuggers and loggers that show
        locals do it too) is harmless. ``"fault"``: the read faults (SIGSEGV on the
        host, an illegal address on CUDA), the strict mode the no-copy and
        no-read-past-length proofs run in: a copy of the cache or a kernel reading
        past a row's length kills the process instead of reading zeros. Writes to
        unbacked memory fault in both modes. ``None`` (default) takes the backend's
        default from ``DEFAULT_UNBACKED_READS``: ``"zeros"`` on the host, where it
        costs nothing (a private read-only anonymous mapping reads the kernel's zero
        page); ``"fault"`` on CUDA, where ``"zeros"`` maps one physical zero page
        read-only into every unbacked 2 MiB page: measured on an H200
        (``benchmarks/results/zero_mapping_nvidia-h200.md``), 38.7 us per page at
        start-up (10 s for a Llama-3-8B reservation of 128 x 32K tokens) and 24.2 us
        more per page every ``grow`` maps (+46% over a 53 us real page), on the
        serving path. Ask for ``"zeros"`` on CUDA to make views safe to print there.
        ``KVCacheManager.unbacked_reads`` reports the mode in effect.
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
    unbacked_reads: str | None = None
    layers_per_group: int = 1

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
        if self.unbacked_reads is not None and (
                not isinstance(self.unbacked_reads, str) or self.unbacked_reads not in UNBACKED_READS):
            raise CacheValueError(f"CacheConfig.unbacked_reads must be one of {list(UNBACKED_READS)} or None, "
                                  f"got {self.unbacked_reads!r}")
        g = check_int("CacheConfig.layers_per_group", self.layers_per_group, low=1, high=self.num_layers,
                      hint=f"(1 = per-layer tensors, num_layers={self.num_layers} = fully interleaved)",
                      error=CacheValueError)
        if self.num_layers % g:
            divisors = [d for d in range(1, self.num_layers + 1) if self.num_layers % d == 0]
            raise CacheValueError(f"CacheConfig.layers_per_group={g} does not divide num_layers={self.num_layers} "
                                  f"(choose one of {divisors})")
        object.__setattr__(self, "layers_per_group", g)
        name = jnp.dtype(self.dtype).name if _is_dtype(self.dtype) else str(self.dtype)
        if name not in SUPPORTED_DTYPES:
            raise CacheValueError(f"CacheConfig.dtype must be one of {sorted(SUPPORTED_DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", name)

    def unbacked_reads_for(self, backend: str) -> str:
        """The ``unbacked_reads`` mode in effect on ``backend`` ("host" or "cuda")."""
        return self.unbacked_reads if self.unbacked_reads is not None else DEFAULT_UNBACKED_READS[backend]

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def itemsize(self) -> int:
        return self.jnp_dtype.itemsize

    # -- layout (see the class docstring) -------------------------------------
    @property
    def interleaved(self) -> bool:
        """True when the layers of a group share one reservation (``layers_per_group > 1``)."""
        return self.layers_per_group > 1

    @property
    def entries_per_token(self) -> int:
        """``[Hkv, D]`` entries one token holds in one reserved tensor: 1 per-layer, ``2 * layers_per_group``
        interleaved (each layer's K then V)."""
        return 2 * self.layers_per_group if self.interleaved else 1

    @property
    def entry_bytes(self) -> int:
        """Bytes of one token of one layer's K (or V): ``kv_heads * head_dim * itemsize``."""
        return self.kv_heads * self.head_dim * self.itemsize

    @property
    def token_bytes(self) -> int:
        """Bytes one token occupies in one reserved tensor (the token stride)."""
        return self.entries_per_token * self.entry_bytes

    @property
    def num_tensors(self) -> int:
        """Reserved tensors: ``2 * num_layers`` per-layer, ``num_layers / layers_per_group`` interleaved."""
        return 2 * self.num_layers // self.entries_per_token

    @property
    def tokens_per_page(self) -> int:
        """Tokens of one slot one physical page backs (of every layer in its group)."""
        return self.page_bytes // self.token_bytes

    def locate(self, layer: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((tensor, entry) of K, (tensor, entry) of V)`` of ``layer``: where its rows live.

        Per-layer: tensors ``2*layer`` and ``2*layer + 1``, entry 0. Interleaved: tensor
        ``layer // g``, entries ``2*(layer % g)`` and ``2*(layer % g) + 1``.
        """
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise CacheValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        e = self.entries_per_token
        k_flat, v_flat = 2 * layer, 2 * layer + 1
        return (k_flat // e, k_flat % e), (v_flat // e, v_flat % e)

    def tensor_shape(self, max_seq: int) -> tuple[int, ...]:
        """Shape of one reserved tensor's view: ``[MB, S, Hkv, D]`` per-layer, ``[MB, S, g, 2, Hkv, D]`` interleaved."""
        if self.interleaved:
            return (self.max_batch, max_seq, self.layers_per_group, 2, self.kv_heads, self.head_dim)
        return (self.max_batch, max_seq, self.kv_heads, self.head_dim)


def _is_dtype(x) -> bool:
    try:
        jnp.dtype(x)
        return True
    except TypeError:
        return False
