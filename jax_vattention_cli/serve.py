"""``jax-vattention serve``: the OpenAI-compatible HTTP server (FastAPI on uvicorn) over one engine.

    jax-vattention serve --model /path/to/hf-dir --port 8000      # tokenizer.json and its chat template
    jax-vattention serve --preset tiny                             # random weights, byte-level tokenizer
    jax-vattention serve --preset llama-3-8b --max-num-seqs 128 --max-model-len 4096 --kv-budget-gib 8 \\
         --max-num-batched-tokens 512 --chunk-size 512 --kv-cache paged --warmup     # vLLM's sizing names
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "tiny", "prompt": "Hello", "max_tokens": 16}'

SIGTERM or Ctrl-C shuts down gracefully: uvicorn stops accepting, running requests are aborted, the engine
loop stops and the cache is closed (nothing stays mapped).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)",
                       description="Serve a model over an OpenAI-compatible HTTP API with the vAttention engine.")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="local Hugging Face directory (needs tokenizer.json)")
    src.add_argument("--preset", default="tiny", help="model shape with random weights (default: tiny)")
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: dir or preset)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--layers", type=int, default=None, help="override a preset's layer count (random weights)")
    size = s.add_argument_group("sizing (vLLM's names where vLLM has one)")
    size.add_argument("--max-num-seqs", "--max-batch", dest="max_batch", type=int, default=32,
                      help="requests running at once: the cache's rows (default 32)")
    size.add_argument("--max-model-len", "--max-seq", dest="max_seq", type=int, default=2048,
                      help="prompt + output tokens of one request (default 2048)")
    size.add_argument("--max-num-batched-tokens", dest="token_budget", type=int, default=None, metavar="N",
                      help="tokens per engine step: decodes plus prefill chunks (EngineConfig.token_budget)")
    size.add_argument("--chunk-size", type=int, default=None, help="largest prefill chunk (EngineConfig.chunk_size)")
    size.add_argument("--max-prefill-rows", type=int, default=None, help="prefill chunks per step")
    size.add_argument("--kv-cache", default="vattention", choices=["vattention", "paged", "static"],
                      help="vAttention (default), or the baselines: 16-token block tables, or static slots")
    size.add_argument("--kv-budget-gib", type=float, default=None,
                      help="physical KV memory in GiB (EngineConfig.pool_bytes; default: every row at max-model-len)")
    size.add_argument("--lookahead", type=int, default=None, help="vAttention eager allocation: tokens mapped ahead")
    size.add_argument("--layers-per-group", default="all", help="vAttention layout: 1 or 'all' (default)")
    comp = s.add_argument_group("compilation")
    comp.add_argument("--warmup", action="store_true",
                      help="compile every step shape (greedy sampling) before listening, so no request waits on XLA")
    comp.add_argument("--compile-threads", type=int, default=4, help="threads compiling in --warmup (default 4)")
    comp.add_argument("--min-token-bucket", type=int, default=None,
                      help="smallest packed step compiled, in tokens (fewer shapes; default 8)")
    comp.add_argument("--min-decode-bucket", type=int, default=None,
                      help="smallest decode batch compiled with --no-packed-steps (fewer shapes; default 1)")
    comp.add_argument("--min-prefill-bucket", type=int, default=None,
                      help="smallest prefill chunk compiled with --no-packed-steps (fewer shapes; default 1)")
    s.add_argument("--tensor-parallel-size", "-tp", dest="tensor_parallel", type=int, default=None,
                   help="shard the model and the vAttention cache over this many local devices (vLLM's flag)")
    s.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse cached full pages of shared prompt prefixes (vattention and paged caches; off by "
                        "default; /metrics reports hits)")
    comp.add_argument("--no-packed-steps", dest="packed_steps", action="store_false",
                      help="lay steps out as row groups (decodes, padded prefill chunks) instead of packed rows")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    s.add_argument("--seed", type=int, default=0, help="random weights of a preset")


GIB = 1 << 30
# flag -> the EngineConfig field it sets (None: not given, the engine's default)
ENGINE_FLAGS = {"--max-num-batched-tokens": "token_budget", "--chunk-size": "chunk_size",
                "--max-prefill-rows": "max_prefill_rows", "--lookahead": "lookahead",
                "--min-token-bucket": "min_token_bucket", "--min-decode-bucket": "min_decode_bucket",
                "--min-prefill-bucket": "min_prefill_bucket", "--tensor-parallel-size": "tensor_parallel"}


def engine_settings(args) -> dict:
    """The ``EngineConfig`` keywords of the sizing flags, each checked with an error naming its flag."""
    def positive(flag: str, value, low: int = 1) -> None:
        if value is not None and (isinstance(value, bool) or value < low):
            raise ValueError(f"{flag} must be {'positive' if low == 1 else f'at least {low}'}, got {value}")

    positive("--max-num-seqs", args.max_batch)
    positive("--max-model-len", args.max_seq)
    positive("--compile-threads", args.compile_threads)
    for flag, field in ENGINE_FLAGS.items():
        positive(flag, getattr(args, field), low=0 if field == "lookahead" else 1)
    if args.layers is not None:
        positive("--layers", args.layers)
        if args.model:
            raise ValueError("--layers overrides a preset's layer count; a --model checkpoint has its own")
    settings: dict = dict(kv_cache=args.kv_cache, max_batch=args.max_batch, max_seq=args.max_seq)
    settings.update({field: v for field in ENGINE_FLAGS.values() if (v := getattr(args, field)) is not None})
    if not getattr(args, "packed_steps", True):
        settings["packed_steps"] = False
    if getattr(args, "enable_prefix_caching", None) is not None:
        settings["enable_prefix_caching"] = args.enable_prefix_caching
    if args.kv_budget_gib is not None:
        gib = args.kv_budget_gib
        if not gib > 0 or gib == float("inf"):
            raise ValueError(f"--kv-budget-gib must be a positive number of GiB, got {gib}")
        settings["pool_bytes"] = int(gib * GIB)
    if args.layers_per_group != "all" and args.kv_cache != "vattention":
        raise ValueError(f"--layers-per-group is the vAttention layout; --kv-cache {args.kv_cache} has none")
    return settings


def build_engine(args):
    """``(LLM, model name)`` for the arguments (used by the command and by tests)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to the page pool
    import jax_vattention as jv
    from jax_vattention.engine import LLM, LoadedModel, load_model_source

    from .generate import _int_arg

    settings = engine_settings(args)
    platform = jv.default_device().platform
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if platform == "gpu" else "float32")
    if args.model and not os.path.isdir(args.model):
        raise ValueError(f"model directory {args.model!r} does not exist")
    if args.layers is not None:  # a preset with fewer (or more) layers: what `jax-vattention bench --layers` runs
        import models

        cfg = models.get_preset(args.preset).replace(num_layers=args.layers)
        loaded = LoadedModel(models.random_model(cfg, seed=args.seed, dtype=dtype), models.tokenizer_for(cfg),
                             models.chat_template_for(cfg), args.preset)
    else:  # what LLM("dir or preset") loads: a checkpoint with its tokenizer.json and chat template, or a preset
        loaded = load_model_source(args.model or args.preset, dtype=dtype, seed=args.seed)
    if loaded.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json; the server takes and returns text" if args.model else
                         f"preset {args.preset!r} has a vocabulary too small for the byte-level tokenizer")
    name = args.served_model_name or loaded.name or args.model or args.preset
    group = "all" if args.layers_per_group == "all" else _int_arg(args.layers_per_group, "--layers-per-group")
    page_bytes = None if platform == "gpu" else 64 << 10
    llm = LLM(loaded.model, tokenizer=loaded.tokenizer, chat_template=loaded.chat_template, layers_per_group=group,
              page_bytes=page_bytes, **settings)
    return llm, name


