"""Serving engine: requests, sampling parameters, the continuous-batching scheduler and ``LLM``."""

from .llm import LLM, RequestOutput
from .request import Request, SamplingParams, Status
from .scheduler import Chunk, Scheduler, SchedulerConfig, SchedulerOutput

__all__ = ["LLM", "Chunk", "Request", "RequestOutput", "SamplingParams", "Scheduler", "SchedulerConfig", "SchedulerOutput", "Status"]
