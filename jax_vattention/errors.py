"""Exceptions raised by jax_vattention.

Errors raised eagerly (manager calls, wrapper checks at trace time) arrive as
these classes. Errors raised by an FFI handler while a compiled computation
runs arrive as ``jax.errors.JaxRuntimeError`` whose message names the class
below after XLA's status, e.g. ``"FAILED_PRECONDITION: PoolExhaustedError: grow: ..."``.
"""


class VAttentionError(RuntimeError):
    """Base class of every jax_vattention error."""


class CacheValueError(VAttentionError, ValueError):
    """An argument has the wrong shape, dtype, rank or range."""


class SlotStateError(VAttentionError):
    """A slot is not allocated, already free, or no slot is free."""


class PoolExhaustedError(VAttentionError, MemoryError):
    """The physical page budget cannot back the requested tokens."""


class CacheClosedError(VAttentionError):
    """The cache manager was used after close()."""


class BackendError(VAttentionError):
    """A memory API call (cuMem*, mmap) failed."""


ERROR_CLASSES: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (CacheValueError, SlotStateError, PoolExhaustedError, CacheClosedError, BackendError)
}
