"""The FastAPI app: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (streaming as server-sent events
ending in ``data: [DONE]``), ``/health`` and ``/metrics`` (Prometheus text).

Every request becomes ``AsyncLLM.generate`` streams, one per ``outputs.child_params`` of its ``SamplingParams``
(``n`` of them, seeds ``seed + i``: the tokens ``LLM.generate`` gives offline); a client that goes away
mid-stream aborts its requests, which frees their slots. A stream's ``stream_options`` add token counts: OpenAI's
``include_usage`` (a last chunk with the usage) and vLLM's ``continuous_usage_stats`` (every chunk's usage so
far). Bad requests get OpenAI-style JSON errors with a 4xx status and the server keeps serving.

Logprobs come from the engine (``SamplingParams.logprobs``: log-softmax of the raw logits, as vLLM v1), in
OpenAI's two formats: ``/v1/completions``' legacy ``{tokens, token_logprobs, top_logprobs, text_offset}`` (the
sampled token plus the ``logprobs`` most likely, per token) and chat's ``{"content": [{token, logprob, bytes,
top_logprobs}]}`` (the ``top_logprobs`` most likely, by rank). Streamed chunks carry their own tokens'. A token's
text is its ``Logprob.decoded_token``; -inf is sent as -9999.0, as OpenAI and vLLM do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.async_llm import AsyncLLM
from ..engine.outputs import CompletionOutput, child_params
from ..inputs import PromptError, check_prompt
from ..sampling import Logprob, SamplingParams, TokenLogprobs
from ..text import encode
from .metrics import ServerMetrics
from .protocol import ChatRequest, CompletionRequest, OpenAIError, check_supported, new_id, now

MAX_N = 8  # completions per request
LOGPROB_FLOOR = -9999.0  # what -inf is sent as (JSON has no infinity; OpenAI's and vLLM's value)


def build_app(engine: AsyncLLM, model_name: str) -> FastAPI:
    """The OpenAI-compatible app serving ``engine`` (whose LLM needs a tokenizer) as model ``model_name``."""
    llm = engine.llm
    tokenizer = llm.tokenizer
    if tokenizer is None:
        raise ValueError("the server needs an LLM with a tokenizer (LLM(model, tokenizer=...))")
    app = FastAPI(title="jax_vattention", version="0.1.0")
    metrics = ServerMetrics(engine)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, e: OpenAIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg", e))
        return JSONResponse(OpenAIError(msg, param=where or None).body(), status_code=400)

    def check_model(name: str) -> None:
        if name != model_name:
            raise OpenAIError(f"the model {name!r} does not exist; this server serves {model_name!r}", status=404,
                              type="not_found_error", param="model")

    def sampling(body, prompt_tokens: int, logprobs: int | None,
                 renamed: dict[str, str] | None = None) -> list[SamplingParams]:
        if body.n > MAX_N:
            raise OpenAIError(f"n={body.n} is more than this server allows ({MAX_N})", param="n")
        room = llm.config.max_seq - prompt_tokens + 1
        if room < 1:
            raise OpenAIError(f"the prompt has {prompt_tokens} tokens, more than max_seq={llm.config.max_seq}",
                              param="prompt")
        max_tokens = body.max_tokens if body.max_tokens is not None else room
        if max_tokens > room:
            raise OpenAIError(f"max_tokens={max_tokens} plus the prompt's {prompt_tokens} tokens exceeds the "
                              f"context of {llm.config.max_seq} tokens", param="max_tokens")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        vocab = llm.model.config.vocab_size
        for t in body.stop_token_ids or ():
            if not 0 <= t < vocab:
                raise OpenAIError(f"stop_token_ids must be ids of the vocabulary (0..{vocab - 1}), got {t}",
                                  param="stop_token_ids")
        neutral = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_p": 0.0,
                   "min_tokens": 0}
        extra = {k: v for k in neutral if (v := getattr(body, k)) is not None}
        try:
            params = SamplingParams(n=body.n, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                    top_k=body.top_k, stop=stop, stop_token_ids=tuple(body.stop_token_ids or ()),
                                    ignore_eos=body.ignore_eos, seed=body.seed, logprobs=logprobs, **extra)
        except ValueError as e:  # a value out of range: the 400 names the request's field
            msg, param = str(e), None
            if m := re.match(r"SamplingParams\.(\w+)", msg):
                param = (renamed or {}).get(m.group(1), m.group(1))
                msg = param + msg[m.end():]
            raise OpenAIError(msg, param=param) from None
        return child_params(params)  # what LLM.generate runs for the same params

    def tokens_of(prompt, *, add_special_tokens: bool = True) -> list[int]:
        ids = encode(tokenizer, prompt, add_special_tokens=add_special_tokens) if isinstance(prompt, str) else prompt
        try:
            return check_prompt(ids, llm.model.config.vocab_size).tolist()
        except PromptError as e:
            raise OpenAIError(str(e), param="prompt") from None

    def token_text(token: int, lp: Logprob | None) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return tokenizer.decode([token], skip_special_tokens=False)

    def completion_logprobs(token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs] | None,
                            offset: int = 0) -> dict[str, Any]:
        """The legacy ``logprobs`` of ``token_ids``: per token its text, logprob, ``{text: logprob}`` of the sampled
        token and the top N (up to N + 1 entries, as OpenAI), and its offset: ``offset`` plus the lengths of the
        token texts before it (a stream passes on where its last chunk ended, so the chunks add up to the
        non-streamed logprobs)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, t in enumerate(token_ids):
            entry = logprobs[i] if logprobs is not None and i < len(logprobs) else {}
            lp = entry.get(t)
            text = token_text(t, lp)
            out["tokens"].append(text)
            out["token_logprobs"].append(None if lp is None else max(lp.logprob, LOGPROB_FLOOR))
            out["top_logprobs"].append({token_text(k, v): max(v.logprob, LOGPROB_FLOOR) for k, v in entry.items()}
                                       if entry else None)
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def chat_logprobs(token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs] | None,
                      top: int) -> dict[str, Any]:
        """Chat's ``logprobs``: per token its text, logprob, UTF-8 bytes and the ``top`` most likely tokens."""
        def item(t: int, lp: Logprob | None) -> dict[str, Any]:
            text = token_text(t, lp)
            return {"token": text, "logprob": LOGPROB_FLOOR if lp is None else max(lp.logprob, LOGPROB_FLOOR),
                    "bytes": list(text.encode("utf-8", errors="replace"))}

        content = []
        for i, t in enumerate(token_ids):
            entry = logprobs[i] if logprobs is not None and i < len(logprobs) else {}
            best = sorted(entry.items(), key=lambda kv: kv[1].rank)[:top]
            content.append({**item(t, entry.get(t)), "top_logprobs": [item(k, v) for k, v in best]})
        return {"content": content}

    async def run(ids: list[int], params: list[SamplingParams], chunk, body,
                  head: dict[str, Any]) -> AsyncIterator[str]:
        """Server-sent events of ``n`` merged streams, then ``[DONE]``; the client leaving aborts them all.

        ``body.stream_options``: ``continuous_usage_stats`` adds to every chunk the usage of its choice so far (vLLM),
        ``include_usage`` a last chunk (``head`` plus ``choices: []``) with the usage of them all (OpenAI).
        """
        options = body.stream_options
        continuous = options is not None and options.continuous_usage_stats
        counts = [0] * len(params)  # tokens streamed per choice
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, sp: SamplingParams):
            async with contextlib.aclosing(engine.generate(ids, sp)) as stream:
                async for delta in stream:
                    await queue.put((i, delta))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, sp)) for i, sp in enumerate(params)]
        try:
            done = 0
            while done < len(tasks):
                i, delta = await queue.get()
                if delta is None:
                    done += 1
                    continue
                metrics.observe(delta)
                counts[i] += len(delta.token_ids)
                event = chunk(i, delta)
                if continuous:
                    event["usage"] = usage_of(len(ids), counts[i])
                yield f"data: {json.dumps(event)}\n\n"
            if options is not None and options.include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage_of(len(ids), sum(counts))})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(ids: list[int], params: list[SamplingParams]) -> list[CompletionOutput]:
        async def one(sp) -> CompletionOutput:
            last = None
            async with contextlib.aclosing(engine.generate(ids, sp)) as stream:
                async for delta in stream:
                    metrics.observe(delta)
                    last = delta
            assert last is not None and last.output is not None  # a stream always ends with its output
            return last.output.outputs[0]

        return await asyncio.gather(*(one(sp) for sp in params))

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": repr(engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": now(),
                                            "owned_by": "jax_vattention", "max_model_len": llm.config.max_seq}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        check_supported(body)
        ids = tokens_of(body.prompt)
        params = sampling(body, len(ids), body.logprobs)
        rid, created = new_id("cmpl"), now()
        want = body.logprobs is not None
        if body.stream:
            offsets = [0] * len(params)  # per choice: where the next chunk's text_offset starts

            def chunk(i, d):
                lps = None
                if want:
                    lps = completion_logprobs(d.token_ids, d.logprobs, offsets[i])
                    offsets[i] += sum(len(t) for t in lps["tokens"])
                return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                        "choices": [{"index": i, "text": d.text or "", "logprobs": lps,
                                     "finish_reason": d.finish_reason}]}
            head = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
            return StreamingResponse(run(ids, params, chunk, body, head), media_type="text/event-stream")
        outs = await collect(ids, params)
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": i, "text": o.text, "finish_reason": o.finish_reason,
                             "logprobs": completion_logprobs(o.token_ids, o.logprobs) if want else None,
                             "stop_reason": o.stop_reason} for i, o in enumerate(outs)],
                "usage": usage(len(ids), outs)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        check_model(body.model)
        check_supported(body)
        if body.top_logprobs is not None and body.top_logprobs != 0 and not body.logprobs:
            raise OpenAIError("top_logprobs needs logprobs: true", param="top_logprobs")
        if llm.chat_template is None:
            raise OpenAIError("this model has no chat template; use /v1/completions", param="messages")
        try:
            text = llm.chat_template.render([m.model_dump() for m in body.messages])
        except ValueError as e:
            raise OpenAIError(str(e), param="messages") from None
        ids = tokens_of(text, add_special_tokens=False)  # the template writes the BOS (transformers, vLLM)
        top = body.top_logprobs or 0
        params = sampling(body, len(ids), top if body.logprobs else None, {"logprobs": "top_logprobs"})
        rid, created = new_id("chatcmpl"), now()
        if body.stream:
            def chunk(i, d):
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "choices": [{"index": i, "delta": {"role": "assistant", "content": d.text or ""},
                                     "logprobs": chat_logprobs(d.token_ids, d.logprobs, top) if body.logprobs
                                     else None, "finish_reason": d.finish_reason}]}
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}
            return StreamingResponse(run(ids, params, chunk, body, head), media_type="text/event-stream")
        outs = await collect(ids, params)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": o.text},
                             "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                             "logprobs": chat_logprobs(o.token_ids, o.logprobs, top) if body.logprobs else None}
                            for i, o in enumerate(outs)],
                "usage": usage(len(ids), outs)}

    app.state.metrics = metrics
    return app


def usage(prompt_tokens: int, outs: list[CompletionOutput]) -> dict[str, int]:
    return usage_of(prompt_tokens, sum(len(o.token_ids) for o in outs))


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
