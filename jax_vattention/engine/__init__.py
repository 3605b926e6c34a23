"""Serving engine: ``LLM`` orchestrates a ``Scheduler`` (Sarathi-Serve), a ``ModelRunner`` and ``MapAhead``.

* ``config``: ``EngineConfig``; ``protocol``: ``CausalLM``, what a model must offer.
* ``request``: ``Request``; ``outputs``: ``RequestOutput`` / ``CompletionOutput`` / ``RequestMetrics`` (vLLM's
  shape) and ``child_params`` (``SamplingParams.n``); ``stats``: ``EngineStats``.
* ``loaders``: ``LLM("tiny")`` / ``LLM("/path/to/hf-dir")`` through model sources (entry points
  ``jax_vattention.models``).
* ``scheduler``: continuous batching over any ``KVPool`` (typed results, no exceptions).
* ``model_runner``: step layout, bucketing, jit, warmup; ``map_ahead``: overlapped allocation.
* ``workloads``: seeded ShareGPT-like and long-context request mixes.
* ``async_llm``: ``AsyncLLM``, one engine loop streaming requests to asyncio callers.
"""

from ..cache import PagedKVPool, StaticPool, VAttentionPool
from ..sampling import SamplingParams
from .async_llm import AsyncLLM, StreamDelta
from .config import EngineConfig
from .llm import LLM
from .loaders import LoadedModel, ModelSource, ModelSourceError, load_model_source, register_model_source
from .model_runner import ModelRunner
from .outputs import CompletionOutput, RequestMetrics, RequestOutput, child_params
from .protocol import CausalLM, CausalLMConfig
from .request import Request, Status
from .scheduler import Chunk, Scheduler, SchedulerConfig, SchedulerOutput
from .stats import EngineStats

__all__ = ["LLM", "AsyncLLM", "StreamDelta", "CausalLM", "CausalLMConfig", "Chunk", "CompletionOutput", "EngineConfig",
           "EngineStats", "LoadedModel", "ModelRunner", "ModelSource", "ModelSourceError", "PagedKVPool", "Request",
           "RequestMetrics", "RequestOutput", "SamplingParams", "Scheduler", "SchedulerConfig", "SchedulerOutput",
           "StaticPool", "Status", "VAttentionPool", "child_params", "load_model_source", "register_model_source"]
