"""The ``jax-vattention`` command: ``demo``, ``generate``, ``serve`` and ``bench`` (``--help`` on each)."""

from __future__ import annotations

import argparse
import sys

from jax_vattention.errors import VAttentionError

from .bench import add_bench_parser, run_bench
from .demo import add_demo_parser, run_demo
from .generate import add_generate_parser, run_generate
from .serve import add_serve_parser, run_serve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jax-vattention", description="vAttention KV caches for JAX")
    sub = parser.add_subparsers(dest="command")
    add_demo_parser(sub)
    add_generate_parser(sub)
    add_serve_parser(sub)
    add_bench_parser(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or sys.argv[1:])])
    run = {"demo": run_demo, "generate": run_generate, "serve": run_serve, "bench": run_bench}[args.command]
    try:
        return run(args)
    except (ValueError, VAttentionError) as e:  # bad input: a message and exit status 2, never a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
