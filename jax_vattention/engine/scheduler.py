"""Continuous batching with Sarathi-Serve stall-free schedules on the vAttention cache.

Every iteration has a token budget. Running decodes go first and are never
paused (only preemption under memory pressure removes one); the rest of the
budget goes to prefill chunks, first of requests already running, then of
newly admitted ones. A request is admitted only when the page pool can hold its
tokens plus headroom. Pages are mapped here, on the host, before the step is
dispatched (the in-graph grow then finds them mapped), so a step never fails
for memory; when the pool runs out, the most recently admitted request is
preempted: its slot is freed and it is recomputed later from its tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time

from ..errors import PoolExhaustedError
from .request import Request, Status


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int  # requests holding a slot at once (<= the cache's max_batch)
    token_budget: int = 512  # tokens per iteration: decodes + prefill chunks
    chunk_size: int = 512  # largest prefill chunk of one request in one iteration
    admission_headroom: int = 16  # tokens beyond a request's known tokens the pool must hold to admit it
    best_fit: bool = True  # reuse the free slot whose deferred pages best fit the request

    def __post_init__(self):
        for name in ("max_batch", "token_budget", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SchedulerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.admission_headroom < 0:
            raise ValueError("SchedulerConfig.admission_headroom must be >= 0")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """``num_tokens`` tokens of ``request`` starting at position ``start``."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether the chunk reaches the end of the known tokens, so a token is sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclasses.dataclass
class SchedulerOutput:
    decodes: list[Chunk]
    prefills: list[Chunk]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.decodes + self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, manager, config: SchedulerConfig):
        if config.max_batch > manager.config.max_batch:
            raise ValueError(
                f"SchedulerConfig.max_batch={config.max_batch} exceeds the cache's max_batch={manager.config.max_batch}"
            )
        self.manager = manager
        self.config = config
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # admission order
        self.num_preemptions = 0
        self._page_tensors = 2 * manager.config.num_layers

    # -- queue -------------------------------------------------------------
    def add(self, request: Request) -> None:
        need = len(request.prompt) + request.params.max_tokens
        if not request.prompt:
            raise ValueError(f"request {request.request_id}: the prompt is empty")
        if need > self.manager.max_seq:
            raise ValueError(
                f"request {request.request_id}: prompt ({len(request.prompt)}) + max_tokens "
                f"({request.params.max_tokens}) exceeds the cache's max_seq={self.manager.max_seq}"
            )
        if self._pages(need) > self.manager.stats().pages_budget:
            raise PoolExhaustedError(
                f"request {request.request_id}: {need} tokens need {self._pages(need)} pages, more than the "
                f"whole pool ({self.manager.stats().pages_budget} pages); it could never run"
            )
        request.status = Status.WAITING
        self.waiting.append(request)

    def cancel(self, request_id: int) -> bool:
        """Finish a request now, freeing its slot. Returns whether it was found unfinished."""
        for r in list(self.waiting) + self.running:
            if r.request_id == request_id:
                if r in self.waiting:
                    self.waiting.remove(r)
                else:
                    self._release(r)
                r.finish("cancelled", time.perf_counter())
                return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one iteration -----------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput([], [], [])
        budget = self.config.token_budget
        # 1. Every running decode, never paused. Map its next token's page now.
        for r in list(self.running):
            if r.status is not Status.RUNNING or r.remaining != 1:
                continue
            if self._reserve(r, r.num_cached + 1, out):
                out.decodes.append(Chunk(r, r.num_cached, 1))
        out.decodes = [c for c in out.decodes if c.request.status is Status.RUNNING]
        budget -= len(out.decodes)
        # 2. Chunks of prefills already running.
        for r in list(self.running):
            if budget <= 0:
                break
            if r.status is not Status.RUNNING or r.remaining <= 1:
                continue
            n = min(r.remaining, self.config.chunk_size, budget)
            if self._grow(r, r.num_cached + n):
                out.prefills.append(Chunk(r, r.num_cached, n))
                budget -= n
        # 3. Admit waiting requests, first come first served.
        while budget > 0 and self.waiting and len(self.running) < self.config.max_batch:
            r = self.waiting[0]
            if not self._pool_can_hold(r.num_tokens + self.config.admission_headroom):
                break
            n = min(r.remaining, self.config.chunk_size, budget)
            try:
                slot = self.manager.allocate(n if self.config.best_fit else 0)
                if not self.config.best_fit:
                    self.manager.grow(slot, n)
            except PoolExhaustedError:
                break
            self.waiting.popleft()
            r.slot, r.status = slot, Status.RUNNING
            self.running.append(r)
            out.prefills.append(Chunk(r, r.num_cached, n))
            budget -= n
        return out

    def update(self, out: SchedulerOutput, sampled: dict[int, int], now: float | None = None) -> list[Request]:
        """Record a finished step: advance caches, append sampled tokens. Returns requests that finished."""
        now = time.perf_counter() if now is None else now
        finished = []
        for chunk in out.decodes + out.prefills:
            r = chunk.request
            if r.status is not Status.RUNNING:  # cancelled while the step ran
                continue
            r.num_cached = chunk.start + chunk.num_tokens
            if chunk.samples:
                r.append_token(sampled[r.request_id], now)
                if r.finished:
                    self._release(r)
                    finished.append(r)
        return finished

    # -- memory ------------------------------------------------------------
    def _pages(self, tokens: int) -> int:
        cfg = self.manager.config
        return math.ceil(tokens * cfg.token_bytes / cfg.page_bytes) * self._page_tensors

    def _pool_can_hold(self, tokens: int) -> bool:
        s = self.manager.stats()
        live = s.pages_mapped - s.pages_mapped_free_slots
        return self._pages(min(tokens, self.manager.max_seq)) <= s.pages_budget - live

    def _grow(self, r: Request, tokens: int) -> bool:
        try:
            self.manager.grow(r.slot, tokens)
            return True
        except PoolExhaustedError:
            return False

    def _reserve(self, r: Request, tokens: int, out: SchedulerOutput) -> bool:
        """Map pages for a decode, preempting the newest requests until they fit."""
        while not self._grow(r, tokens):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is r:
                return False
        return True

    def _preempt(self, r: Request, out: SchedulerOutput) -> None:
        self._release(r)
        r.status, r.num_cached = Status.WAITING, 0  # recompute from its tokens later
        r.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(r)
        out.preempted.append(r)

    def _release(self, r: Request) -> None:
        if r.slot is not None:
            self.manager.free(r.slot)
        r.slot = None
        if r in self.running:
            self.running.remove(r)
