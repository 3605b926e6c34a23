"""Overlapped and eager allocation: map the pages a step's rows need next while the step runs."""

from __future__ import annotations

import concurrent.futures
import time

from ..cache import KVPool
from .scheduler import Chunk


class MapAhead:
    """vAttention's overlap of page mapping with compute.

    ``mode``: ``"thread"`` maps on a background thread while the dispatched step
    runs on the device; ``"inline"`` maps on the calling thread after dispatch
    (jax dispatch is asynchronous, so this also overlaps); ``"off"`` leaves all
    mapping to the scheduler, between steps. ``lookahead`` maps that many
    tokens beyond the next step (eager allocation), while the pool has spare
    pages for every row's lookahead: under pressure the lookahead would hold
    pages that admission needs, so only the next step's tokens are mapped.
    """

    def __init__(self, pool: KVPool, mode: str, lookahead: int, chunk_size: int):
        self.pool, self.mode, self.lookahead, self.chunk_size = pool, mode, lookahead, chunk_size
        self.seconds = 0.0  # time spent mapping ahead
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None  # started on first use

    def start(self, chunks: list[tuple[int, Chunk]]) -> concurrent.futures.Future | None:
        """Begin mapping for ``chunks``; returns the future to ``finish``, if a thread runs it."""
        if self.mode == "thread":
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vattn-map-ahead")
            return self._executor.submit(self._map, chunks)
        if self.mode == "inline":
            self._map(chunks)
        return None

    def map_now(self, chunks: list[tuple[int, Chunk]]) -> None:
        """Map for ``chunks`` on the calling thread, whatever the mode (async scheduling: the host schedules the
        next step while this one runs, so the mapping overlaps the device without a thread racing the
        scheduler for the pool)."""
        if self.mode != "off":
            self._map(chunks)

    @staticmethod
    def finish(future: concurrent.futures.Future | None, *, raise_errors: bool = True) -> None:
        """Wait for the mapping (the pool is the scheduler's again afterwards)."""
        if future is None:
            return
        if raise_errors:
            future.result()
        else:
            concurrent.futures.wait([future])

    def _map(self, chunks: list[tuple[int, Chunk]]) -> None:
        """Map what each row's next step will write.

        A full pool or a backend fault stops the mapping: the scheduler's own
        grow for the next step meets it again and handles it (preempts, or
        counts the fault). A finished row's pages are reused (deferred
        reclamation) or unmapped by ``free``.
        """
        t0 = time.perf_counter()
        lookahead = self.lookahead_now(len(chunks))
        for _, c in chunks:
            r = c.request
            done = c.start + c.num_tokens
            if c.samples:
                if r.num_generated + 1 >= r.params.max_tokens:
                    continue  # finishes with this step's sample
                target = min(done + 1 + lookahead, len(r.prompt) + r.params.max_tokens - 1)
            else:  # the next prefill chunk
                target = min(r.num_tokens, done + self.chunk_size + lookahead)
            assert r.slot is not None
            if not self.pool.grow(r.slot, min(target, self.pool.max_seq)).ok:
                break
        self.seconds += time.perf_counter() - t0

    def lookahead_now(self, rows: int) -> int:
        """The lookahead for a step of ``rows``: ``lookahead`` if the pool's spare pages cover it for every row,
        else 0."""
        if self.lookahead <= 0:
            return 0
        spare = self.pool.pages_total() - self.pool.pages_live()
        return self.lookahead if spare >= rows * self.pool.pages_needed(self.lookahead) else 0

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
