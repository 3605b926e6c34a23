"""Type stubs for ``jax_vattention._core``, the native extension built from ``ffi/bindings.cc``.

Integer arguments accept anything with ``__index__`` (int, numpy integers); an
int outside the signed 64-bit range raises ``CacheValueError`` naming the
argument, any other type ``TypeError``. Errors of the core arrive as the classes
handed to ``_set_error_classes`` (``jax_vattention.errors``).
"""

import sys
from collections.abc import Sequence
from typing import SupportsIndex, TypedDict

if sys.version_info >= (3, 13):
    from types import CapsuleType
else:
    from typing_extensions import CapsuleType

def _set_error_classes(classes: dict[str, type[BaseException]]) -> None:
    """Map the core's error kinds (keys: the class names) to Python exception classes."""

def registrations() -> dict[str, CapsuleType]:
    """XLA FFI handler capsules, keyed ``vattn_{grow,write}_{cpu,cuda}`` (cuda only when compiled)."""

def cuda_compiled() -> bool:
    """Whether this build has the CUDA backend and handlers."""

def add_device_group(ordinals: Sequence[int], ids: Sequence[int]) -> int:
    """An id for caches ``ids``, one per device ordinal: an FFI call given it uses the cache of the device it runs
    on (``ValueError``-like ``CacheValueError`` for mismatched lists, a repeated ordinal or a closed cache)."""

def remove_device_group(id: int) -> None:
    """Forget a device group (its caches stay open)."""

class _Stats(TypedDict):
    reserved_bytes: int
    page_bytes: int
    pages_budget: int
    pages_created: int
    pages_free: int
    pages_in_use: int
    pages_mapped: int
    pages_pinned: int
    pages_shared: int
    pages_mapped_free_slots: int
    pages_live: int
    mapped_bytes: int
    physical_bytes: int
    live_slots: int
    creates: int
    destroys: int
    maps: int
    unmaps: int
    slot_capacity: tuple[int, ...]
    slot_allocated: tuple[bool, ...]
    slot_shared_pages: tuple[int, ...]

