"""An OpenAI-compatible HTTP server over ``AsyncLLM`` (FastAPI; run it with uvicorn: ``jax-vattention serve``)."""

from .app import build_app

__all__ = ["build_app"]
