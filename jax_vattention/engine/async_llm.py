"""``AsyncLLM``: one engine loop owns the device; callers on any thread or event loop stream their requests.

    llm = LLM(model, tokenizer=tok, max_batch=32)
    with AsyncLLM(llm) as engine:
        async for delta in engine.generate("Once upon a time", SamplingParams(max_tokens=64)):
            print(delta.text, end="")           # new text (and delta.token_ids) of this step

Requests arrive while the loop runs (continuous batching across callers). Closing a stream early
(``async with contextlib.aclosing(engine.generate(...)) as stream``, then ``break``) or cancelling its task
aborts the request: its slot is free for the next one at once. (A plain ``break`` leaves the closing to the
garbage collector and the event loop, so the abort comes later.) The loop thread steps the
engine only while there is work; a failing step ends every stream with the error and stops the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncGenerator
from typing import Any

from ..errors import CacheClosedError
from ..sampling import SamplingParams, TokenLogprobs
from .llm import LLM
from .outputs import RequestOutput
from .request import Request


@dataclasses.dataclass(frozen=True)
class StreamDelta:
    """What one engine step added to a request: new token ids (with their logprobs when the request asked for
    them), new final text, and the end of the stream."""

    request_id: int
    token_ids: list[int]
    text: str | None  # None without a tokenizer
    finished: bool = False
    finish_reason: str | None = None
    output: RequestOutput | None = None  # the whole request (one CompletionOutput), on the last delta
    logprobs: list[TokenLogprobs] | None = None  # one per token of ``token_ids`` (SamplingParams.logprobs set)


@dataclasses.dataclass(eq=False)
class _Stream:
    request: Request
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt_text: str | None = None  # the prompt, when it was given as text
    tokens_sent: int = 0
    text_sent: int = 0


class AsyncLLM:
    """Streams ``LLM`` requests to asyncio callers; one background thread runs ``LLM.step``."""

    def __init__(self, llm: LLM):
        if not isinstance(llm, LLM):
            raise TypeError(f"AsyncLLM wraps an LLM, got {type(llm).__name__}")
        self.llm = llm
        self._streams: dict[int, _Stream] = {}
        self._cv = threading.Condition()
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="vattn-engine-loop", daemon=True)
        self._thread.start()

    # -- callers (any thread, any event loop) -------------------------------------------
    async def generate(self, prompt: Any,
                       params: SamplingParams = SamplingParams()) -> AsyncGenerator[StreamDelta, None]:
        """Queue ``prompt`` (text or token ids) and yield its deltas until it finishes.

        One sequence per stream (``params.n == 1``): for ``n`` of them, stream each of
        ``outputs.child_params(params)`` (the server does), which sample what ``LLM.generate`` would.
        """
        with self._cv:
            if self._stopped:
                raise CacheClosedError("AsyncLLM: the engine loop has stopped" +
                                       (f" ({self.error!r})" if self.error else ""))
            request = self.llm.add_request(prompt, params)  # bad input raises here, before anything streams
            stream = _Stream(request, asyncio.get_running_loop(), asyncio.Queue(),
                             prompt if isinstance(prompt, str) else None)
            self._streams[request.request_id] = stream
            self._cv.notify()
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the caller left early or was cancelled: free the slot now
                self.abort(request.request_id)

    def abort(self, request_id: int) -> bool:
        """Finish a request now (``"cancelled"``); its stream ends. Returns whether it was unfinished."""
        with self._cv:
            stream = self._streams.pop(request_id, None)
            found = self.llm.abort_request(request_id) if not self._stopped else False
        if stream is not None:
            self._push(stream, self._delta(stream, final=True))
        return found

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    # -- the engine loop ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stopped or self.llm.scheduler.has_unfinished())
                if self._stopped:
                    return
            try:
                self.llm.step()
            except BaseException as e:  # the step's error ends every stream; the engine stops
                with self._cv:
                    self.error, self._stopped = e, True
                    streams, self._streams = list(self._streams.values()), {}
                for s in streams:
                    self._push(s, e)
                return
            with self._cv:
                streams = list(self._streams.values())
                for s in streams:
                    if s.request.finished:
                        self._streams.pop(s.request.request_id, None)
            for s in streams:
                delta = self._delta(s, final=s.request.finished)
                if delta.token_ids or delta.text or delta.finished:
                    self._push(s, delta)

    def _delta(self, s: _Stream, *, final: bool) -> StreamDelta:
        r = s.request
        start, s.tokens_sent = s.tokens_sent, len(r.output)
        tokens = r.output[start:s.tokens_sent]
        logprobs = None if r.logprobs is None else r.logprobs[start:s.tokens_sent]
        text = None
        if r.detokenizer is not None:
            final_text = r.detokenizer.streamable
            text, s.text_sent = final_text[s.text_sent:], len(final_text)
        return StreamDelta(r.request_id, list(tokens), text, final, r.finish_reason if final else None,
                           RequestOutput.of(r, s.prompt_text) if final else None, logprobs)

    @staticmethod
    def _push(s: _Stream, item) -> None:
        try:
            s.loop.call_soon_threadsafe(s.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            pass

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the loop (aborting what still runs); the ``LLM`` stays open (its owner closes it)."""
        with self._cv:
            if self._stopped and not self._thread.is_alive():
                return
            ids = list(self._streams)
        for request_id in ids:
            self.abort(request_id)
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self._thread.join()

    def __enter__(self) -> AsyncLLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
