"""Requests and per-request metrics of the serving engine (``SamplingParams`` lives in ``jax_vattention.sampling``)."""

from __future__ import annotations

import dataclasses
import enum
import functools
import time

import numpy as np

from ..sampling import SamplingParams, TokenLogprobs
from ..text import Detokenizer


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds a slot
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and its progress.

    ``tokens`` (prompt + output) is everything known; ``num_cached`` of them have
    K/V in the cache. ``tokens[num_cached:]`` still has to be run: more than one
    token means a prefill (chunked), exactly one means a decode. With async
    scheduling, ``num_pending`` more tokens were sampled by steps still in flight:
    they count in ``num_tokens`` (a decode's input may be one of them, taken on
    the device), not in ``tokens``/``output`` until their step is reconciled.
    """

    request_id: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: tuple[int, ...] | None = None  # default: params.stop_ids() (the engine adds the model's EOS)
    output: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    slot: int | None = None
    num_cached: int = 0
    num_pending: int = 0  # tokens sampled by dispatched steps, not yet on the host (async scheduling only)
    finish_reason: str | None = None  # "length", "stop", "cancelled" or "error"
    num_preemptions: int = 0
    num_faults: int = 0  # consecutive backend faults while mapping its pages
    error: str | None = None  # the last backend fault
    arrival_time: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish_time: float | None = None
    detokenizer: Detokenizer | None = None  # the output's text and stop strings (engines with a tokenizer)
    logprobs: list[TokenLogprobs] | None = None  # one entry per output token when params.logprobs is set
    _history: np.ndarray = dataclasses.field(init=False, repr=False, default_factory=lambda: np.zeros(0, np.int32))
    _history_len: int = dataclasses.field(init=False, repr=False, default=0)  # output tokens copied to _history

    def __post_init__(self):
        self.params = self.params.seeded()  # seed=None: an independent random seed, fixed for the request's life
        if self.stop_ids is None:
            self.stop_ids = self.params.stop_ids()
        if self.logprobs is None and self.params.logprobs is not None:
            self.logprobs = []

    @property
    def text(self) -> str | None:
        """The output's text (without a stop string that ended it), or None without a tokenizer."""
        return None if self.detokenizer is None else self.detokenizer.text

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_slice(self, start: int, n: int) -> list[int]:
        """``tokens[start:start + n]`` without building the whole list (called for every row, every step)."""
        p = len(self.prompt)
        if start >= p:
            return self.output[start - p:start - p + n]
        return self.prompt[start:start + n] + self.output[:max(0, start + n - p)]

    @functools.cached_property
    def distinct_prompt_ids(self) -> np.ndarray:
        """The prompt's distinct ids ``[U] int32`` (the repetition penalty's prompt history), computed once."""
        return np.unique(np.asarray(self.prompt, np.int32))

    def output_array(self) -> np.ndarray:
        """``output`` as ``[n] int32`` (the penalties' history): a view of a buffer that is only appended to,
        so a step copies just the tokens generated since the last call, not the whole output."""
        n, have = len(self.output), min(self._history_len, len(self.output))
        if n > len(self._history):
            grown = np.zeros(max(16, 2 * n), np.int32)
            grown[:have] = self._history[:have]
            self._history = grown
        self._history[have:n] = self.output[have:n]
        self._history_len = n
        return self._history[:n]

    @property
    def num_tokens(self) -> int:
        """Known tokens plus the pending ones (``num_pending`` is 0 without async scheduling)."""
        return len(self.prompt) + len(self.output) + self.num_pending

    @property
    def num_generated(self) -> int:
        """Output tokens sampled so far, pending ones included (the sampling key's count)."""
        return len(self.output) + self.num_pending

    @property
    def remaining(self) -> int:
        """Tokens whose K/V still have to be computed before the next sample."""
        return self.num_tokens - self.num_cached

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token: int, now: float, logprobs: TokenLogprobs | None = None) -> None:
        """Record a sampled token (and its logprobs, when the request asked for them); finish on a stop."""
        self.output.append(int(token))
        if self.logprobs is not None:
            self.logprobs.append({} if logprobs is None else logprobs)
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
        assert self.stop_ids is not None  # set by __post_init__
        if self.detokenizer is not None:
            self._add_text(token)
            if self.detokenizer.stopped_by is not None:  # a stop string: its text is cut, the request ends
                self.finish("stop", now)
                return
        if token in self.stop_ids:
            self.finish("stop", now)
        elif len(self.output) >= self.params.max_tokens:
            self.finish("length", now)

    def _add_text(self, token: int) -> None:
        """Detokenize ``token``; up to ``min_tokens`` output tokens stop strings are not looked for (vLLM v1: a
        stop string counts once the output is longer than ``min_tokens``, as the earliest stop token would)."""
        d = self.detokenizer
        assert d is not None
        if not d.stop or len(self.output) > self.params.min_tokens:
            d.add(token)
            return
        stop, d.stop = d.stop, ()
        try:
            d.add(token)
        finally:
            d.stop = stop

    def finish(self, reason: str, now: float) -> None:
        if self.detokenizer is not None:
            self.detokenizer.finish()  # the tail a full decode would give
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
