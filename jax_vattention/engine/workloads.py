"""Seeded synthetic serving workloads: prompt and output lengths like real traffic, random token ids.

* ``sharegpt_like``: lengths drawn from log-normal fits to the ShareGPT
  conversations used by vLLM's and Sarathi-Serve's serving benchmarks (short
  prompts with a heavy tail, outputs of a few hundred tokens). Defaults:
  prompt median 256 (clipped to [4, 2048]), output median 192 (clipped to
  [8, 1024]).
* ``long_context``: document-style requests, prompts uniform in 8K-32K
  tokens and short outputs (64-512), as in the vAttention paper's long-context
  evaluation.

Outputs run to ``max_tokens`` (no stop tokens, as benchmarks do with
``ignore_eos``), so every configuration does the same work. The same seed gives
the same workload on every machine.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .request import SamplingParams


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    params: list[SamplingParams]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(p.max_tokens for p in self.params)

    def max_len(self) -> int:
        """The longest request: prompt + output tokens."""
        return max(len(p) + s.max_tokens for p, s in zip(self.prompts, self.params))

    def describe(self) -> str:
        pl = np.array([len(p) for p in self.prompts])
        ol = np.array([s.max_tokens for s in self.params])
        return (f"{self.name}: {len(self)} requests, prompt mean {pl.mean():.0f} / p50 {np.median(pl):.0f} / max "
                f"{pl.max()}, output mean {ol.mean():.0f} / p50 {np.median(ol):.0f} / max {ol.max()} tokens")


def _lognormal(rng, n, median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, size=n)), lo, hi).astype(int)


def _check(n, vocab_size):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"the number of requests must be a positive int, got {n!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")


def _build(name, rng, vocab_size, prompt_lens, output_lens, temperature, seed) -> Workload:
    prompts = [rng.integers(0, vocab_size, size=int(n)).tolist() for n in prompt_lens]
    params = [SamplingParams(max_tokens=int(m), temperature=temperature, seed=seed + i)
              for i, m in enumerate(output_lens)]
    return Workload(name, prompts, params)


def sharegpt_like(n: int, *, vocab_size: int, seed: int = 0, prompt_median: float = 256, prompt_sigma: float = 1.0,
                  max_prompt: int = 2048, output_median: float = 192, output_sigma: float = 0.8,
                  max_output: int = 1024, temperature: float = 0.0) -> Workload:
    """``n`` chat-style requests with ShareGPT-like prompt and output lengths."""
    _check(n, vocab_size)
    rng = np.random.default_rng(seed)
    prompt_lens = _lognormal(rng, n, prompt_median, prompt_sigma, 4, max_prompt)
    output_lens = _lognormal(rng, n, output_median, output_sigma, 8, max_output)
    return _build("sharegpt-like", rng, vocab_size, prompt_lens, output_lens, temperature, seed)


def long_context(n: int, *, vocab_size: int, seed: int = 0, min_prompt: int = 8192, max_prompt: int = 32768,
                 min_output: int = 64, max_output: int = 512, temperature: float = 0.0) -> Workload:
    """``n`` long-document requests: prompts uniform in ``[min_prompt, max_prompt]``, short outputs."""
    _check(n, vocab_size)
    if not 0 < min_prompt <= max_prompt or not 0 < min_output <= max_output:
        raise ValueError("need 0 < min_prompt <= max_prompt and 0 < min_output <= max_output")
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(min_prompt, max_prompt + 1, size=n)
    output_lens = rng.integers(min_output, max_output + 1, size=n)
    return _build("long-context", rng, vocab_size, prompt_lens, output_lens, temperature, seed)
