"""Sampling, once for everything that generates: ``SamplingParams`` and on-device per-row sampling.

``SamplingParams`` uses vLLM's names and semantics (``max_tokens``,
``stop_token_ids``, ``ignore_eos``, ``min_tokens``, ``min_p``, the three
penalties, ``logprobs``). ``sample`` draws the next token of every row on the
device, so a step returns token ids (and, when asked, their logprobs), not
logits: both ``models.Generator``'s decode loop and the serving engine call it.

Copying ``[B, V]`` fp32 logits to the host every step would cost more than a
small model's forward (16 MiB per step at B=32, V=128K). Each row has its own
settings and seed; row b's key is ``fold_in(PRNGKey(seed[b]), n[b])`` with
``n[b]`` the tokens it has generated, so a request samples the same tokens in
any batch. The device side (``SamplingMode``, ``SamplingRows``, ``sample``)
lives in ``jax_vattention.sampler``, the logits processors and their plain-jnp
references in ``jax_vattention.logits_processors``; both are re-exported here.

The mode is static, so a batch that is all greedy, without penalties, min_p,
min_tokens or logprobs, compiles one argmax: no sort, no scatter, no draw.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Sequence

import numpy as np

from .logits_processors import PAD_ID, filter_logits_reference
from .sampler import (
    MAX_LOGPROBS,
    MODES,
    SampleOutput,
    SamplingMode,
    SamplingRows,
    logprobs_bucket,
    sample,
    sample_rows,
    sampling_mode,
)
from .text import check_stop
from .validation import check_int

__all__ = ["MAX_LOGPROBS", "MODES", "PAD_ID", "Logprob", "SampleOutput", "SamplingMode", "SamplingParams",
           "SamplingRows", "TokenLogprobs", "filter_logits_reference", "logprobs_bucket", "sample", "sample_rows",
           "sampling_mode", "token_logprobs"]

MAX_N = 128  # SamplingParams.n: sequences per prompt


@dataclasses.dataclass(frozen=True)
class Logprob:
    """One token's log-probability under the model (vLLM's ``Logprob``): ``rank`` 1 is the most likely token."""

    logprob: float
    rank: int
    decoded_token: str | None = None


# One generated token's logprobs: the sampled token and the top-N alternatives, by token id (vLLM's shape).
TokenLogprobs = dict[int, Logprob]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request (vLLM's names).

    ``temperature == 0`` is greedy; ``top_k <= 0`` and ``top_p >= 1`` disable those
    filters. Generation stops at ``max_tokens``, at any of ``stop_token_ids`` and,
    unless ``ignore_eos``, at the model's EOS ids; the stop token is returned.
    ``seed=None`` draws an independent seed per request (as vLLM); a given seed
    reproduces the same tokens in any batch. ``stop`` strings (they need a
    tokenizer: ``LLM(..., tokenizer=...)``) end a request when its text contains
    one; the stop string is not part of the output text.

    ``min_tokens``: before that many output tokens the stop ids (``stop_token_ids``, and EOS unless
    ``ignore_eos``) cannot be sampled (their logits are -inf) and stop strings do not end the request; it must
    be <= ``max_tokens``. ``min_p`` in [0, 1] drops the tokens whose probability (after temperature) is below
    ``min_p`` x the most likely token's. ``presence_penalty`` and ``frequency_penalty`` in [-2, 2] subtract
    ``presence * (count > 0) + frequency * count`` over the tokens generated so far; ``repetition_penalty > 0``
    divides the positive logits (multiplies the others) of every token seen in the prompt or the output
    (vLLM's definitions, applied before temperature; greedy requests see them too). ``logprobs`` (0..20, or
    None) returns, for every output token, the sampled token's logprob and rank plus the ``logprobs`` most
    likely tokens' (log-softmax of the model's raw fp32 logits, vLLM v1's default), in ``Request.logprobs``.
    ``prompt_logprobs`` is not supported. Order on the device: min_tokens ban -> penalties -> (greedy argmax)
    -> temperature -> min_p -> top_k -> top_p -> draw. A batch pays for a feature only when one of its
    requests uses it (``SamplingMode``); penalties also send each such request's token history every step.
    """

    n: int = 1  # sequences per prompt (LLM.generate runs n requests: seeds seed + i, or independent ones)
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "max_tokens", check_int("SamplingParams.max_tokens", self.max_tokens, low=1))
        object.__setattr__(self, "n", check_int("SamplingParams.n", self.n, low=1, high=MAX_N))
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"SamplingParams.{name} must be a number, got {value!r}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "top_k", check_int("SamplingParams.top_k", self.top_k, low=-2**31, high=2**31 - 1,
                                                    hint="(<= 0 disables it)"))
        if self.seed is not None:
            object.__setattr__(self, "seed", check_int("SamplingParams.seed", self.seed, low=-2**31, high=2**31 - 1))
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos must be a bool, got {self.ignore_eos!r}")
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Sequence):
            raise ValueError(f"SamplingParams.stop_token_ids must be a sequence of ints, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids",
                           tuple(check_int("SamplingParams.stop_token_ids", t, low=0) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", check_stop(self.stop))
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"SamplingParams.{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"SamplingParams.repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        object.__setattr__(self, "min_tokens", check_int("SamplingParams.min_tokens", self.min_tokens, low=0))
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"SamplingParams.min_tokens must be <= max_tokens={self.max_tokens}, "
                             f"got {self.min_tokens!r}")
        if self.logprobs is not None:
            object.__setattr__(self, "logprobs", check_int("SamplingParams.logprobs", self.logprobs, low=0,
                                                           high=MAX_LOGPROBS, hint="(or None)"))
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def seeded(self) -> SamplingParams:
        """These params with a seed: ``self`` if it has one, else a copy with a fresh random seed."""
        if self.seed is not None:
            return self
        return dataclasses.replace(self, seed=secrets.randbelow(2**31))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Whether any of the three penalties is not neutral (the step then needs the request's history)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def stop_ids(self, eos_token_ids: Sequence[int] = ()) -> tuple[int, ...]:
        """The ids that end this request: its own, plus the model's EOS unless ``ignore_eos``."""
        extra = () if self.ignore_eos else tuple(int(t) for t in eos_token_ids if t not in self.stop_token_ids)
        return self.stop_token_ids + extra


def token_logprobs(out: SampleOutput, b: int, n: int, decode: Callable[[int], str] | None = None) -> TokenLogprobs:
    """Row ``b`` of a host ``SampleOutput`` as vLLM's per-token dict: the sampled token, then the top ``n``.

    ``decode(id)`` fills ``Logprob.decoded_token`` (None without it). A sampled token among the top ``n`` appears
    once, with its top-n rank, as in vLLM.
    """
    if out.logprob is None or out.rank is None or out.top_ids is None or out.top_logprobs is None:
        raise ValueError("this step computed no logprobs (its SamplingMode.logprobs is None)")
    if n > out.top_ids.shape[1]:
        raise ValueError(f"{n} top logprobs asked, the step computed {out.top_ids.shape[1]}")
    token = int(out.tokens[b])
    entries = [(token, float(out.logprob[b]), int(out.rank[b]))]
    top = zip(out.top_ids[b, :n], out.top_logprobs[b, :n])
    entries += [(int(t), float(lp), i + 1) for i, (t, lp) in enumerate(top)]
    return {t: Logprob(lp, rank, None if decode is None else decode(t)) for t, lp, rank in entries}