class Manager:
    """One cache: its reservations, page pool and slots, registered for the FFI handlers under ``id``."""

    def __init__(
        self,
        num_layers: SupportsIndex,
        max_batch: SupportsIndex,
        max_seq: SupportsIndex,
        kv_heads: SupportsIndex,
        head_dim: SupportsIndex,
        itemsize: SupportsIndex,
        page_bytes: SupportsIndex,
        pool_bytes: SupportsIndex,
        deferred_reclaim: bool,
        backend: str,
        device_ordinal: int,
        unbacked_reads: str,
        layers_per_group: SupportsIndex = 1,
    ) -> None:
        """``unbacked_reads``: ``"zeros"`` (reserved memory with no page behind it reads as zeros) or ``"fault"``
        (reading it faults); anything else raises ``CacheValueError``. ``layers_per_group``: 1 for per-layer
        tensors, a divisor g > 1 of ``num_layers`` for ``num_layers / g`` interleaved ones (``CacheValueError``
        naming it otherwise)."""
    @property
    def id(self) -> int:
        """The ``manager_id`` attribute the FFI calls carry."""
    @property
    def closed(self) -> bool: ...
    @property
    def unbacked_reads(self) -> str:
        """``"zeros"`` or ``"fault"``, as constructed (also after ``close()``)."""
    @property
    def max_seq(self) -> int:
        """max_seq rounded up so that a slot is a whole number of pages."""
    @property
    def layers_per_group(self) -> int: ...
    @property
    def entries_per_token(self) -> int:
        """``[Hkv, D]`` entries per token of one tensor: 1 per-layer, ``2 * layers_per_group`` interleaved."""
    @property
    def entry_bytes(self) -> int:
        """One token of one layer's K (or V): ``kv_heads * head_dim * itemsize``."""
    @property
    def token_bytes(self) -> int:
        """The token stride of one tensor: ``entries_per_token * entry_bytes``."""
    @property
    def num_tensors(self) -> int:
        """Reserved tensors: ``2 * num_layers / entries_per_token``."""
    @property
    def slot_bytes(self) -> int: ...
    @property
    def tensor_bytes(self) -> int:
        """Bytes one tensor reserves: ``max_batch * slot_bytes``."""
    @property
    def pages_per_slot(self) -> int: ...
    @property
    def granularity(self) -> int:
        """The backend's mapping granularity in bytes."""
    def tensor_address(self, tensor: SupportsIndex) -> int:
        """Base address of reserved tensor ``tensor`` in ``[0, num_tensors)``."""
    def locate(self, layer: SupportsIndex, kv: SupportsIndex) -> tuple[int, int]:
        """``(tensor, byte offset of the entry within a token)`` of layer ``layer``'s K (kv=0) or V (kv=1)."""
    def entry_address(self, layer: SupportsIndex, kv: SupportsIndex) -> int:
        """Address of layer ``layer``'s K (kv=0) or V (kv=1) at slot 0, token 0: ``tensor_address + offset``.
        Token ``p`` of slot ``s`` is ``s * slot_bytes + p * token_bytes`` further, ``entry_bytes`` long."""
    def allocate(self, min_tokens: SupportsIndex) -> int: ...
    def grow(self, slot: SupportsIndex, tokens: SupportsIndex) -> None: ...
    def free(self, slot: SupportsIndex) -> None: ...
    def trim(self, max_pages: SupportsIndex, release_physical: bool) -> int:
        """Unmap pages of free slots (all when max_pages < 0); returns the pages unmapped."""
    def pin_pages(self, slot: SupportsIndex, n_pages: SupportsIndex) -> list[int]:
        """Pin the physical pages at page indices ``[0, n_pages)`` of ``slot`` in every tensor: ``n_pages *
        num_tensors`` opaque handles, ``[page][tensor]``, each referenced once more. ``SlotStateError`` if the slot
        is not allocated, ``CacheValueError`` if it has fewer than ``n_pages`` mapped."""
    def unpin_pages(self, handles: Sequence[int]) -> None:
        """Drop one pin of each handle (a page whose last reference goes returns to the free list);
        ``CacheValueError``, with nothing unpinned, if a handle is not pinned (that often)."""
    def map_shared(self, slot: SupportsIndex, handles: Sequence[int]) -> None:
        """Map ``[page][tensor]`` handles (pinned or mapped pages) at the first page indices of ``slot``, read-only
        for it, after unmapping the slot's own pages; all or nothing."""
    def shared_pages(self, slot: SupportsIndex) -> int:
        """Page indices of ``slot`` mapped by ``map_shared`` (its read-only prefix)."""
    def tensor_view(
        self,
        tensor: SupportsIndex,
        dtype_code: int,
        dtype_bits: int,
        owner: object | None = None,
        host_device: int = 0,
    ) -> CapsuleType:
        """A DLPack capsule over reserved tensor ``tensor``: ``[max_batch, max_seq, kv_heads, head_dim]`` per-layer,
        ``[max_batch, max_seq, g, 2, kv_heads, head_dim]`` interleaved; ``owner`` is kept alive until the consumer
        releases the memory; a host view names CPU device ``host_device``."""
    def capacity(self, slot: SupportsIndex) -> int: ...
    def allocated(self, slot: SupportsIndex) -> bool: ...
    def stats(self) -> _Stats: ...
    def close(self) -> None: ...
    def inject_failures(self, creates: int, maps: int) -> None:
        """Test-only: the next ``creates`` page creations and ``maps`` mappings fail."""
    def device_mem_info(self) -> tuple[int, int]:
        """(free, total) device bytes; CacheValueError on the host backend."""
    def take_device_error(self) -> list[int]:
        """[flag, row, slot, end] of the first write the device refused since the last call (zeros if none;
        always zeros on the host backend)."""
