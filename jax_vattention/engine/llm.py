"""``LLM``: the offline serving engine, ``LLM(model, ...).generate(prompts, SamplingParams)`` (vLLM-like).

It only orchestrates. Each ``step`` is schedule -> run -> postprocess:
the ``Scheduler`` picks the running decodes plus prefill chunks within the
token budget and maps their pages on the host; the ``ModelRunner`` lays the
step out and dispatches it; ``MapAhead`` maps the next step's pages while it
runs; the scheduler then records the sampled tokens.

``EngineConfig`` (or the same names as keywords) picks the memory: the
vAttention cache, or the baselines ``"paged"`` (block tables and JAX's Pallas
``paged_attention``) and ``"static"`` (``max_batch x max_seq`` preallocated),
each within ``pool_bytes``, and switches vAttention's allocation optimizations
(overlap, eager allocation, deferred reclamation, best fit, premapping).

Sampling is per request and reproducible: the key of a request's n-th token is
``fold_in(PRNGKey(params.seed), n)``, whatever batch it lands in and whether
it was preempted and recomputed.

Async scheduling (``EngineConfig.async_scheduling``, off by default) dispatches
step t+1 while step t runs and applies step t's results one step late;
``AsyncSteps`` (``engine.async_steps``, whose docstring tells how: pending
tokens, reconcile, drains before preemption, the penalties' synchronous
fallback, rollback on errors and ``close``) owns the steps in flight, and
``LLM`` hands it ``step`` when the flag is on.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..attention.dispatch import AttentionSpec
from ..cache import KVPool, PagedKVPool, StaticPool, VAttentionPool
from ..chat import ChatTemplate, ChatTemplateError
from ..config import CacheConfig
from ..errors import CacheClosedError
from ..inputs import PromptError, check_prompt, check_prompts
from ..manager import KVCacheManager, default_device
from ..sampling import SampleOutput, SamplingParams, TokenLogprobs, token_logprobs
from ..sharded_manager import ShardedKVCacheManager
from ..text import Detokenizer, TextTokenizer, encode
from ..validation import is_int
from .async_steps import AsyncSteps
from .config import EngineConfig
from .loaders import load_model_source, load_tokenizer_file
from .map_ahead import MapAhead
from .model_runner import ModelRunner, StepLayout
from .outputs import RequestOutput, child_params
from .prefix_cache import PrefixCache, prefix_namespace
from .protocol import CausalLM, check_model
from .request import Request
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from .stats import EngineStats


def tensor_parallel_mesh(n: int) -> Mesh:
    """A one-axis mesh ``("tp",)`` of the default backend's first ``n`` devices."""
    devices = jax.devices()
    if len(devices) < n:
        raise ValueError(f"tensor_parallel={n} needs {n} devices, found {len(devices)}: {devices}")
    return Mesh(np.array(devices[:n]), ("tp",))


def make_pool(model_config, c: EngineConfig, dtype: str, mesh: Mesh | None = None) -> KVPool:
    """The KV pool ``c.kv_cache`` names, shaped for ``model_config``; over ``mesh`` (tensor parallelism) if
    given."""
    shape = dict(num_layers=model_config.num_layers, max_batch=c.max_batch, max_seq=c.max_seq,
                 kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim, dtype=dtype)
    if c.kv_cache == "vattention":
        extra: dict[str, Any] = {k: v for k, v in (("pool_bytes", c.pool_bytes), ("page_bytes", c.page_bytes))
                                 if v is not None}
        extra["layers_per_group"] = (model_config.num_layers if c.layers_per_group == "all"
                                     else c.layers_per_group)
        cache_config = CacheConfig(**shape, **extra)
        manager = KVCacheManager(cache_config) if mesh is None else ShardedKVCacheManager(cache_config, mesh)
        pool = VAttentionPool(manager, deferred_reclaim=c.deferred_reclaim)
        if c.premap:
            pool.premap()
        return pool
    if c.kv_cache == "static":
        return StaticPool(**shape, pool_bytes=c.pool_bytes, device=default_device())
    return PagedKVPool(**shape, page_size=c.page_size, pool_bytes=c.pool_bytes, device=default_device())


