"""Requests, sampling parameters and per-request metrics of the serving engine."""

from __future__ import annotations

import dataclasses
import enum
import time


def _is_int32(x) -> bool:
    """An int (not a bool) that fits the device step's int32 arrays."""
    return isinstance(x, int) and not isinstance(x, bool) and -2**31 <= x < 2**31


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request (vLLM-style).

    ``temperature == 0`` is greedy; ``top_k <= 0`` and ``top_p >= 1`` disable those filters.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"SamplingParams.max_tokens must be a positive int, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int32(self.top_k):
            raise ValueError(f"SamplingParams.top_k must be an int32 (<= 0 disables it), got {self.top_k!r}")
        if not _is_int32(self.seed):
            raise ValueError(f"SamplingParams.seed must be an int in [-2**31, 2**31), got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds a slot
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and its progress.

    ``tokens`` (prompt + output) is everything known; ``num_cached`` of them have
    K/V in the cache. ``tokens[num_cached:]`` still has to be run: more than one
    token means a prefill (chunked), exactly one means a decode.
    """

    request_id: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    slot: int | None = None
    num_cached: int = 0
    finish_reason: str | None = None  # "length", "stop", "cancelled" or "error"
    num_preemptions: int = 0
    num_faults: int = 0  # consecutive backend faults while mapping its pages
    error: str | None = None  # the last backend fault
    arrival_time: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_slice(self, start: int, n: int) -> list[int]:
        """``tokens[start:start + n]`` without building the whole list (called for every row, every step)."""
        p = len(self.prompt)
        if start >= p:
            return self.output[start - p:start - p + n]
        return self.prompt[start:start + n] + self.output[:max(0, start + n - p)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def remaining(self) -> int:
        """Tokens whose K/V still have to be computed before the next sample."""
        return self.num_tokens - self.num_cached

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token: int, now: float) -> None:
        self.output.append(int(token))
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
        if token in self.params.stop_token_ids:
            self.finish("stop", now)
        elif len(self.output) >= self.params.max_tokens:
            self.finish("length", now)

    def finish(self, reason: str, now: float) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.finish_time = now

    # -- metrics -----------------------------------------------------------
    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def inter_token_times(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]
