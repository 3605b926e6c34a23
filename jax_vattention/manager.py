"""KVCacheManager: owns one vAttention cache (reservations, page pool, slots).

Memory note (GPU): XLA preallocates 75% of GPU memory by default, which would
leave the page pool little room. Before importing jax, set either
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (XLA allocates on demand) or
``XLA_PYTHON_CLIENT_MEM_FRACTION`` to the share XLA should keep (e.g. ``0.4``).
The manager checks the device's free memory against ``pool_bytes`` when it
opens and names these variables when the pool cannot fit.

Why no code path donates a view: the K/V views are jax.Arrays over memory XLA
does not own. Donating one to a jit function either aborts the process on GPU
(when XLA does not alias it to an output) or is silently copied on CPU, and a
copy of a sparsely mapped cache reads unmapped pages. So views are only ever
passed as ordinary (non-donated) arguments and read; every write goes through
the ``write`` FFI call, which stores at the manager's addresses. Ordering is by
data dependency: readers index the cache with the lengths that ``write``
returns. Views must not be outputs of a top-level jit either (XLA would copy
them); return ``cache.state`` instead (see ``jax_vattention.cache``).
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from . import _core
from .config import SUPPORTED_DTYPES, CacheConfig
from .errors import ERROR_CLASSES, BackendError, CacheClosedError, CacheValueError, PoolExhaustedError
from .validation import check_int

_core._set_error_classes(ERROR_CLASSES)


def padded_max_seq(config: CacheConfig) -> int:
    """max_seq rounded up so that one slot is a whole number of pages (at ``token_bytes``, the token stride)."""
    quantum = math.lcm(config.token_bytes, config.page_bytes) // config.token_bytes
    return -(-config.max_seq // quantum) * quantum


def default_device() -> jax.Device:
    """The device jit would use: ``jax.default_device`` if set, else the first device."""
    default = jax.config.jax_default_device
    if isinstance(default, str):
        return jax.devices(default)[0]
    return default if default is not None else jax.devices()[0]


# Native managers closed while a view was alive elsewhere: released by that view's finalizer, or at exit.
_PENDING_RELEASE: set = set()


@atexit.register
def _release_pending_at_exit() -> None:
    for native in list(_PENDING_RELEASE):  # nothing reads the memory any more
        native.close()
    _PENDING_RELEASE.clear()


def _resolve_device(device) -> jax.Device:
    """``device`` as a ``jax.Device``: a device, a platform name ("cpu", "gpu", "cuda") or None (the default)."""
    if device is None:
        return default_device()
    if isinstance(device, str):
        try:
            return jax.devices(device)[0]
        except RuntimeError as e:
            raise CacheValueError(f"device={device!r}: no such platform here ({e})") from None
    if not isinstance(device, jax.Device):
        raise CacheValueError(f"device must be a jax.Device, a platform name or None, got {type(device).__name__}")
    return device


class _DLPackTensor:
    """Hands jax a DLPack capsule over one cache tensor (nothing is copied)."""

    _DL_CPU, _DL_CUDA = 1, 2

    def __init__(self, make_capsule, backend: str, device: jax.Device):
        self._make_capsule = make_capsule
        cuda = backend == "cuda"
        self._device = (self._DL_CUDA if cuda else self._DL_CPU, int(device.local_hardware_id or 0))

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        if copy:
            raise BufferError("a vAttention cache view cannot be exported as a copy")
        return self._make_capsule()

    def __dlpack_device__(self):
        return self._device


class _ViewToken:
    """The DLPack owner of one view; jax drops it once the view's memory is no longer in use."""


