"""``EngineConfig``: every setting of the serving engine in one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses

from ..attention.dispatch import AttentionSpec
from ..validation import check_int

KV_CACHES = ("vattention", "paged", "static")
OVERLAP_MODES = ("thread", "inline", "off")
# The engine's default vAttention layout, chosen by benchmarks/bench_serving.py (README, "KV layout").
DEFAULT_LAYERS_PER_GROUP: int | str = "all"


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How ``LLM`` lays out memory, schedules and compiles (vLLM's ``EngineArgs``, as a frozen dataclass).

    Memory:
      kv_cache: ``"vattention"``, or the baselines ``"paged"`` (16-token block tables) and ``"static"``.
      max_batch, max_seq: rows of the cache and tokens per row (``max_seq`` is rounded up to whole pages).
      dtype: cache dtype (default: the model's parameter dtype).
      pool_bytes: physical KV budget (default: every slot at ``max_seq``).
      page_bytes: vAttention page size (default 2 MiB); page_size: tokens per block of the paged baseline.
      layers_per_group: vAttention layout (``CacheConfig.layers_per_group``): ``1`` per-layer tensors,
        ``"all"`` (the default) every layer interleaved in one reservation (16 tokens per 2 MiB page for
        Llama-3-8B), or any divisor of the model's layer count.
    Scheduling (Sarathi-Serve):
      token_budget: tokens per step; chunk_size: largest prefill chunk; max_prefill_rows: chunks per step;
      admission_headroom: tokens beyond its known ones the pool must hold to admit a request.
    vAttention's allocation switches (each measurable on its own):
      overlap_allocation: ``"thread"``, ``"inline"`` or ``"off"``; lookahead: eager tokens mapped ahead;
      deferred_reclaim, best_fit: finished requests keep their pages, new ones take the best fit;
      premap: every slot mapped beforehand (the control).
    Compilation: attn (kernels or jnp reference); packed_steps: every row's tokens flat in one token axis with one
      padding bucket for the total (``packing``; the default), else row groups (decodes, and prefill chunks padded
      to the longest); min_token_bucket (packed), min_decode_bucket, min_prefill_bucket (row groups): bucket floors.
    Overlap of host and device:
      async_scheduling: schedule and dispatch step t+1 while step t runs (vLLM's ``async_scheduling``); step t+1's
        decode inputs are step t's sampled tokens, taken on the device, and step t's results are applied one step
        late (``LLM`` documents it). Off by default: the engine then waits for each step's tokens before the next.
    Tensor parallelism:
      tensor_parallel: shard the model (``model.shard(mesh, "tp")``, Megatron-style) and the vAttention cache
        (``ShardedKVCacheManager``: one manager per device, KV heads split) over the first ``tensor_parallel``
        devices; one scheduler drives them all. The engine's KV figures are then per device.
    Prefix caching:
      enable_prefix_caching: a new request maps the longest cached run of full pages of its tokens into its slot
        (the same physical pages, read-only for it) and prefills the rest (``engine.prefix_cache``). vattention
        aliases the pages in virtual memory; paged points block-table entries at them (vLLM's block sharing).
        Off by default.
    """

    kv_cache: str = "vattention"
    max_batch: int = 8
    max_seq: int = 2048
    dtype: str | None = None
    pool_bytes: int | None = None
    page_bytes: int | None = None
    page_size: int = 16
    layers_per_group: int | str = DEFAULT_LAYERS_PER_GROUP
    token_budget: int = 256
    chunk_size: int = 128
    max_prefill_rows: int = 4
    admission_headroom: int = 16
    attn: AttentionSpec | None = None  # None: AttentionSpec() (kernels on a GPU, else the jnp reference)
    overlap_allocation: str = "thread"
    lookahead: int = 0
    deferred_reclaim: bool = True
    best_fit: bool = True
    premap: bool = False
    packed_steps: bool = True
    min_token_bucket: int = 8
    min_decode_bucket: int = 1
    min_prefill_bucket: int = 1
    async_scheduling: bool = False
    enable_prefix_caching: bool = False
    tensor_parallel: int = 1

    def __post_init__(self):
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"EngineConfig.kv_cache must be one of {KV_CACHES}, got {self.kv_cache!r}")
        if isinstance(self.overlap_allocation, bool):  # True/False as shorthands for "thread"/"off"
            object.__setattr__(self, "overlap_allocation", "thread" if self.overlap_allocation else "off")
        if self.overlap_allocation not in OVERLAP_MODES:
            raise ValueError(f"EngineConfig.overlap_allocation must be one of {OVERLAP_MODES}, "
                             f"got {self.overlap_allocation!r}")
        for name in ("max_batch", "max_seq", "page_size", "token_budget", "chunk_size", "max_prefill_rows",
                     "min_token_bucket", "min_decode_bucket", "min_prefill_bucket", "tensor_parallel"):
            object.__setattr__(self, name, check_int(f"EngineConfig.{name}", getattr(self, name), low=1))
        for name in ("admission_headroom", "lookahead"):
            object.__setattr__(self, name, check_int(f"EngineConfig.{name}", getattr(self, name), low=0))
        for name in ("pool_bytes", "page_bytes"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_int(f"EngineConfig.{name}", getattr(self, name), low=1))
        if self.layers_per_group != "all":
            object.__setattr__(self, "layers_per_group", check_int(
                "EngineConfig.layers_per_group", self.layers_per_group, low=1, hint="or 'all'"))
        for name in ("deferred_reclaim", "best_fit", "premap", "async_scheduling", "packed_steps",
                     "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EngineConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.attn is None:
            object.__setattr__(self, "attn", AttentionSpec())
        if not isinstance(self.attn, AttentionSpec):
            raise ValueError(f"EngineConfig.attn must be an AttentionSpec, got {type(self.attn).__name__}")
        if self.enable_prefix_caching and (self.kv_cache == "static" or self.premap):
            raise ValueError("enable_prefix_caching needs pages to share: kv_cache='vattention' without premap, or "
                             f"'paged' (got kv_cache={self.kv_cache!r}, premap={self.premap})")
        if self.tensor_parallel > 1 and (self.kv_cache != "vattention" or self.enable_prefix_caching):
            raise ValueError(f"tensor_parallel={self.tensor_parallel} needs kv_cache='vattention' without prefix "
                             f"caching for now (got kv_cache={self.kv_cache!r}, "
                             f"enable_prefix_caching={self.enable_prefix_caching})")
        if self.premap and self.kv_cache != "vattention":
            raise ValueError("premap applies to the vattention cache only")
