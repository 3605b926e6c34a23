"""Serving engine: requests, sampling parameters, KV pools, the continuous-batching scheduler and ``LLM``."""

from .kv_pools import StaticPool, VAttentionPool
from .llm import LLM, EngineStats, RequestOutput
from .request import Request, SamplingParams, Status
from .scheduler import Chunk, Scheduler, SchedulerConfig, SchedulerOutput

__all__ = ["LLM", "Chunk", "EngineStats", "Request", "RequestOutput", "SamplingParams", "Scheduler",
           "SchedulerConfig", "SchedulerOutput", "StaticPool", "Status", "VAttentionPool"]