class _ViewTracker:
    """Counts views whose memory jax may still touch.

    jax releases a DLPack producer's owner only after the array was deleted
    *and* every computation already enqueued with it has finished, so waiting
    for the count to reach zero is waiting for in-flight reads of the cache.
    Holds no reference to the manager (the finalizers would keep it alive).
    """

    def __init__(self):
        self._cv = threading.Condition()
        self._alive = 0
        self._on_idle: Callable[[], None] | None = None

    def token(self) -> _ViewToken:
        token = _ViewToken()
        with self._cv:
            self._alive += 1
        weakref.finalize(token, self._release)
        return token

    def _release(self):
        with self._cv:
            self._alive -= 1
            self._cv.notify_all()
            callback = self._on_idle if self._alive == 0 else None
            if callback is not None:
                self._on_idle = None
        if callback is not None:
            callback()

    def wait(self, timeout: float) -> bool:
        with self._cv:  # waiting releases the GIL, so jax's threads can drop their holds
            return self._cv.wait_for(lambda: self._alive == 0, timeout)

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once no view is alive: now, or when the last one dies."""
        with self._cv:
            if self._alive > 0:
                self._on_idle = callback
                return
        callback()

    @property
    def alive(self) -> int:
        return self._alive


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """A snapshot of the manager's accounting. Page counts are summed over all reserved tensors
    (``config.num_tensors``: ``2 * num_layers`` per-layer, ``num_layers / layers_per_group`` interleaved).

    With prefix sharing (``pin_pages`` / ``map_shared``) one physical page may be mapped into several slots:
    ``pages_mapped`` (and ``mapped_bytes``) count *mappings*, so an aliased page counts once per slot that maps it,
    while ``pages_in_use`` counts distinct physical pages (what ``pages_budget`` bounds)."""

    reserved_bytes: int  # virtual address space held
    mapped_bytes: int  # pages_mapped * page_bytes (per mapping)
    physical_bytes: int  # physical pages that exist (in use + free list)
    page_bytes: int
    pages_budget: int
    pages_created: int
    pages_free: int  # created and unreferenced: on the free list
    pages_in_use: int  # pages_created - pages_free: distinct pages some mapping or pin references
    pages_mapped: int  # mappings of pages into slots (an aliased page counts per mapping)
    pages_pinned: int  # distinct pages with at least one pin
    pages_shared: int  # distinct pages with more than one reference (mappings + pins)
    pages_mapped_free_slots: int  # held by free slots (deferred reclamation)
    pages_live: int  # distinct pages mapped into allocated slots (an aliased page counts once)
    live_slots: int
    creates: int
    destroys: int
    maps: int
    unmaps: int
    slot_capacity: tuple[int, ...]  # tokens backed per slot
    slot_allocated: tuple[bool, ...]
    slot_shared_pages: tuple[int, ...]  # page indices per slot mapped by map_shared (its read-only prefix)


class KVCacheManager:
    """A vAttention KV cache for one device.

    Use as a context manager, or call ``close()``; either releases every page
    and reservation. Each reserved tensor is exposed as a zero-copy ``jax.Array``
    view, ``manager.tensors[t]`` of shape ``config.tensor_shape(max_seq)``:
    ``[max_batch, max_seq, kv_heads, head_dim]`` per-layer (``layers_per_group=1``;
    also as ``manager.k[layer]`` and ``manager.v[layer]``) or
    ``[max_batch, max_seq, g, 2, kv_heads, head_dim]`` interleaved, where
    ``config.locate(layer)`` gives a layer's (tensor, entry) for K and V. Reading
    a view where no page is mapped gives zeros or faults
    (``CacheConfig.unbacked_reads``, reported by ``unbacked_reads``).
    """

    def __init__(self, config: CacheConfig, *, device: jax.Device | str | None = None):
        if not isinstance(config, CacheConfig):
            raise CacheValueError(f"config must be a CacheConfig, got {type(config).__name__}")
        self._closing = False
        self.config = config
        self.device = _resolve_device(device)
        if self.device.platform == "gpu":
            if not _core.cuda_compiled():
                raise BackendError(
                    "this build of jax_vattention has no CUDA backend (nvcc was not found at build time)")
            backend, ordinal = "cuda", self.device.local_hardware_id
        elif self.device.platform == "cpu":
            backend, ordinal = "host", 0
        else:
            raise CacheValueError(f"unsupported device platform {self.device.platform!r}; use a CPU or CUDA device")
        self.max_seq = padded_max_seq(config)
        per_slot_pages = self.max_seq * config.token_bytes // config.page_bytes
        full_pool = config.num_tensors * config.max_batch * per_slot_pages * config.page_bytes
        self.pool_bytes = full_pool if config.pool_bytes is None else config.pool_bytes
        self._native = _core.Manager(
            num_layers=config.num_layers,
            max_batch=config.max_batch,
            max_seq=config.max_seq,
            kv_heads=config.kv_heads,
            head_dim=config.head_dim,
            itemsize=config.itemsize,
            page_bytes=config.page_bytes,
            pool_bytes=self.pool_bytes,
            deferred_reclaim=config.deferred_reclaim,
            backend=backend,
            device_ordinal=ordinal,
            unbacked_reads=config.unbacked_reads_for(backend),
            layers_per_group=config.layers_per_group,
        )
        assert self._native.max_seq == self.max_seq, (self._native.max_seq, self.max_seq)
        self.backend = backend
        self.id = int(self._native.id)
        self._views = _ViewTracker()
        if backend == "cuda":
            self._check_device_headroom()
        assert self._native.num_tensors == config.num_tensors, (self._native.num_tensors, config.num_tensors)
        assert self._native.token_bytes == config.token_bytes, (self._native.token_bytes, config.token_bytes)
        try:
            self._tensors = tuple(self._view(t) for t in range(config.num_tensors))
        except BaseException:
            self._native.close()
            raise

    # -- views ---------------------------------------------------------------
    def _view(self, tensor: int) -> jax.Array:
        code, bits = SUPPORTED_DTYPES[self.config.dtype]
        token = self._views.token()  # after this call, only jax's hold on the capsule keeps it alive
        host_device = 0 if self.backend == "cuda" else int(self.device.local_hardware_id or 0)  # which CPU device
        producer = _DLPackTensor(lambda: self._native.tensor_view(tensor, code, bits, token, host_device),
                                 self.backend, self.device)
        array = jax.dlpack.from_dlpack(producer)
        address = self._native.tensor_address(tensor)
        if array.unsafe_buffer_pointer() != address:  # never silently work on a copy
            raise BackendError(f"jax copied the view of cache tensor {tensor}; zero-copy import failed")
        shape = self.config.tensor_shape(self.max_seq)
        if array.shape != shape:
            raise BackendError(f"the view of cache tensor {tensor} has shape {array.shape}, expected {shape}")
        return array

    @property
    def tensors(self) -> tuple[jax.Array, ...]:
        """Zero-copy views of the reserved tensors, in tensor order, each ``config.tensor_shape(max_seq)``:
        per-layer ``K0, V0, K1, ...`` of ``[MB, S, Hkv, D]``; interleaved ``[MB, S, g, 2, Hkv, D]`` per group."""
        return self._tensors

    def _per_layer(self, kv: int) -> tuple[jax.Array, ...]:
        if self.config.interleaved:
            raise CacheValueError(
                f"this cache is interleaved (layers_per_group={self.config.layers_per_group}): there is no "
                f"per-layer {'KV'[kv]} array. Use manager.tensors with config.locate(layer), which gives the "
                "(tensor, entry) of a layer's K and V in [MB, S, g, 2, Hkv, D] tensors")
        return self._tensors[kv::2]

    @property
    def k(self) -> tuple[jax.Array, ...]:
        """Per-layer layout only: ``k[layer]`` is ``tensors[2 * layer]``, ``[MB, S, Hkv, D]``."""
        return self._per_layer(0)

    @property
    def v(self) -> tuple[jax.Array, ...]:
        """Per-layer layout only: ``v[layer]`` is ``tensors[2 * layer + 1]``, ``[MB, S, Hkv, D]``."""
        return self._per_layer(1)

    @property
    def tokens_per_page(self) -> int:
        """Tokens of one slot a physical page backs (in each tensor; of every layer of its group)."""
        return self.config.tokens_per_page

    @property
    def min_request_bytes(self) -> int:
        """Bytes the smallest request (one token) maps: one page in every reserved tensor."""
        return self.config.num_tensors * self.config.page_bytes

    def _check_device_headroom(self):
        free, total = self._native.device_mem_info()
        if self.pool_bytes > free:
            self._native.close()
            raise PoolExhaustedError(
                f"pool_bytes={self.pool_bytes / 2**30:.2f} GiB exceeds the {free / 2**30:.2f} GiB free on "
                f"{self.device} (of {total / 2**30:.2f} GiB). XLA preallocates 75% of GPU memory by default: set "
                "XLA_PYTHON_CLIENT_PREALLOCATE=false or XLA_PYTHON_CLIENT_MEM_FRACTION before importing jax "
                f"(now: PREALLOCATE={os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE')!r}, "
                f"MEM_FRACTION={os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')!r}), or lower pool_bytes."
            )

    # -- slot lifecycle ------------------------------------------------------
    def _check_open(self):
        if self.closed:
            raise CacheClosedError("the cache manager is closed")

    def _check_slot(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)):
            raise CacheValueError(f"slot must be an int, got {type(slot).__name__}")
        return int(slot)

    def _check_tokens(self, tokens, what: str) -> int:
        if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)):
            raise CacheValueError(f"{what} must be an int, got {type(tokens).__name__}")
        if not 0 <= tokens <= self.max_seq:
            raise CacheValueError(f"{what}={tokens} is outside [0, max_seq={self.max_seq}]")
        return int(tokens)

    def allocate(self, min_tokens: int = 0) -> int:
        """Take a free slot (best fit among deferred ones) and back ``min_tokens`` tokens."""
        self._check_open()
        return int(self._native.allocate(self._check_tokens(min_tokens, "min_tokens")))

    def grow(self, slot: int, tokens: int) -> None:
        """Back tokens ``[0, tokens)`` of ``slot`` in every layer's K and V."""
        self._check_open()
        self._native.grow(self._check_slot(slot), self._check_tokens(tokens, "tokens"))

    def free(self, slot: int) -> None:
        """Release a slot. With deferred reclamation its pages stay mapped for reuse."""
        self._check_open()
        self._native.free(self._check_slot(slot))

    def trim(self, max_pages: int | None = None, *, release_physical: bool = False) -> int:
        """Unmap pages held by free slots (all, or about ``max_pages``); returns pages unmapped.

        With ``release_physical`` the unmapped pages are also destroyed, returning
        memory to the device. On CUDA the device is synchronized first; on the
        host, call it only after computations that read freed slots have finished.
        """
        self._check_open()
        if max_pages is not None:
            max_pages = check_int("max_pages", max_pages, low=0, high=2**62, hint="or None", error=CacheValueError)
        if not isinstance(release_physical, bool):
            raise CacheValueError(f"release_physical must be a bool, got {release_physical!r}")
        return int(self._native.trim(-1 if max_pages is None else max_pages, release_physical))

    # -- prefix sharing (page aliasing) ---------------------------------------
    def _check_handles(self, handles, what: str) -> list[int]:
        if isinstance(handles, (str, bytes)) or not isinstance(handles, (tuple, list, np.ndarray)):
            raise CacheValueError(f"{what}: handles must be a tuple or list of page handles (as pin_pages returns "
                                  f"them), got {type(handles).__name__}")
        out = []
        for i, h in enumerate(np.asarray(handles).tolist() if isinstance(handles, np.ndarray) else handles):
            out.append(check_int(f"{what}: handles[{i}]", h, low=0, high=2**64 - 1, hint="(a page handle)",
                                 error=CacheValueError))
        return out

    def pin_pages(self, slot: int, n_pages: int) -> tuple[int, ...]:
        """Pin the physical pages at page indices ``[0, n_pages)`` of ``slot`` in every reserved tensor.

        Returns ``n_pages * config.num_tensors`` opaque handles, ``[page][tensor]``. Each pin keeps its page out of
        the free list (and counted in ``pages_in_use``) after the slot unmaps it, until ``unpin_pages``. The page
        index ``p`` holds tokens ``[p * tokens_per_page, (p + 1) * tokens_per_page)`` of the slot.
        Raises ``SlotStateError`` if the slot is not allocated, ``CacheValueError`` if it has fewer than
        ``n_pages`` pages mapped.
        """
        self._check_open()
        slot = self._check_slot(slot)
        n = check_int("n_pages", n_pages, low=0, high=2**62, error=CacheValueError)
        return tuple(int(h) for h in self._native.pin_pages(slot, n))

    def unpin_pages(self, handles) -> None:
        """Drop one pin of each handle (from ``pin_pages``); a page with no reference left returns to the free
        list. ``CacheValueError``, with nothing unpinned, if a handle is not pinned (or listed more often than it
        is pinned)."""
        self._check_open()
        self._native.unpin_pages(self._check_handles(handles, "unpin_pages"))

    def map_shared(self, slot: int, handles) -> None:
        """Map pinned pages into ``slot`` at the same page indices, read-only for it.

        ``handles`` are ``[page][tensor]`` (``n * config.num_tensors`` of them, as ``pin_pages`` returns them) and
        must be pinned or mapped now. The slot's own pages are unmapped first (given back as a free without
        deferred reclamation would), then handle ``[p][t]`` backs page ``p`` of tensor ``t``: the slot holds the
        source's tokens ``[0, n * tokens_per_page)`` without a copy, its capacity is that many tokens, and a
        write starting before the end of that range is refused (``CacheValueError`` on the host; the GPU write
        guard refuses the row). ``grow`` maps owned pages after them. All or nothing on a backend failure.
        """
        self._check_open()
        slot = self._check_slot(slot)
        self._native.map_shared(slot, self._check_handles(handles, "map_shared"))

    def shared_pages(self, slot: int) -> int:
        """Page indices of ``slot`` mapped by ``map_shared`` (read-only for it); 0 once the slot is freed."""
        self._check_open()
        return int(self._native.shared_pages(self._check_slot(slot)))

    def capacity(self, slot: int) -> int:
        """Tokens currently backed in ``slot``."""
        self._check_open()
        return int(self._native.capacity(self._check_slot(slot)))

    def allocated(self, slot: int) -> bool:
        self._check_open()
        return bool(self._native.allocated(self._check_slot(slot)))

    def stats(self) -> CacheStats:
        s: dict[str, Any] = dict(self._native.stats())
        s["slot_capacity"] = tuple(s["slot_capacity"])
        s["slot_allocated"] = tuple(s["slot_allocated"])
        s["slot_shared_pages"] = tuple(s["slot_shared_pages"])
        return CacheStats(**s)

    def step_cache(self, slots, starts, counts):
        """``KVCache.for_step`` over this manager: the engine's per-step cache."""
        from .cache.vattention import KVCache

        return KVCache.for_step(self, slots, starts, counts)

    def check_device_errors(self) -> None:
        """Raise the first write refused on the GPU since the last check (no-op on the host)."""
        self._check_open()
        if self.backend != "cuda":
            return
        flag, row, slot, end = self._native.take_device_error()
        if flag:
            raise CacheValueError(
                f"an earlier write was refused on the device: row {row} slot {slot} would end at token {end}, "
                "past the slot's backed capacity, or starts inside its read-only shared range (or the slot is not "
                "allocated)"
            )

    def device_mem_info(self) -> tuple[int, int]:
        """(free, total) device bytes as the CUDA driver reports them."""
        self._check_open()
        if self.backend != "cuda":
            raise CacheValueError("device_mem_info needs the cuda backend")
        free, total = self._native.device_mem_info()
        return int(free), int(total)

    def _inject_failures(self, creates: int = 0, maps: int = 0) -> None:
        """Test-only: make the next ``creates`` page creations / ``maps`` mappings fail."""
        self._check_open()
        self._native.inject_failures(int(creates), int(maps))

    @property
    def unbacked_reads(self) -> str:
        """What reading the views' unbacked memory gives: ``"zeros"`` or ``"fault"`` (``CacheConfig.unbacked_reads``
        resolved for this backend)."""
        return str(self._native.unbacked_reads)

    # -- lifetime ------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once ``close()`` was called (the memory may still await its last external view)."""
        return getattr(self, "_closing", False) or self._native.closed

    # Seconds close() waits for computations already dispatched on the views before it defers the release.
    _close_wait_s = 1.0

    def close(self) -> None:
        """Close the cache: refuse every later call, delete the views, and release the memory.

        Never blocks for long and never unmaps memory something can still read.
        Computations already dispatched on the views finish first (close waits up to
        ``_close_wait_s`` for them). A view kept alive elsewhere (a zero-copy numpy
        array of it, a jit constant) defers the release: ``close()`` returns at once,
        the manager refuses every call (``CacheClosedError``), and the pages and
        reservations are released when that last view is garbage-collected.
        ``pending_release`` says whether that is the case.
        """
        if self.closed:
            return
        self._closing = True
        for view in getattr(self, "_tensors", ()):
            if not view.is_deleted():
                view.delete()
        views = getattr(self, "_views", None)
        if views is None or views.wait(self._close_wait_s):
            self._native.close()
        else:
            native = self._native
            _PENDING_RELEASE.add(native)

            def release():
                _PENDING_RELEASE.discard(native)
                native.close()

            views.when_idle(release)  # the last external view's finalizer releases the memory

    @property
    def pending_release(self) -> bool:
        """Closed, with the memory still held for a view that is alive elsewhere."""
        return self.closed and not self._native.closed

    def __enter__(self) -> KVCacheManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        native = getattr(self, "_native", None)
        if native is not None and not self.closed:
            self.close()

    def __repr__(self) -> str:
        c = self.config
        state = "closed" if self.closed else f"{self.stats().mapped_bytes / 2**20:.0f} MiB mapped"
        rounded = f" (rounded from {c.max_seq})" if self.max_seq != c.max_seq else ""
        if c.interleaved:
            shape = f"[{c.max_batch}, {self.max_seq}{rounded}, {c.layers_per_group}, 2, {c.kv_heads}, {c.head_dim}]"
            layout = f"{c.num_layers} layers interleaved in {c.num_tensors} x {shape}"
        else:
            layout = f"{c.num_layers} layers x [{c.max_batch}, {self.max_seq}{rounded}, {c.kv_heads}, {c.head_dim}]"
        return f"KVCacheManager({self.backend}, {layout} {c.dtype}, {c.tokens_per_page} tokens/page, {state})"

    # -- jit-side cache ------------------------------------------------------
    def cache(self, slots, lengths):
        """A ``KVCache`` pytree over this manager's views for the given rows."""
        from .cache import KVCache

        self._check_open()  # the views of a closed manager are deleted
        return KVCache.create(self, slots, lengths)
