"""``jax-vattention generate``: a Llama-family model (``models``) on the vAttention cache.

By default the ``tiny`` preset with seeded random weights (no download), or
``--model DIR`` for a local Hugging Face checkpoint. It prints the generated
ids (or text, when the directory has ``tokenizer.json``), tokens/s, and the
physical KV memory actually mapped vs what a static ``batch x max_seq`` cache
would hold.
"""

from __future__ import annotations

import dataclasses
import os
import sys

MIB = 1 << 20


def add_generate_parser(sub) -> None:
    g = sub.add_parser(
        "generate", help="generate with a Llama-family model on the vAttention cache",
        description="Generate with a Llama-family model on the vAttention cache. Without --model: the tiny preset "
                    "(or --preset) with seeded random weights, no download needed.")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="local Hugging Face directory (config.json + *.safetensors)")
    src.add_argument("--preset", default="tiny", help="model shape with random weights (default: tiny)")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="text prompt (a model directory needs tokenizer.json; presets use a byte-level tokenizer)")
    g.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                   help="prompt as token ids, e.g. '1 2 3' or '1,2,3' (repeatable)")
    g.add_argument("--num-prompts", type=int, default=4, help="random prompts when none are given (default 4)")
    g.add_argument("--prompt-len", type=int, default=48, help="longest random prompt (default 48)")
    g.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=32,
                   help="tokens to generate per prompt (default 32)")
    g.add_argument("--max-seq", type=int, default=None,
                   help="cache tokens per slot (default 32768, capped by the model)")
    g.add_argument("--max-batch", type=int, default=None, help="cache slots (default: number of prompts)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights and cache (auto: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--cache", default="vattention", choices=["vattention", "static"],
                   help="vAttention cache or the static [batch, max_seq] baseline")
    g.add_argument("--page-bytes", type=int, default=None, help="page size (default 2 MiB on GPU, 64 KiB on CPU)")
    g.add_argument("--layers-per-group", default="all", metavar="G",
                   help="vAttention layout: 1 = a K and a V tensor per layer, 'all' (default) = every layer "
                        "interleaved per token (16 tokens per 2 MiB page for Llama-3-8B), or a divisor of the layers")
    g.add_argument("--attention", default="auto", choices=["auto", "kernel", "reference"])
    g.add_argument("--interpret", action="store_true", help="run the Pallas kernels in interpret mode (CPU)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="weights (presets), random prompts and sampling")
    g.add_argument("--stop", type=int, action="append", default=None, metavar="ID",
                   help="stop token id (repeatable; default: the model's eos ids)")
    g.add_argument("--ignore-eos", action="store_true", help="no stop tokens: every request runs to its budget")
    g.add_argument("--prefill-chunk", type=int, default=None, help="prefill at most this many tokens per call")
    g.add_argument("--decode-chunk", type=int, default=None, help="decode steps per jitted call")
    g.add_argument("--progress", default="auto", choices=["auto", "on", "off"],
                   help="tqdm bar over decode chunks (auto: when max_tokens >= 128)")


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids expects integers, got {text!r}") from None


def _positive_or_default(args, name: str, default: int) -> int:
    """``--name`` when given (it must be positive: 0 is an error, not "the default"), else ``default``."""
    value = getattr(args, name)
    if value is None:
        return default
    if value <= 0:
        raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    return value


def _int_arg(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{flag} expects an integer or 'all', got {text!r}") from None


def run_generate(args) -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to the page pool
    import jax
    import numpy as np

    import jax_vattention as jv
    import models
    from jax_vattention.attention import AttentionSpec
    from models.errors import ModelError

    try:
        return _generate(args, jax, np, jv, models, AttentionSpec)
    except (ModelError, jv.VAttentionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _generate(args, jax, np, jv, models, AttentionSpec) -> int:
    if args.max_tokens <= 0:  # before loading weights: the cheapest checks first
        raise models.GenerationInputError(f"max_tokens must be a positive int, got {args.max_tokens}")
    platform = jv.default_device().platform  # honours jax.default_device
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if platform == "gpu" else "float32")
    tokenizer = None
    if args.model:
        model = models.load_model(args.model, dtype=dtype)
        tokenizer = models.load_tokenizer(args.model)
        source = f"{args.model} ({model.config.architecture})"
    else:
        cfg = models.get_preset(args.preset)
        model = models.random_model(cfg, seed=args.seed, dtype=dtype)
        try:
            tokenizer = models.tokenizer_for(cfg)  # byte-level: text round-trips with random weights too
            note = ", byte-level tokenizer" if tokenizer is not None else ""
        except ImportError:  # a dependency of the package, but a --no-deps install may lack it
            tokenizer, note = None, " (no tokenizer: the tokenizers package is not installed)"
        source = f"preset {args.preset!r}, random weights (seed {args.seed}){note}"
    cfg = model.config
    print(f"model: {source}, {models.config.param_count_str(cfg)} params, {dtype} on {platform}")

    prompts = [_parse_ids(p) for p in args.prompt_ids]
    if args.prompt:
        if tokenizer is None:
            raise models.GenerationInputError("text prompts need a tokenizer: this model directory has no "
                                              "tokenizer.json; pass --prompt-ids instead")
        prompts += [tokenizer.encode(p).ids for p in args.prompt]
    if not prompts:
        if args.num_prompts <= 0 or args.prompt_len <= 0:
            raise models.GenerationInputError("--num-prompts and --prompt-len must be positive")
        rng = np.random.default_rng(args.seed)
        lens = rng.integers(max(1, args.prompt_len // 4), args.prompt_len + 1, size=args.num_prompts)
        lens[0] = args.prompt_len
        prompts = [rng.integers(0, cfg.vocab_size, size=int(n)).tolist() for n in lens]
    max_seq = _positive_or_default(args, "max_seq", min(32768, cfg.max_position_embeddings))
    max_batch = _positive_or_default(args, "max_batch", len(prompts))
    # Validate before any memory is reserved: bad input leaves nothing behind.
    try:
        params = [jv.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, stop_token_ids=() if args.ignore_eos else (args.stop or ()),
                                    ignore_eos=bool(args.ignore_eos or args.stop), seed=args.seed + i)
                  for i in range(len(prompts))]
    except ValueError as e:
        raise models.GenerationInputError(str(e)) from None
    models.check_requests(prompts, params, vocab_size=cfg.vocab_size, max_seq=max_seq,
                          max_batch=max_batch, sliding_window=cfg.sliding_window)
    progress = args.progress == "on" or (args.progress == "auto" and args.max_tokens >= 128)
    decode_chunk = args.decode_chunk
    if decode_chunk is None and progress:
        decode_chunk = max(8, args.max_tokens // 20)
    gen = models.Generator(model, attn=AttentionSpec(impl=args.attention, interpret=args.interpret))
    kw = dict(prefill_chunk=args.prefill_chunk, decode_chunk=decode_chunk, progress=progress)
    page_bytes = _positive_or_default(args, "page_bytes", 2 * MIB if platform == "gpu" else 64 << 10)
    if args.cache == "static":
        cache = models.static_cache_for(cfg, max_batch=max_batch, max_seq=max_seq, dtype=dtype)
        result = gen.generate(prompts, cache, params, **kw)
        stats = None
    else:
        group = cfg.num_layers if args.layers_per_group == "all" else _int_arg(args.layers_per_group,
                                                                                 "--layers-per-group")
        layout = models.cache_config_for(cfg, max_batch=max_batch, max_seq=max_seq, dtype=dtype,
                                         page_bytes=page_bytes, layers_per_group=group)
        # Page budget: what these requests can need (+1 page per tensor per request), not max_batch x max_seq.
        need = sum(-(-(len(p) + args.max_tokens) * layout.token_bytes // page_bytes) + 1 for p in prompts)
        cache_cfg = dataclasses.replace(layout, pool_bytes=layout.num_tensors * need * page_bytes)
        with jv.KVCacheManager(cache_cfg) as manager:
            result = gen.generate(prompts, manager, params, **kw)
            stats = manager.stats()
        assert manager.stats().reserved_bytes == 0 and manager.stats().pages_mapped == 0
    _report(result, prompts, tokenizer, cfg, stats, max_seq, args.cache)
    return 0


def _size(nbytes: int) -> str:
    return f"{nbytes / MIB:,.2f} MiB" if nbytes >= MIB else f"{nbytes / 1024:,.1f} KiB"


def _report(result, prompts, tokenizer, cfg, stats, max_seq, cache_kind) -> None:
    for i, (p, toks) in enumerate(zip(prompts, result.tokens)):
        reason = result.finish_reasons[i]
        print(f"[{i}] prompt {len(p)} tokens -> {len(toks)} new ({reason}): {toks}")
        if tokenizer is not None:
            print(f"    text: {tokenizer.decode(toks, skip_special_tokens=False)!r}")
    n = result.num_generated
    print(f"generated {n} tokens for {len(prompts)} requests: prefill {result.prefill_seconds * 1e3:.1f} ms, "
          f"decode {result.decode_seconds * 1e3:.1f} ms ({result.decode_steps} steps in the jitted loop), "
          f"compile {result.compile_seconds:.1f} s")
    print(f"throughput: {result.tokens_per_second:,.1f} tokens/s overall, "
          f"{result.decode_tokens_per_second:,.1f} tokens/s in decode")
    print(f"KV memory ({cfg.num_layers} layers x K/V, {cache_kind} cache):")
    if stats is not None:
        print(f"  physical mapped at the end  {_size(result.mapped_bytes)}  ({stats.pages_mapped} pages of "
              f"{_size(stats.page_bytes)})")
        print(f"  reserved (virtual)          {_size(stats.reserved_bytes)}")
    print(f"  tokens cached               {_size(result.needed_bytes)}  (lengths {result.cache_lengths})")
    ratio = f" = {result.static_bytes / result.mapped_bytes:.1f}x the mapped memory" if result.mapped_bytes else ""
    print(f"  static cache {len(prompts)} x {max_seq:<9} {_size(result.static_bytes)}{ratio}")
    if stats is not None:
        print("closed: nothing reserved or mapped")