def run_serve(args) -> int:
    import uvicorn

    from jax_vattention.engine import AsyncLLM
    from jax_vattention.server import build_app

    class Server(uvicorn.Server):
        """uvicorn re-raises a captured SIGTERM after its shutdown, which would kill the process before the cache
        is closed; here the signal only asks the server to exit, and the cleanup below runs."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    llm, name = build_engine(args)
    with llm:
        if args.warmup:  # before listening: /health answers only once every step shape is compiled
            print(f"compiling {len(llm.step_shapes())} step shapes ...", flush=True)
            seconds = llm.warmup(compile_threads=args.compile_threads)
            print(f"compiled {llm.num_compiled} step shapes in {seconds:.1f} s", flush=True)
        with AsyncLLM(llm) as engine:
            app = build_app(engine, name)
            print(f"serving {name!r} on http://{args.host}:{args.port}/v1 ({describe(llm)})", flush=True)
            Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")).run()
        print(f"{llm.num_compiled} step shapes compiled in all", flush=True)
    closed = llm.manager.closed if llm.config.kv_cache == "vattention" else True
    print("shut down: the cache is closed" + ("" if closed else " (NOT closed)"), flush=True)
    return 0


def describe(llm) -> str:
    """One line about the engine's cache: the vAttention manager, or a baseline's kind and budget."""
    c = llm.config
    if c.kv_cache == "vattention":
        return repr(llm.manager)
    budget = "every row at max_seq" if c.pool_bytes is None else f"{c.pool_bytes / GIB:.2f} GiB"
    return f"{c.kv_cache} KV cache, max_batch={c.max_batch}, max_seq={c.max_seq}, {budget}"
