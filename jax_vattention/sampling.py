"""Sampling, once for everything that generates: ``SamplingParams`` and on-device per-row sampling.

``SamplingParams`` uses vLLM's names (``max_tokens``, ``stop_token_ids``,
``ignore_eos``). ``sample_rows`` draws the next token of every row on the
device, so a step returns token ids, not logits: both ``models.Generator``'s
decode loop and the serving engine call it.

Copying ``[B, V]`` fp32 logits to the host every step would cost more than a
small model's forward (16 MiB per step at B=32, V=128K). Each row has its own
temperature, top-k, top-p and seed; row b's key is
``fold_in(PRNGKey(seed[b]), n[b])`` with ``n[b]`` the tokens it has generated,
so a request samples the same tokens in any batch. Top-k is applied first,
then top-p over what is left.

``mode`` is static, so a batch that is all greedy compiles no sort and no
categorical draw.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .text import check_stop
from .validation import check_int

MODES = ("greedy", "sample", "filter")
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

    def __post_init__(self):
        object.__setattr__(self, "max_tokens", check_int("SamplingParams.max_tokens", self.max_tokens, low=1))
        object.__setattr__(self, "n", check_int("SamplingParams.n", self.n, low=1, high=MAX_N))
        for name in ("temperature", "top_p"):
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
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    def seeded(self) -> SamplingParams:
        """These params with a seed: ``self`` if it has one, else a copy with a fresh random seed."""
        if self.seed is not None:
            return self
        return dataclasses.replace(self, seed=secrets.randbelow(2**31))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def stop_ids(self, eos_token_ids: Sequence[int] = ()) -> tuple[int, ...]:
        """The ids that end this request: its own, plus the model's EOS unless ``ignore_eos``."""
        extra = () if self.ignore_eos else tuple(int(t) for t in eos_token_ids if t not in self.stop_token_ids)
        return self.stop_token_ids + extra


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingRows:
    """Per-row sampling inputs of one device step (every leaf ``[R]``)."""

    temperature: jax.Array | np.ndarray  # [R] float32
    top_k: jax.Array | np.ndarray  # [R] int32
    top_p: jax.Array | np.ndarray  # [R] float32
    seeds: jax.Array | np.ndarray  # [R] int32
    counts: jax.Array | np.ndarray  # [R] int32, tokens the row's request has generated (the key's fold-in)

    @classmethod
    def padding(cls, rows: int) -> SamplingRows:
        """Greedy rows that sample nothing of interest (padding, warmup)."""
        return cls(np.zeros(rows, np.float32), np.zeros(rows, np.int32), np.ones(rows, np.float32),
                   np.zeros(rows, np.int32), np.zeros(rows, np.int32))  # separate arrays: set_row fills them

    @classmethod
    def of(cls, params: Sequence[SamplingParams], counts: Sequence[int], rows: int | None = None) -> SamplingRows:
        """Rows for ``params`` (padded with greedy rows up to ``rows``)."""
        out = cls.padding(len(params) if rows is None else rows)
        for b, (p, n) in enumerate(zip(params, counts)):
            out.set_row(b, p, n)
        return out

    def set_row(self, b: int, p: SamplingParams, count: int) -> None:
        """Fill host row ``b`` in place (only on host arrays, while laying a step out); ``p`` must be ``seeded()``."""
        if p.seed is None:
            raise ValueError("SamplingParams.seed is None: call seeded() when the request is created")
        self.temperature[b], self.top_k[b], self.top_p[b] = p.temperature, p.top_k, p.top_p
        self.seeds[b], self.counts[b] = p.seed, count


def sampling_mode(params) -> str:
    """The cheapest static mode covering every ``SamplingParams`` in a step."""
    random = [p for p in params if not p.greedy]
    if not random:
        return "greedy"
    if any(p.top_k > 0 or p.top_p < 1 for p in random):
        return "filter"
    return "sample"


def _filter(logits, top_k, top_p):
    """Per-row top-k / top-p cut of temperature-scaled ``logits [R, V]`` (-inf outside)."""
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [R, V] descending
    k = jnp.clip(top_k, 1, vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # [R, 1]
    use_k = (top_k > 0)[:, None]
    logits = jnp.where(use_k & (logits < kth), -jnp.inf, logits)
    ordered = jnp.where(use_k & (ordered < kth), -jnp.inf, ordered)  # still descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    keep = before < top_p[:, None]
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)  # [R, 1]
    return jnp.where((top_p < 1)[:, None] & (logits < cutoff), -jnp.inf, logits)


def sample_rows(logits, rows: SamplingRows, mode: str):
    """Next token per row of fp32 ``logits [R, V]``. Returns ``[R] int32``."""
    temperature, top_k, top_p, seeds, counts = rows.temperature, rows.top_k, rows.top_p, rows.seeds, rows.counts
    if mode not in MODES:
        raise ValueError(f"sampling mode must be one of {MODES}, got {mode!r}")
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    is_greedy = (temperature == 0) | (top_k == 1)
    scaled = logits / jnp.where(is_greedy, 1.0, temperature)[:, None]
    if mode == "filter":
        scaled = _filter(scaled, top_k, top_p)
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.PRNGKey(s), n))(seeds, counts)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(is_greedy, greedy, drawn)


def filter_logits_reference(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Plain-jnp reference of one request's filters: temperature-scaled fp32 ``logits [B, V]``, -inf outside.

    Written independently of ``sample_rows``'s per-row vectorised filters (scalar settings,
    ``lax.top_k``), so the tests can compare the two.
    """
    logits = logits.astype(jnp.float32) / jnp.float32(temperature)
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        keep = before < top_p  # the smallest prefix reaching top_p (first token always kept)
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits
