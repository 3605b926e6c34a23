"""Serving engine: ``LLM`` orchestrates a ``Scheduler`` (Sarathi-Serve), a ``ModelRunner`` and ``MapAhead``.

* ``config``: ``EngineConfig``; ``protocol``: ``CausalLM``, what a model must offer.
* ``request``: ``Request``; ``stats``: ``RequestOutput``, ``EngineStats``.
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
from .model_runner import ModelRunner
from .protocol import CausalLM, CausalLMConfig
from .request import Request, Status
from .scheduler import Chunk, Scheduler, SchedulerConfig, SchedulerOutput
from .stats import EngineStats, RequestOutput

__all__ = ["LLM", "AsyncLLM", "StreamDelta", "CausalLM", "CausalLMConfig", "Chunk", "EngineConfig", "EngineStats",
           "ModelRunner", "PagedKVPool", "Request", "RequestOutput", "SamplingParams", "Scheduler", "SchedulerConfig",
           "SchedulerOutput", "StaticPool", "Status", "VAttentionPool"]
