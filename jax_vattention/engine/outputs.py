"""What ``LLM.generate`` returns, in vLLM's shape: ``RequestOutput`` with ``CompletionOutput``s and ``RequestMetrics``.

    outputs = llm.generate(["Hello", [5, 6, 7]], SamplingParams(n=2, seed=0, temperature=0.8))
    for o in outputs:
        print(o.request_id, o.prompt, o.prompt_token_ids)
        for c in o.outputs:                       # n of them, index 0..n-1
            print(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason)

A prompt with ``SamplingParams(n=k)`` runs as ``k`` engine requests (``child_params``: with a seed, child ``i`` uses
``seed + i``, as vLLM v1; without one each child draws its own seed), gathered into one ``RequestOutput``. Its
``request_id`` is the engine id (an int, what ``LLM.abort_request`` takes) of its first child; the other children
have the ids that follow it when ``LLM.generate`` queued them (``generate`` holds the engine lock throughout).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..sampling import SamplingParams, TokenLogprobs
from .request import Request

INT32_MIN, INT32_SPAN = -2**31, 2**32


def child_params(params: SamplingParams) -> list[SamplingParams]:
    """The ``params.n`` single-sequence params of one prompt (vLLM v1's parallel sampling).

    With a seed, child ``i`` uses ``seed + i`` (wrapped into the int32 range the sampler keys on); without one,
    every child gets its own random seed when its request is created. Children have ``n == 1``. The offline
    ``LLM.generate`` and the server both expand ``n`` here, so they sample the same tokens for the same seed.
    """
    n = getattr(params, "n", 1)
    if n == 1:
        return [params]
    if params.seed is None:
        return [dataclasses.replace(params, n=1) for _ in range(n)]
    return [dataclasses.replace(params, n=1, seed=(params.seed + i - INT32_MIN) % INT32_SPAN + INT32_MIN)
            for i in range(n)]


@dataclasses.dataclass(frozen=True)
class CompletionOutput:
    """One generated sequence of a request (vLLM's ``CompletionOutput``).

    ``text`` is None when the engine has no tokenizer (a stop string that ended it is left out). ``finish_reason``
    is ``"length"``, ``"stop"``, ``"cancelled"`` or ``"error"`` (None while unfinished); ``stop_reason`` is what
    stopped it (vLLM's semantics): the stop string, or the id from ``SamplingParams.stop_token_ids``; None for the
    model's EOS, the length limit, and anything else. ``logprobs`` has one ``{token id: Logprob}`` per output token
    when ``SamplingParams.logprobs`` asked for them (else None); ``cumulative_logprob`` sums the sampled tokens'.
    """

    index: int
    text: str | None
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def of(cls, r: Request, index: int = 0) -> CompletionOutput:
        logprobs = None if r.logprobs is None else list(r.logprobs)
        cumulative = None
        if logprobs is not None:
            sampled = [lp.get(t) for t, lp in zip(r.output, logprobs)]
            if all(s is not None for s in sampled):
                cumulative = float(sum(s.logprob for s in sampled if s is not None))
        return cls(index, r.text, list(r.output), cumulative, logprobs, r.finish_reason, stop_reason(r))


def stop_reason(r: Request) -> int | str | None:
    """The stop string or ``stop_token_ids`` entry that ended ``r`` (vLLM's ``stop_reason``), else None."""
    if r.finish_reason != "stop":
        return None
    if r.detokenizer is not None and r.detokenizer.stopped_by is not None:
        return r.detokenizer.stopped_by
    if r.output and r.output[-1] in r.params.stop_token_ids:
        return r.output[-1]
    return None  # the model's EOS


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    """Timings of a request (``time.perf_counter()`` seconds), over all its sequences when ``n > 1``.

    ``arrival_time``: the earliest child's; ``first_token_time``: the first token of any sequence (None before
    one); ``ttft_s`` their difference; ``inter_token_s``: every sequence's gaps between consecutive tokens;
    ``finished_time``: when the last sequence ended (None while one runs); ``latency_s`` = finished - arrival;
    ``num_preemptions``: summed over the sequences.
    """

    arrival_time: float
    first_token_time: float | None
    ttft_s: float | None
    inter_token_s: list[float]
    latency_s: float | None
    num_preemptions: int
    finished_time: float | None = None

    @classmethod
    def of(cls, requests: Sequence[Request]) -> RequestMetrics:
        arrival = min(r.arrival_time for r in requests)
        firsts = [r.first_token_time for r in requests if r.first_token_time is not None]
        first = min(firsts) if firsts else None
        ends = [r.finish_time for r in requests]
        finished = None if any(t is None for t in ends) else max(t for t in ends if t is not None)
        return cls(arrival, first, None if first is None else first - arrival,
                   [gap for r in requests for gap in r.inter_token_times],
                   None if finished is None else finished - arrival,
                   sum(r.num_preemptions for r in requests), finished)


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """One prompt's result (vLLM's ``RequestOutput``): its ``n`` sequences in ``outputs`` (index 0..n-1).

    ``prompt`` is the prompt's text when it was given as text (None for token ids); ``prompt_token_ids`` what
    the model ran. ``finished``: every sequence ended. ``error``: why a sequence ended with ``"error"`` (the
    first such), else None.
    """

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None

    @classmethod
    def of(cls, requests: Request | Sequence[Request], prompt: str | None = None) -> RequestOutput:
        """Gather one prompt's engine requests (one per sequence, in index order) into its output."""
        rs = [requests] if isinstance(requests, Request) else list(requests)
        if not rs:
            raise ValueError("RequestOutput.of needs at least one request")
        errors = [r.error for r in rs if r.finish_reason == "error"]
        return cls(rs[0].request_id, prompt, list(rs[0].prompt), [CompletionOutput.of(r, i) for i, r in enumerate(rs)],
                   all(r.finished for r in rs), RequestMetrics.of(rs), errors[0] if errors else None)
