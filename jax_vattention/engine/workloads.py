"""Seeded synthetic serving workloads: prompt and output lengths like real traffic, random token ids.

* ``sharegpt_like``: lengths drawn from log-normal fits to the ShareGPT
  conversations used by vLLM's and Sarathi-Serve's serving benchmarks (short
  prompts with a heavy tail, outputs of a few hundred tokens). Defaults:
  prompt median 256 (clipped to [4, 2048]), output median 192 (clipped to
  [8, 1024]).
* ``shared_system_prompt`` and ``chat_turns``: the prefix-caching workloads (one long system prompt
  before every request; conversations that re-send every earlier turn).
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


def shared_system_prompt(n: int, *, vocab_size: int, seed: int = 0, system_len: int = 1536, tail_median: float = 128,
                         tail_sigma: float = 1.0, max_tail: int = 1024, output_median: float = 128,
                         output_sigma: float = 0.8, max_output: int = 512, temperature: float = 0.0) -> Workload:
    """``n`` requests that all start with one system prompt of ``system_len`` tokens, then a ShareGPT-like user
    turn of their own: the prefix-caching workload where every request after the first can reuse the system
    prompt."""
    _check(n, vocab_size)
    if isinstance(system_len, bool) or not isinstance(system_len, (int, np.integer)) or system_len < 1:
        raise ValueError(f"system_len must be a positive int, got {system_len!r}")
    rng = np.random.default_rng(seed)
    system = rng.integers(0, vocab_size, size=int(system_len)).tolist()
    tails = _lognormal(rng, n, tail_median, tail_sigma, 4, max_tail)
    output_lens = _lognormal(rng, n, output_median, output_sigma, 8, max_output)
    w = _build("shared-system-prompt", rng, vocab_size, tails, output_lens, temperature, seed)
    return dataclasses.replace(w, prompts=[system + p for p in w.prompts])


def chat_turns(n: int, turns: int, *, vocab_size: int, seed: int = 0, system_len: int = 256,
               user_median: float = 96, user_sigma: float = 0.8, max_user: int = 512, output_median: float = 96,
               output_sigma: float = 0.8, max_output: int = 256, temperature: float = 0.0) -> list[Workload]:
    """Multi-turn chat: ``n`` conversations of ``turns`` turns, one ``Workload`` per turn.

    Turn ``t``'s prompts are only the new user messages; the caller prepends each conversation so far (every
    earlier prompt and the tokens the model answered), as a chat client re-sends it: ``conversation_prompts``.
    """
    _check(n, vocab_size)
    if isinstance(turns, bool) or not isinstance(turns, (int, np.integer)) or turns < 1:
        raise ValueError(f"turns must be a positive int, got {turns!r}")
    rng = np.random.default_rng(seed)
    system = rng.integers(0, vocab_size, size=int(system_len)).tolist()
    out = []
    for t in range(turns):
        users = _lognormal(rng, n, user_median, user_sigma, 4, max_user)
        output_lens = _lognormal(rng, n, output_median, output_sigma, 8, max_output)
        w = _build(f"chat-turn-{t + 1}", rng, vocab_size, users, output_lens, temperature, seed + t * n)
        out.append(dataclasses.replace(w, prompts=[system + p for p in w.prompts]) if t == 0 else w)
    return out


def conversation_prompts(history: list[list[int]], answers: list[list[int]], user: list[list[int]]) -> list[list[int]]:
    """The next turn's prompts: each conversation so far, the model's answer to it, then the new user message."""
    if not len(history) == len(answers) == len(user):
        raise ValueError(f"history, answers and user messages differ in length: {len(history)}, {len(answers)}, "
                         f"{len(user)}")
    return [h + a + u for h, a, u in zip(history, answers, user)]
