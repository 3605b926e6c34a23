"""``jax-vattention serve``: the OpenAI-compatible HTTP server (FastAPI on uvicorn) over one engine.

    jax-vattention serve --model /path/to/hf-dir --port 8000      # tokenizer.json and its chat template
    jax-vattention serve --preset tiny                             # random weights, byte-level tokenizer
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "tiny", "prompt": "Hello", "max_tokens": 16}'

SIGTERM or Ctrl-C shuts down gracefully: uvicorn stops accepting, running requests are aborted, the engine
loop stops and the cache is closed (nothing stays mapped).
"""

from __future__ import annotations

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
    s.add_argument("--max-batch", type=int, default=32)
    s.add_argument("--max-seq", type=int, default=2048)
    s.add_argument("--layers-per-group", default="all", help="vAttention layout: 1 or 'all' (default)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    s.add_argument("--seed", type=int, default=0, help="random weights of a preset")


def build_engine(args):
    """``(LLM, model name)`` for the arguments (used by the command and by tests)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to the page pool
    import jax_vattention as jv
    from jax_vattention.engine import LLM, load_model_source

    from .generate import _int_arg

    platform = jv.default_device().platform
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if platform == "gpu" else "float32")
    if args.model and not os.path.isdir(args.model):
        raise ValueError(f"model directory {args.model!r} does not exist")
    # what LLM("dir or preset") loads: a checkpoint with its tokenizer.json and chat template, or a preset
    loaded = load_model_source(args.model or args.preset, dtype=dtype, seed=args.seed)
    if loaded.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json; the server takes and returns text" if args.model else
                         f"preset {args.preset!r} has a vocabulary too small for the byte-level tokenizer")
    name = args.served_model_name or loaded.name or args.model or args.preset
    group = "all" if args.layers_per_group == "all" else _int_arg(args.layers_per_group, "--layers-per-group")
    page_bytes = None if platform == "gpu" else 64 << 10
    llm = LLM(loaded.model, tokenizer=loaded.tokenizer, chat_template=loaded.chat_template, max_batch=args.max_batch,
              max_seq=args.max_seq, layers_per_group=group, page_bytes=page_bytes)
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
    with llm, AsyncLLM(llm) as engine:
        app = build_app(engine, name)
        print(f"serving {name!r} on http://{args.host}:{args.port}/v1 ({llm.manager!r})", flush=True)
        Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")).run()
    print("shut down: the cache is closed" + ("" if llm.manager.closed else " (NOT closed)"), flush=True)
    return 0
