"""Host-side generation: validate requests, admit them into cache slots, prefill, run the decode loop.

    gen = Generator(model)
    with jv.KVCacheManager(cfg) as manager:
        result = gen.generate([[1, 2, 3], [4, 5]], manager,
                              [SamplingParams(max_tokens=16), SamplingParams(max_tokens=8, stop_token_ids=[2])])

``cache`` is a ``KVCacheManager`` (vAttention: each request gets a slot, its pages
are mapped by the grow calls inside the compiled prefill and decode programs
and the slot is freed afterwards) or a ``StaticKVCache`` (the baseline; its
buffers are donated, ``result.static_cache`` holds them afterwards).

The vocabulary, sampling, prompt checks and bucketing are the serving engine's
(``jax_vattention.sampling``, ``jax_vattention.inputs``): a request samples the
same tokens here and in ``jax_vattention.engine.LLM`` for the same seed.

Every request is checked before anything is allocated, so bad input leaves
nothing mapped. Programs are compiled ahead of time (``lower().compile()``),
once per shape, and - for the vAttention cache - checked with
``jax_vattention.hlo.assert_no_cache_copy`` before they ever run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_vattention import KVCacheManager
from jax_vattention.attention import AttentionSpec
from jax_vattention.cache import StaticKVCache
from jax_vattention.hlo import check_compiled
from jax_vattention.inputs import bucket
from jax_vattention.sampling import SamplingParams, SamplingRows, sampling_mode
from jax_vattention.validation import check_int

from . import decode as dec
from .errors import GenerationInputError
from .requests import GenerationResult, check_requests, stop_matrix

# SamplingParams fields (with their off value) that need the host between tokens: the engine has them.
_HOST_FEATURES = (("min_tokens", 0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                  ("repetition_penalty", 1.0), ("logprobs", None))


class Generator:
    """Compiles and runs generation for one model; reuse it across calls to reuse compilations."""

    def __init__(self, model, *, attn: AttentionSpec = AttentionSpec(), check_copies: bool = True):
        self.config = model.config
        self.graphdef, self.params = nnx.split(model)
        self.attn = attn
        self.check_copies = check_copies
        self._compiled: dict = {}

    # -- compilation -------------------------------------------------------
    def compiled_programs(self) -> dict[str, list]:
        """Compiled executables so far, by program: "prefill", "decode" (vAttention), "prefill_static",
        "decode_static" (static cache), "start"."""
        out: dict[str, list] = {}
        for key, (compiled, _) in self._compiled.items():
            out.setdefault(key[0], []).append(compiled)
        return out

    def _compile(self, name, jitted, manager, static: dict, *args, model: bool = True):
        """AOT-compile ``jitted`` once per argument signature (graphdef prepended when ``model``)."""
        leaves, tree = jax.tree.flatten(args)
        key = (name, tuple(sorted(static.items())), tree, tuple((x.shape, x.dtype) for x in leaves))
        hit = self._compiled.get(key)
        if hit is None:
            t0 = time.perf_counter()
            lead = (self.graphdef,) if model else ()
            compiled = jitted.lower(*lead, *args, **static).compile()
            if manager is not None and self.check_copies:
                check_compiled(compiled.as_text(), manager, strict=name == "decode")
            hit = self._compiled[key] = (compiled, time.perf_counter() - t0)
            self._compile_seconds += hit[1]
        return hit[0]

    def _spec(self, dtype, platform: str, max_len: int, manager) -> AttentionSpec:
        spec = self.attn.resolve(dtype, self.config.head_dim, platform).with_max_len(max_len)
        if spec.impl == "kernel" and manager is not None and spec.block_k:
            tpp = manager.config.tokens_per_page  # of every layer of a group in the interleaved layout
            if tpp % spec.block_k:
                raise GenerationInputError(
                    f"attention kernels cannot run on this cache: block_k={spec.block_k} does not divide the {tpp} "
                    "tokens per page (a KV tile could straddle into an unmapped page)")
        return spec

    # -- generation --------------------------------------------------------
    def generate(self, prompts, cache, params: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
                 prefill_chunk: int | None = None, decode_chunk: int | None = None, progress: bool = False,
                 premap: bool = False) -> GenerationResult:
        """Generate for every prompt; see the module docstring.

        Args:
          prompts: list of token-id sequences (ragged).
          cache: ``KVCacheManager`` or ``StaticKVCache``.
          params: one ``SamplingParams`` for all prompts or one per prompt: ``max_tokens``,
            ``stop_token_ids`` (plus the model's EOS unless ``ignore_eos``; the stop token is
            returned), greedy / temperature / top-k / top-p / min-p, and ``seed``: a request samples
            the same tokens alone or batched, and as in the serving engine. ``min_tokens``, the
            penalties and ``logprobs`` need the host between tokens (the whole decode loop runs on
            the device): they raise ``GenerationInputError`` (a ``ValueError``); use the engine.
          prefill_chunk: prefill at most this many tokens per row per program call.
          decode_chunk: decode steps per program call (default: all in one call);
            the host checks progress between calls, never per token.
          progress: show a tqdm bar over decode steps.
          premap: map every page a request can need before prefill (host-side
            ``manager.grow``), so the in-graph grow calls find nothing to map: the
            baseline for measuring what in-graph growth costs.
        """
        cfg = self.config
        manager = cache if isinstance(cache, KVCacheManager) else None
        if manager is None and not isinstance(cache, StaticKVCache):
            raise TypeError(f"cache must be a KVCacheManager or a StaticKVCache, got {type(cache).__name__}")
        if manager is not None:
            c = manager.config
            max_seq, max_batch, dtype = manager.max_seq, c.max_batch, c.jnp_dtype
            shape = (c.num_layers, c.kv_heads, c.head_dim)
            platform = manager.device.platform
            free = sum(not a for a in manager.stats().slot_allocated)
            itemsize = c.itemsize
        else:
            max_batch, max_seq = cache.k[0].shape[:2]
            dtype, itemsize = cache.k[0].dtype, cache.k[0].dtype.itemsize
            shape = (len(cache.k), *cache.k[0].shape[2:])
            platform = next(iter(cache.k[0].devices())).platform
            free = max_batch
        if shape != (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim):
            raise GenerationInputError(
                f"cache shape (layers, kv_heads, head_dim)={shape} does not fit the model "
                f"{(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)}")
        prompts, params = check_requests(prompts, params, vocab_size=cfg.vocab_size, max_seq=max_seq,
                                         max_batch=max_batch, sliding_window=cfg.sliding_window)
        for name, value in (("prefill_chunk", prefill_chunk), ("decode_chunk", decode_chunk)):
            if value is not None:
                check_int(name, value, low=1, error=GenerationInputError)
        n = len(prompts)
        if n > free:
            raise GenerationInputError(f"{n} prompts but only {free} free slots in the cache")
        lens = np.array([p.size for p in prompts], np.int32)
        max_new = np.array([p.max_tokens for p in params], np.int32)
        stop_ids = jnp.asarray(stop_matrix(params, cfg.eos_token_ids))
        spec = self._spec(dtype, platform, bucket(int((lens + max_new - 1).max()), max_seq, 16), manager)
        width = bucket(int(lens.max()), max_seq, 8)
        if prefill_chunk is not None:
            width = min(width, int(prefill_chunk))
        for i, p in enumerate(params):
            host = [f"{k}={getattr(p, k)!r}" for k, off in _HOST_FEATURES if getattr(p, k) != off]
            if host:
                raise GenerationInputError(f"params[{i}]: the Generator's on-device decode loop does not support "
                                           f"{', '.join(host)}; use the serving engine (jax_vattention.engine.LLM)")
        sampling = SamplingRows.of(params, [0] * n)
        mode = sampling_mode(params)
        self._compile_seconds = 0.0

        slots = []
        try:
            if manager is not None:
                slots = [manager.allocate() for _ in range(n)]
                if premap:
                    for slot, need in zip(slots, lens + max_new - 1):
                        manager.grow(slot, int(need))
                kv = manager.cache(slots, np.zeros(n, np.int32))
            else:
                kv = cache.with_rows(np.arange(n), np.zeros(n, np.int32))
            return self._run(kv, manager, prompts, lens, max_new, stop_ids, sampling, mode, spec, width,
                             decode_chunk, progress, max_seq, itemsize, slots)
        except BaseException:
            if manager is not None and slots and not manager.closed:
                for s in slots:
                    manager.free(s)
                slots = []
                manager.trim()  # an aborted run leaves nothing mapped
            raise
        finally:
            if manager is not None and not manager.closed:
                for s in slots:
                    manager.free(s)

    def _run(self, kv, manager, prompts, lens, max_new, stop_ids, sampling, mode, spec, width, decode_chunk,
             progress, max_seq, itemsize, slots):
        cfg = self.config
        n = len(prompts)
        prefill_fn, decode_fn = dec.programs(kv.donates)
        padded = np.zeros((n, -(-int(lens.max()) // width) * width), np.int32)
        for i, p in enumerate(prompts):
            padded[i, : p.size] = p
        logits = jnp.zeros((n, cfg.vocab_size), jnp.float32)
        remaining = lens.copy()
        chunks = []
        for off in range(0, padded.shape[1], width):
            counts = np.minimum(remaining, width).astype(np.int32)
            remaining -= counts
            chunks.append((jnp.asarray(padded[:, off: off + width]), jnp.asarray(counts)))
        suffix = "_static" if kv.donates else ""
        prefill_c = self._compile("prefill" + suffix, prefill_fn, manager, dict(attn=spec), self.params, kv,
                                  *chunks[0], logits)

        out_len = bucket(int(max_new.max()), 1 << 30, 8)  # buffer width: few distinct shapes
        max_new_d = jnp.asarray(max_new)
        start_c = self._compile("start", dec.start_program, None, dict(out_len=out_len, mode=mode),
                                logits, sampling, max_new_d, stop_ids, model=False)

        t0 = time.perf_counter()
        for tokens, counts in chunks:
            logits, exported = prefill_c(self.params, kv, tokens, counts, logits)
            kv = kv.restore(exported)
        carry = start_c(logits, sampling, max_new_d, stop_ids)
        jax.block_until_ready(carry)
        prefill_s = time.perf_counter() - t0

        total = int(max_new.max()) - 1
        chunk = total if not decode_chunk else int(decode_chunk)
        decode_s, step = 0.0, 0
        if total > 0 and not bool(carry.done.all()):
            static = dict(attn=spec, mode=mode)
            args = (self.params, kv, carry, jnp.int32(0), max_new_d, stop_ids, sampling)
            decode_c = self._compile("decode" + suffix, decode_fn, manager, static, *args)
            bar = _progress_bar(total, progress)
            t0 = time.perf_counter()
            while step < total:
                end = min(step + chunk, total)
                carry, exported = decode_c(self.params, kv, carry, jnp.int32(end), max_new_d, stop_ids, sampling)
                kv = kv.restore(exported)
                new_step, all_done = int(carry.step), bool(carry.done.all())  # one sync per chunk
                if bar is not None:
                    bar.update(new_step - step)
                step = new_step
                if all_done:
                    break
            jax.block_until_ready(carry)
            decode_s = time.perf_counter() - t0
            if bar is not None:
                bar.close()

        out, n_gen = np.asarray(carry.out), np.asarray(carry.n_gen)
        stops = np.asarray(stop_ids)
        generated = [out[i, : n_gen[i]].tolist() for i in range(n)]
        reasons = ["stop" if t and t[-1] in stops[i] else "length" for i, t in enumerate(generated)]
        cache_lengths = np.asarray(kv.lengths).tolist()
        mapped = capacity = None
        if manager is not None:
            manager.check_device_errors()
            mapped = manager.stats().mapped_bytes
            capacity = [manager.capacity(s) for s in slots]
        per_token = cfg.kv_bytes_per_token(itemsize)
        return GenerationResult(
            tokens=generated, finish_reasons=reasons, prompt_lengths=lens.tolist(), cache_lengths=cache_lengths,
            slot_capacity=capacity, prefill_seconds=prefill_s, decode_seconds=decode_s,
            compile_seconds=self._compile_seconds, decode_steps=step, mapped_bytes=mapped,
            needed_bytes=sum(cache_lengths) * per_token, static_bytes=n * max_seq * per_token,
            static_cache=None if manager is not None else kv,
        )


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", desc="decode", leave=False)


def generate(model, prompts, cache, params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
             **kwargs) -> GenerationResult:
    """One-shot ``Generator(model).generate(prompts, cache, params, **kwargs)`` (compiles every call)."""
    attn = kwargs.pop("attn", AttentionSpec())
    return Generator(model, attn=attn).generate(prompts, cache, params, **kwargs)