def _serialized(method):
    """Run ``method`` holding the engine's lock (public calls from several threads never interleave),
    on an open engine."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._lock:
            if self._closed:
                raise CacheClosedError(f"LLM.{method.__name__}: the engine is closed")
            return method(self, *args, **kwargs)

    return call


class LLM:
    """Continuous batching of a ``CausalLM`` on a vAttention (or baseline) KV cache.

    Thread-safe: every public method holds one engine lock, so two threads calling
    ``generate`` run one after the other (each gets its own outputs), never interleaved.
    """

    def __init__(self, model: CausalLM | str | os.PathLike, config: EngineConfig | None = None, *,
                 tokenizer: TextTokenizer | str | os.PathLike | None = None,
                 chat_template: ChatTemplate | str | None = None, seed: int = 0, **overrides: Any):
        """``model``: a ``CausalLM``, or a string a model source resolves (``engine.loaders``: with ``models``
        installed, a Hugging Face directory or a preset name such as ``"tiny"``), which also brings its tokenizer
        and chat template; ``dtype`` then also sets the weights' dtype (default bf16 on a GPU, else fp32) and
        ``seed`` a preset's random weights. ``tokenizer`` (an object with ``encode``/``decode``, or a path to a
        ``tokenizer.json`` or a directory with one) and ``chat_template`` override the source's, each on its own.
        """
        if config is None:
            config = EngineConfig(**overrides)
        elif overrides:
            raise TypeError("pass either an EngineConfig or keyword settings, not both")
        self.model_name: str | None = None  # the source's name when ``model`` was a string
        mesh = tensor_parallel_mesh(config.tensor_parallel) if config.tensor_parallel > 1 else None
        if isinstance(model, (str, os.PathLike)):  # with a mesh, loaded straight into its shards where it can be
            loaded = load_model_source(model, dtype=config.dtype, seed=seed, mesh=mesh)
            model, self.model_name = loaded.model, loaded.name
            if tokenizer is None:
                tokenizer = loaded.tokenizer
            if chat_template is None and tokenizer is not None:
                chat_template = loaded.chat_template
        check_model(model)
        if isinstance(chat_template, str):
            chat_template = ChatTemplate(chat_template)
        if chat_template is not None and not isinstance(chat_template, ChatTemplate):
            raise TypeError(f"chat_template must be a ChatTemplate or a template string, "
                            f"got {type(chat_template).__name__}")
        if chat_template is not None and tokenizer is None:
            raise TypeError("a chat_template needs a tokenizer (LLM(model, tokenizer=..., chat_template=...))")
        self.chat_template = chat_template
        tok = load_tokenizer_file(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        if tok is not None and not (callable(getattr(tok, "encode", None)) and callable(getattr(tok, "decode", None))):
            raise TypeError(f"tokenizer must have encode and decode (e.g. a tokenizers.Tokenizer), "
                            f"got {type(tok).__name__}")
        self.tokenizer: TextTokenizer | None = tok
        self.model, self.config = model, config
        cfg = model.config
        if config.tensor_parallel > 1 and not callable(getattr(model, "shard", None)):
            raise TypeError(f"tensor_parallel={config.tensor_parallel} needs a model with shard(mesh, axis) "
                            f"(models.LlamaForCausalLM has one), got {type(model).__name__}")
        dtype = config.dtype or jnp.dtype(jax.tree.leaves(model)[0].dtype).name
        if mesh is not None:
            model.shard(mesh, "tp")  # type: ignore[attr-defined]  # refuses a model that does not split
        self.pool = make_pool(cfg, config, dtype, mesh)
        try:
            self.scheduler = Scheduler(self.pool, SchedulerConfig(
                max_batch=min(config.max_batch, self.pool.max_batch), token_budget=config.token_budget,
                chunk_size=config.chunk_size, admission_headroom=config.admission_headroom,
                best_fit=config.best_fit, max_prefill_rows=config.max_prefill_rows, max_seq=config.max_seq),
                prefix=PrefixCache(self.pool, prefix_namespace(cfg, self.pool)) if config.enable_prefix_caching
                else None)
            manager = getattr(self.pool, "manager", None)
            platform = (manager.device if manager is not None else default_device()).platform
            self.attn = (config.attn or AttentionSpec()).resolve(dtype, cfg.head_dim, platform)
            self.runner = ModelRunner(model, self.pool, config, self.attn)
        except BaseException:
            self.pool.close()
            raise
        self.map_ahead = MapAhead(self.pool, config.overlap_allocation, config.lookahead, config.chunk_size)
        self.stats = EngineStats()
        self._async = AsyncSteps(self)  # async scheduling's steps in flight
        self._next_id = 0
        self._lock = threading.RLock()
        self._closed = False

    @property
    def manager(self) -> KVCacheManager:
        """The ``KVCacheManager`` of a vAttention engine."""
        manager = getattr(self.pool, "manager", None)
        if manager is None:
            raise AttributeError(f"a {self.config.kv_cache!r} engine has no KVCacheManager")
        return manager

    # -- requests ----------------------------------------------------------------
    @_serialized
    def add_request(self, prompt, params: SamplingParams = SamplingParams()) -> Request:
        """Queue one prompt (token ids, or text with a tokenizer); it runs on the next ``step``."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.n != 1:
            raise ValueError(f"add_request queues one sequence, got SamplingParams.n={params.n} "
                             "(LLM.generate runs n; or queue each of outputs.child_params(params))")
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop strings need a tokenizer: LLM(model, tokenizer=...)")
        cfg = self.model.config
        if isinstance(prompt, str):
            prompt = self._encode(prompt)
        ids = check_prompt(prompt, cfg.vocab_size).tolist()
        positions = getattr(cfg, "max_position_embeddings", None)
        if positions is not None and len(ids) + params.max_tokens - 1 > positions:
            raise ValueError(f"the prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) needs "
                             f"{len(ids) + params.max_tokens - 1} positions, beyond the model's "
                             f"max_position_embeddings={positions}")
        detok = None if self.tokenizer is None else Detokenizer(self.tokenizer, ids, params.stop)
        r = Request(self._next_id, ids, params, stop_ids=params.stop_ids(cfg.eos_token_ids),  # Request seeds it
                    detokenizer=detok)
        self.scheduler.add(r)
        self._next_id += 1
        return r

    @_serialized
    def abort_request(self, request_id: int) -> bool:
        """Finish a queued or running request now (reason ``"cancelled"``), freeing its slot at once.

        Returns whether it was found unfinished. (Async scheduling: a step in flight drops its token; when
        nothing else is left, that step is waited for here.)
        """
        found = self.scheduler.cancel(request_id)
        if self._async and not self.scheduler.has_unfinished():
            self._async.drain()
        return found

    # -- one step: schedule -> run -> postprocess -------------------------------------
    def _run(self, out: SchedulerOutput) -> dict[int, int | tuple[int, TokenLogprobs]]:
        """Run the step; each sampled request's token, with its logprobs when it asked for them."""
        step = self.runner.layout(out)
        sampled = self.runner.dispatch(step).sampled
        dispatched = time.perf_counter()
        mapped_before = self.map_ahead.seconds
        future = self.map_ahead.start(step.chunks)
        try:
            host = jax.device_get(sampled)  # waits for the device (tokens [R]; logprobs when the mode has them)
        except BaseException:
            MapAhead.finish(future, raise_errors=False)  # keep the step's error
            raise
        self.stats.record_device_step(dispatched, time.perf_counter())
        MapAhead.finish(future)
        self.stats.map_ahead_s += self.map_ahead.seconds - mapped_before
        self.pool.check_errors()  # a write refused on the GPU never passes silently
        return self._sampled_tokens(step, host)

    def _sampled_tokens(self, step: StepLayout, host: SampleOutput) -> dict[int, int | tuple[int, TokenLogprobs]]:
        """Each sampling row's token (host arrays), with its logprobs when the request asked for them."""
        tok = self.tokenizer
        decode = None if tok is None else (lambda t: tok.decode([t], skip_special_tokens=False))
        result: dict[int, int | tuple[int, TokenLogprobs]] = {}
        for b, c in step.chunks:
            if c.samples:
                n = c.request.params.logprobs
                token = int(host.tokens[b])
                result[c.request.request_id] = token if n is None else (token, token_logprobs(host, b, n, decode))
        return result

    @_serialized
    def step(self) -> list[Request]:
        """Run one iteration; returns the requests that finished in it (with async scheduling: whose results
        this call applied, the previous step's; see the module's docstring)."""
        finished = self._async.step() if self.config.async_scheduling else self._sync_step()
        if self.scheduler.prefix is not None:
            self.stats.prefix_cache = self.scheduler.prefix.stats()
        return finished

    def _sync_step(self) -> list[Request]:
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        self.stats.schedule_s += time.perf_counter() - t0
        if out.empty:
            if out.failed:
                return out.failed
            if not self.scheduler.has_unfinished():
                return []
            raise RuntimeError("the scheduler made no progress (pool too small for any waiting request)")
        sampled = self._run(out)
        now = time.perf_counter()
        finished = out.failed + self.scheduler.update(out, sampled, now)
        self.stats.record_step(now, len(out.decodes) + len(out.prefills), *self.pool.memory())
        return finished

    def _encode(self, text: str) -> list[int]:
        """A text prompt's ids (with the tokenizer's special tokens, e.g. BOS); PromptError without a tokenizer."""
        if self.tokenizer is None:
            raise PromptError("text prompts need a tokenizer: LLM(model, tokenizer=...), or pass token ids")
        return encode(self.tokenizer, text)

    def _prompt_inputs(self, prompts) -> tuple[list[str | None], list[np.ndarray]]:
        """``(text or None, token ids)`` of every prompt. ``prompts`` is one prompt or a list of them; a prompt is
        text, token ids, or vLLM's ``{"prompt": text}`` / ``{"prompt_token_ids": ids}`` (with both, the ids run and
        the text is the output's ``prompt``, as ``chat`` passes them)."""
        one = (isinstance(prompts, (str, Mapping)) or (isinstance(prompts, (list, tuple)) and len(prompts) > 0
                                                       and all(is_int(t) for t in prompts)))
        if one:
            prompts = [prompts]
        texts: list[str | None] | None = None
        if isinstance(prompts, (list, tuple)):
            texts, items = [], []
            for i, p in enumerate(prompts):
                if isinstance(p, Mapping):
                    if "prompt_token_ids" not in p and not isinstance(p.get("prompt"), str):
                        raise PromptError(f"prompt {i}: a dict prompt needs 'prompt' (text) or 'prompt_token_ids', "
                                          f"got keys {sorted(p)}")
                    text = p.get("prompt") if isinstance(p.get("prompt"), str) else None
                    p = p["prompt_token_ids"] if "prompt_token_ids" in p else text
                else:
                    text = p if isinstance(p, str) else None
                if isinstance(p, str):
                    p = self._encode(p)
                texts.append(text)
                items.append(p)
            prompts = items
        ids = check_prompts(prompts, self.model.config.vocab_size)
        return (texts if texts is not None else [None] * len(ids)), ids

    @_serialized
    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
                 progress: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; one ``RequestOutput`` per prompt, in order (vLLM's ``LLM.generate``).

        ``prompts``: one prompt or a list; a prompt is text (with a tokenizer), token ids, or vLLM's
        ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}``. ``params``: one ``SamplingParams`` for all, or one per
        prompt; ``n > 1`` runs ``n`` requests (``outputs.child_params``: seeds ``seed + i``, or independent ones
        without a seed) gathered into the prompt's ``RequestOutput``. ``progress`` shows a tqdm bar.
        """
        texts, prompts = self._prompt_inputs(prompts)
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        groups: list[list[Request]] = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                groups.append([])
                try:
                    for child in child_params(p):
                        groups[-1].append(self.add_request(prompt, child))
                except (ValueError, TypeError) as e:
                    raise type(e)(f"prompt {i}: {e}") from None
        except BaseException:
            for r in (r for g in groups for r in g):
                self.scheduler.cancel(r.request_id)
            raise
        from tqdm.auto import tqdm

        requests = [r for g in groups for r in g]
        try:
            with tqdm(total=len(requests), disable=not progress, desc="requests", unit="req",
                      mininterval=2.0) as bar:
                while self.scheduler.has_unfinished():
                    bar.update(len(self.step()))
        except BaseException:
            self._async.abandon()
            for r in requests:  # leave no request queued and no slot held behind the exception
                if not r.finished:
                    self.scheduler.cancel(r.request_id)
            raise
        return [RequestOutput.of(g, text) for g, text in zip(groups, texts)]

    def chat(self, messages, params: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
             add_generation_prompt: bool = True, progress: bool = False) -> list[RequestOutput]:
        """Generate replies: ``messages`` is one conversation (a list of ``{"role", "content"}``) or a list of them,
        rendered with the chat template (``LLM(..., chat_template=...)``, e.g. ``models.load_chat_template``).

        One ``RequestOutput`` per conversation (its ``prompt`` is the rendered text; ``SamplingParams(n=k)`` gives
        ``k`` replies), as ``generate``. The rendered text is encoded without the tokenizer's special tokens: the
        template writes the BOS itself (transformers' ``apply_chat_template`` and vLLM do the same).
        """
        if self.chat_template is None:
            raise ValueError("LLM.chat needs a chat template: LLM(model, tokenizer=..., chat_template=...)")
        one = isinstance(messages, Sequence) and bool(messages) and isinstance(messages[0], Mapping)
        conversations = [messages] if one else messages
        if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence) or not conversations:
            raise ChatTemplateError(f"messages must be a conversation or a non-empty list of them, "
                                    f"got {messages!r:.80}")
        assert self.tokenizer is not None  # a chat template needs one (checked in __init__)
        prompts = []
        for i, conv in enumerate(conversations):
            try:
                text = self.chat_template.render(conv, add_generation_prompt=add_generation_prompt)
            except ValueError as e:
                raise type(e)(f"conversation {i}: {e}") from None
            prompts.append({"prompt": text,
                            "prompt_token_ids": encode(self.tokenizer, text, add_special_tokens=False)})
        return self.generate(prompts, params, progress=progress)

    # -- compilation -------------------------------------------------------------------
    def step_shapes(self) -> list:
        """Every step shape the bucketing can produce (``ModelRunner.step_shapes``)."""
        return self.runner.step_shapes()

    @_serialized
    def warmup(self, modes=("greedy",), *, compile_threads: int = 1) -> float:
        """Compile every step shape now (see ``ModelRunner.warmup``); returns seconds."""
        return self.runner.warmup(modes, compile_threads=compile_threads)

    @property
    def num_compiled(self) -> int:
        return self.runner.num_compiled

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Release the cache (idempotent); every later call raises ``CacheClosedError``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._async.abandon()  # the device is done with every step before the pool goes
            self.map_ahead.close()
            self.pool.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
