"""On-device per-row sampling: the static ``SamplingMode``, the per-row ``SamplingRows`` and ``sample``.

``SamplingParams`` and the host-side ``Logprob`` types live in
``jax_vattention.sampling``, which re-exports everything here.

The mode is a static jit argument naming what a step computes, so each feature
costs only the batches that use it: ``kind`` (greedy: one argmax; sample: a
categorical draw; filter: plus one sort for top-k / top-p), ``min_p`` (one
softmax), ``penalties`` (two scatters into ``[R, V]``), ``ban`` (one scatter:
min_tokens) and ``logprobs`` (a log-softmax and, for K > 0, a ``top_k``). A
batch that is all greedy without these features compiles just the argmax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from .inputs import bucket
from .logits_processors import PAD_ID, apply_min_p, apply_penalties, ban_tokens, gather_logprobs, top_k_top_p

if TYPE_CHECKING:
    from .sampling import SamplingParams

MODES = ("greedy", "sample", "filter")  # SamplingMode.kind
MAX_LOGPROBS = 20  # SamplingParams.logprobs (vLLM's default max_logprobs)
Ids = Sequence[int] | np.ndarray  # token ids of one request (a list, or an int array)
ID_FLOOR = 16  # smallest width of the [R, H] token-id inputs (wider ones are bucketed to powers of two)


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    """What a step's sampler computes: a static jit argument (hashable), the cheapest that covers its rows.

    ``logprobs`` is the number K of top alternatives returned per row (bucketed: 0, 1, 2, 4, 8, 16, 20), or None:
    no logprobs at all.
    """

    kind: str = "greedy"
    min_p: bool = False
    penalties: bool = False  # the rows carry output_ids / prompt_ids and the three penalties
    ban: bool = False  # the rows carry banned_ids (stop ids of rows still under their min_tokens)
    logprobs: int | None = None

    def __post_init__(self):
        if self.kind not in MODES:
            raise ValueError(f"sampling mode must be one of {MODES}, got {self.kind!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"SamplingMode.logprobs must be None or an int in [0, {MAX_LOGPROBS}], "
                             f"got {self.logprobs!r}")

    @classmethod
    def of(cls, mode: SamplingMode | str) -> SamplingMode:
        """``mode`` itself, or the plain mode of a kind name (``"greedy"``, ``"sample"``, ``"filter"``)."""
        return mode if isinstance(mode, SamplingMode) else cls(mode)

    def __str__(self) -> str:
        extra = [name for name in ("min_p", "penalties", "ban") if getattr(self, name)]
        extra += [] if self.logprobs is None else [f"logprobs{self.logprobs}"]
        return "+".join([self.kind, *extra])


def logprobs_bucket(n: int) -> int:
    """The static K that serves a request for ``n`` top logprobs (0 stays 0; the rest round up to 2^i, at most 20)."""
    return 0 if n == 0 else bucket(n, MAX_LOGPROBS)


def sampling_mode(params: Sequence[SamplingParams], counts: Sequence[int] | None = None) -> SamplingMode:
    """The cheapest static mode covering every ``SamplingParams`` of a step (``counts``: tokens each request has
    generated, default 0; a request past its ``min_tokens`` needs no ban)."""
    counts = [0] * len(params) if counts is None else counts
    random = [p for p in params if not p.greedy]
    kind = "greedy" if not random else "filter" if any(p.top_k > 0 or p.top_p < 1 for p in random) else "sample"
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    return SamplingMode(kind, min_p=any(p.min_p > 0 for p in random),
                        penalties=any(p.has_penalties for p in params),
                        ban=any(n < p.min_tokens for p, n in zip(params, counts)),
                        logprobs=logprobs_bucket(max(wanted)) if wanted else None)


def _ids(rows: int, width: int) -> np.ndarray:
    return np.full((rows, width), PAD_ID, np.int32)


def _width(lengths) -> int:
    return bucket(max(lengths, default=0), 2**31, ID_FLOOR)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingRows:
    """Per-row sampling inputs of one device step; the optional leaves are present when the mode needs them."""

    temperature: jax.Array | np.ndarray  # [R] float32
    top_k: jax.Array | np.ndarray  # [R] int32
    top_p: jax.Array | np.ndarray  # [R] float32
    seeds: jax.Array | np.ndarray  # [R] int32
    counts: jax.Array | np.ndarray  # [R] int32, tokens the row's request has generated (the key's fold-in)
    min_p: jax.Array | np.ndarray | None = None  # [R] float32 (mode.min_p)
    presence_penalty: jax.Array | np.ndarray | None = None  # [R] float32 (mode.penalties, as the next four)
    frequency_penalty: jax.Array | np.ndarray | None = None  # [R] float32
    repetition_penalty: jax.Array | np.ndarray | None = None  # [R] float32
    output_ids: jax.Array | np.ndarray | None = None  # [R, Ho] int32, generated tokens, PAD_ID after
    prompt_ids: jax.Array | np.ndarray | None = None  # [R, Hp] int32, prompt ids of rows with a repetition penalty
    banned_ids: jax.Array | np.ndarray | None = None  # [R, S] int32, ids that cannot be sampled now (mode.ban)

    @classmethod
    def padding(cls, rows: int, mode: SamplingMode | str = "greedy", *, output_width: int = ID_FLOOR,
                prompt_width: int = ID_FLOOR, banned_width: int = ID_FLOOR) -> SamplingRows:
        """Greedy neutral rows with the leaves ``mode`` needs (padding, warmup); ``set_row`` fills them in place."""
        mode = SamplingMode.of(mode)
        pen = mode.penalties

        def f32(v):
            return np.full(rows, v, np.float32)

        return cls(f32(0), np.zeros(rows, np.int32), f32(1), np.zeros(rows, np.int32), np.zeros(rows, np.int32),
                   min_p=f32(0) if mode.min_p else None,
                   presence_penalty=f32(0) if pen else None, frequency_penalty=f32(0) if pen else None,
                   repetition_penalty=f32(1) if pen else None,
                   output_ids=_ids(rows, output_width) if pen else None,
                   prompt_ids=_ids(rows, prompt_width) if pen else None,
                   banned_ids=_ids(rows, banned_width) if mode.ban else None)

    @classmethod
    def of(cls, params: Sequence[SamplingParams], counts: Sequence[int], rows: int | None = None, *,
           index: Sequence[int] | None = None, mode: SamplingMode | None = None,
           outputs: Sequence[Ids] | None = None, prompts: Sequence[Ids] | None = None,
           stop_ids: Sequence[Ids] | None = None) -> SamplingRows:
        """Rows for ``params`` at rows ``index`` (default 0..n-1), the rest greedy padding up to ``rows``.

        ``mode`` defaults to ``sampling_mode(params, counts)``. A mode with penalties needs each request's
        generated tokens (``outputs``) and prompt (``prompts``; its distinct ids suffice); one with a ban needs
        its stop ids (``stop_ids``). Their widths are bucketed to powers of two (at least ``ID_FLOOR``).
        """
        mode = sampling_mode(params, counts) if mode is None else SamplingMode.of(mode)
        index = range(len(params)) if index is None else index
        n = len(params)
        none: list[Ids] = [()] * n
        histories, prompt_ids, banned = none, none, none  # only what a request needs is sent
        if mode.penalties:
            if outputs is None or prompts is None:
                raise ValueError("penalties need each request's outputs and prompts (SamplingRows.of(..., "
                                 "outputs=, prompts=))")
            histories = [o if p.has_penalties else () for p, o in zip(params, outputs)]
            prompt_ids = [q if p.repetition_penalty != 1 else () for p, q in zip(params, prompts)]
        if mode.ban:
            if stop_ids is None:
                raise ValueError("min_tokens needs each request's stop ids (SamplingRows.of(..., stop_ids=))")
            banned = [s if c < p.min_tokens else () for p, c, s in zip(params, counts, stop_ids)]
        out = cls.padding(n if rows is None else rows, mode, output_width=_width(map(len, histories)),
                          prompt_width=_width(map(len, prompt_ids)), banned_width=_width(map(len, banned)))
        for b, p, c, o, q, s in zip(index, params, counts, histories, prompt_ids, banned):
            out.set_row(b, p, c, output=o, prompt=q, banned=s)
        return out

    def set_row(self, b: int, p: SamplingParams, count: int, *, output: Ids = (), prompt: Ids = (),
                banned: Ids = ()) -> None:
        """Fill host row ``b`` in place (only on host arrays, while laying a step out); ``p`` must be ``seeded()``.

        The id lists go to the leaves the rows have (``output`` and ``prompt`` with penalties, ``banned`` with a
        ban); each must fit its width.
        """
        if p.seed is None:
            raise ValueError("SamplingParams.seed is None: call seeded() when the request is created")
        self.temperature[b], self.top_k[b], self.top_p[b] = p.temperature, p.top_k, p.top_p
        self.seeds[b], self.counts[b] = p.seed, count
        if self.min_p is not None:
            self.min_p[b] = p.min_p
        if self.presence_penalty is not None and self.frequency_penalty is not None \
                and self.repetition_penalty is not None:
            self.presence_penalty[b], self.frequency_penalty[b] = p.presence_penalty, p.frequency_penalty
            self.repetition_penalty[b] = p.repetition_penalty
        for name, ids in (("output_ids", output), ("prompt_ids", prompt), ("banned_ids", banned)):
            dest = getattr(self, name)
            if dest is not None and len(ids):
                if len(ids) > dest.shape[1]:
                    raise ValueError(f"SamplingRows.{name}: {len(ids)} ids do not fit the width {dest.shape[1]}")
                dest[b, :len(ids)] = ids


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """What ``sample`` returns: the tokens, and with ``mode.logprobs`` their raw logprobs (vLLM v1's default)."""

    tokens: jax.Array | np.ndarray  # [R] int32
    logprob: jax.Array | np.ndarray | None = None  # [R] float32, the sampled token's
    rank: jax.Array | np.ndarray | None = None  # [R] int32, the sampled token's (1: the most likely)
    top_ids: jax.Array | np.ndarray | None = None  # [R, K] int32, most likely first
    top_logprobs: jax.Array | np.ndarray | None = None  # [R, K] float32


def sample(logits, rows: SamplingRows, mode: SamplingMode | str) -> SampleOutput:
    """Next token per row of fp32 ``logits [R, V]`` (and logprobs when ``mode.logprobs`` is set).

    vLLM v1's order: ban (min_tokens) -> penalties -> greedy argmax -> temperature -> min-p -> top-k -> top-p ->
    draw with row b's key ``fold_in(PRNGKey(seeds[b]), counts[b])``. Neutral settings leave a row's logits
    bit-identical, so a request samples the same tokens whatever the other rows of its batch ask for.
    """
    mode = SamplingMode.of(mode)
    raw = logits
    if mode.ban:
        logits = ban_tokens(logits, rows.banned_ids)
    if mode.penalties:
        logits = apply_penalties(logits, rows.output_ids, rows.prompt_ids, rows.presence_penalty,
                                 rows.frequency_penalty, rows.repetition_penalty)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [R]
    if mode.kind != "greedy":
        temperature, top_k = rows.temperature, rows.top_k
        is_greedy = (temperature == 0) | (top_k == 1)
        scaled = logits / jnp.where(is_greedy, 1.0, temperature)[:, None]
        if mode.min_p:
            scaled = apply_min_p(scaled, rows.min_p)
        if mode.kind == "filter":
            scaled = top_k_top_p(scaled, top_k, rows.top_p)
        keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.PRNGKey(s), n))(rows.seeds, rows.counts)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        tokens = jnp.where(is_greedy, tokens, drawn)
    if mode.logprobs is None:
        return SampleOutput(tokens)
    return SampleOutput(tokens, *gather_logprobs(raw, tokens, mode.logprobs))


def sample_rows(logits, rows: SamplingRows, mode: SamplingMode | str):
    """Next token per row of fp32 ``logits [R, V]``: ``sample(...).tokens``, ``[R] int32``."""
    return sample(logits, rows, mode).tokens
