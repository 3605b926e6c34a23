"""Serving engine pieces: requests, sampling parameters and the continuous-batching scheduler."""

from .request import Request, SamplingParams, Status
from .scheduler import Chunk, Scheduler, SchedulerConfig, SchedulerOutput

__all__ = ["Chunk", "Request", "SamplingParams", "Scheduler", "SchedulerConfig", "SchedulerOutput", "Status"]
