"""``ModelRunner``: lays a scheduled step out for the device, buckets its shapes, jits and warms it up.

A step is flat tokens ``[N]``, laid out one of two ways (``EngineConfig.packed_steps``):

* **packed** (the default): every row's tokens one after the other (``packing.PackedRows``), whatever its kind
  and length, with one padding bucket for the total (``packing.token_bucket``: ``2^k`` and ``3 * 2^(k-1)``);
  ``R = min(N, max_batch)`` rows and ``P = min(max_prefill_rows, R)`` prefill rows are fixed by ``N``, so a run
  compiles one shape per token bucket. Attention takes the rows as they lie (the varlen kernel).
* **row groups** (``segments``): decodes ``[Bd] x 1`` and prefill chunks ``[Bp] x T``, each bucketed to a power
  of two, every chunk padded to the longest (``inputs.bucket``); each group gets its own attention kernel.

The projections and MLP run once over all tokens (one pass over the weights) either way.
Sampling runs on the device, so a step returns ``[R]`` token ids (a ``SampleOutput``, with their logprobs when
a request asks for them), not logits. The static ``SamplingMode`` is part of the jit key: a batch pays for
penalties, min_p, min_tokens or logprobs only when one of its sampled rows uses them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ..attention.dispatch import AttentionSpec
from ..cache import KVPool
from ..inputs import bucket
from ..packing import PackedRows, token_bucket, token_buckets
from ..sampling import SampleOutput, SamplingMode, SamplingRows, sample, sampling_mode
from .config import EngineConfig
from .protocol import CausalLM, Segment
from .request import Request
from .scheduler import Chunk, SchedulerOutput


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    """One step's device inputs besides the model and the cache."""

    tokens: Any  # [N] int32, flat tokens of every row group
    positions: Any  # [N] int32
    logit_index: Any  # [R] int32, flat index of each row's last token
    sampling: SamplingRows  # [R] each (and [R, H] token ids when the mode needs them)
    # [N] int32: -1 where ``tokens`` holds the token, else the row of the previous step's token slab that is it
    # (async scheduling: a pending token, known only on the device)
    from_prev: Any
    rows: PackedRows | None = None  # a packed step's row layout; None: row groups (``segments``)

    @classmethod
    def padding(cls, shape: StepShape, mode: SamplingMode | str = "greedy", counts=()) -> StepInputs:
        """Inputs of a step ``shape`` whose rows all hold padding (warmup), with the sampling leaves ``mode``
        needs; a packed shape's rows are laid out for ``counts`` (tokens per real row; none: warmup)."""
        rows, n_tok = shape_dims(shape)
        zeros = np.zeros(n_tok, np.int32)
        packed = None
        if isinstance(shape, PackedShape):
            packed = PackedRows.build(counts, shape.num_tokens, shape.num_rows, shape.num_prefill,
                                      shape.max_row_tokens)
        return cls(zeros, zeros.copy(), np.zeros(rows, np.int32), SamplingRows.padding(rows, mode),
                   np.full(n_tok, -1, np.int32), packed)


@dataclasses.dataclass(frozen=True)
class PackedShape:
    """A packed step's static shape: ``N`` tokens, ``R`` rows, ``P`` prefill rows, ``T`` tokens per row at most."""

    num_tokens: int
    num_rows: int
    num_prefill: int
    max_row_tokens: int


# A step's static shape: its row groups, or a packed step's sizes.
StepShape = tuple[Segment, ...] | PackedShape


def shape_dims(shape: StepShape) -> tuple[int, int]:
    """``(rows, tokens)`` of a step shape."""
    if isinstance(shape, PackedShape):
        return shape.num_rows, shape.num_tokens
    return shape[-1][1], sum((r1 - r0) * t for r0, r1, t in shape)


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """A scheduled step laid out on the host: the rows' cache coordinates and their inputs."""

    segments: StepShape
    slots: np.ndarray  # [R] int32
    starts: np.ndarray  # [R] int32, tokens cached before the step
    counts: np.ndarray  # [R] int32, tokens the step writes
    inputs: StepInputs
    mode: SamplingMode  # static: what the sampler computes
    chunks: list[tuple[int, Chunk]]  # (row, chunk) of every real row

    @property
    def takes_prev(self) -> bool:
        """Whether a token is taken from the previous step's token slab (async scheduling)."""
        return bool((self.inputs.from_prev >= 0).any())


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """A dispatched step's device results."""

    sampled: SampleOutput  # tokens [R] (and logprobs when the mode has them)
    # [P] int32, P = max_batch + max_prefill_rows: ``sampled.tokens`` in rows [0, R), zeros after. Every step's
    # slab has one shape, so taking the next step's pending tokens from it adds no compiled shape.
    token_slab: jax.Array


def _forward(graphdef, params, cache, inputs: StepInputs, prev_slab, *, segments, mode, attn):
    """One step on the device: the model over the flat tokens (pending ones taken from ``prev_slab [P]``, the
    previous step's token slab), then sampling; returns ``(SampleOutput, exported cache, token slab [P])``."""
    from flax import nnx

    model = nnx.merge(graphdef, params)
    tokens = jnp.where(inputs.from_prev >= 0, prev_slab[jnp.maximum(inputs.from_prev, 0)], inputs.tokens)  # [N]
    if inputs.rows is not None:
        logits, cache = model.forward_packed(tokens, inputs.positions, cache, inputs.rows, attn=attn,
                                             logit_index=inputs.logit_index)  # [R, V]
    else:
        logits, cache = model.forward_segments(tokens, inputs.positions, cache, segments, attn=attn,
                                               logit_index=inputs.logit_index)  # [R, V]
    sampled = sample(logits.astype(jnp.float32), inputs.sampling, mode)
    slab = jnp.zeros_like(prev_slab).at[:sampled.tokens.shape[0]].set(sampled.tokens.astype(prev_slab.dtype))
    return sampled, cache.export(), slab


# Module-level, so every engine in the process shares the compiled steps of equal models and shapes.
_STATIC = ("graphdef", "segments", "mode", "attn")
_STEP = jax.jit(_forward, static_argnames=_STATIC)
_STEP_DONATING = jax.jit(_forward, static_argnames=_STATIC, donate_argnames=("cache",))


class ModelRunner:
    """Runs a ``CausalLM`` on one pool's caches: layout, bucketing, jit, warmup."""

    def __init__(self, model: CausalLM, pool: KVPool, config: EngineConfig, attn: AttentionSpec):
        from flax import nnx  # the runner splits any NNX module; models implement CausalLM with it

        self.pool = pool
        self.config = config
        self.attn = attn
        self.graphdef, self.params = nnx.split(model)
        self._shapes: set[tuple] = set()
        # the slab of a step with no pending token. Every slab is committed to the params' device (a step's own
        # output slab is whenever an input is; jit keys on it): sync, async and warmup steps share executables.
        # Params sharded over a mesh (tensor parallelism): the slab is replicated over it.
        placed = jax.tree.leaves(self.params)[0].sharding
        self._device = (NamedSharding(placed.mesh, P()) if isinstance(placed, NamedSharding)
                        else next(iter(placed.device_set)))
        self._zero_slab = self._commit(np.zeros(config.max_batch + config.max_prefill_rows, np.int32))  # [P]

    def _commit(self, slab):
        return jax.device_put(slab, self._device)

    # -- layout ------------------------------------------------------------------
    def layout(self, out: SchedulerOutput, pending: dict[int, int] | None = None) -> StepLayout:
        """Lay ``out`` out. ``pending`` (async scheduling): request id -> row of the step in flight whose sampled
        token is the request's pending token; a decode of such a request takes its input from there."""
        if self.config.packed_steps:
            return self._layout_packed(out, pending)
        c = self.config
        groups: list[tuple[list[Chunk], int, int]] = []  # (chunks, rows, T)
        if out.decodes:
            groups.append((out.decodes, bucket(len(out.decodes), c.max_batch, c.min_decode_bucket), 1))
        if out.prefills:
            t = bucket(max(ch.num_tokens for ch in out.prefills), c.chunk_size, c.min_prefill_bucket)
            groups.append((out.prefills, bucket(len(out.prefills), c.max_prefill_rows), t))
        segments, row, n_tok = [], 0, 0
        for _, n_rows, t in groups:
            segments.append((row, row + n_rows, t))
            row, n_tok = row + n_rows, n_tok + n_rows * t
        inputs = StepInputs.padding(tuple(segments))
        pad_slot = (out.decodes or out.prefills)[0].request.slot  # padding rows: count 0 on a live slot
        slots = np.full(row, pad_slot, np.int32)
        starts, counts = np.zeros(row, np.int32), np.zeros(row, np.int32)
        chunks = []
        for (group, _, t), (r0, _, _) in zip(groups, segments):
            off = sum((s1 - s0) * st for s0, s1, st in segments if s0 < r0)
            for i, ch in enumerate(group):
                b, o = r0 + i, off + i * t
                slots[b] = self._place(inputs, b, o, ch, pending)
                starts[b], counts[b] = ch.start, ch.num_tokens
                chunks.append((b, ch))
        mode, sampling = self._sampling([(b, ch.request) for b, ch in chunks if ch.samples], row)
        inputs = dataclasses.replace(inputs, sampling=sampling)
        return StepLayout(tuple(segments), slots, starts, counts, inputs, mode, chunks)

    def packed_shape(self, num_tokens: int) -> PackedShape:
        """The packed step shape of ``num_tokens`` real tokens: its token bucket, and the rows that bucket fixes."""
        c = self.config
        n = token_bucket(num_tokens, max(c.token_budget, c.max_batch), c.min_token_bucket)
        rows = min(n, c.max_batch)
        return PackedShape(n, rows, min(c.max_prefill_rows, rows), min(c.chunk_size, n))

    def _layout_packed(self, out: SchedulerOutput, pending: dict[int, int] | None) -> StepLayout:
        """``layout`` of a packed step: rows' tokens one after the other from token 0, padding after."""
        group = list(out.decodes) + list(out.prefills)
        counts_real = [ch.num_tokens for ch in group]
        shape = self.packed_shape(sum(counts_real))
        inputs = StepInputs.padding(shape, counts=counts_real)
        assert inputs.rows is not None
        slots = np.full(shape.num_rows, group[0].request.slot, np.int32)  # padding rows: count 0 on a live slot
        starts, counts = np.zeros(shape.num_rows, np.int32), np.zeros(shape.num_rows, np.int32)
        chunks = []
        for b, ch in enumerate(group):
            slots[b] = self._place(inputs, b, int(inputs.rows.offsets[b]), ch, pending)
            starts[b], counts[b] = ch.start, ch.num_tokens
            chunks.append((b, ch))
        mode, sampling = self._sampling([(b, ch.request) for b, ch in chunks if ch.samples], shape.num_rows)
        inputs = dataclasses.replace(inputs, sampling=sampling)
        return StepLayout(shape, slots, starts, counts, inputs, mode, chunks)

    @staticmethod
    def _place(inputs: StepInputs, b: int, o: int, ch: Chunk, pending: dict[int, int] | None) -> int:
        """Write chunk ``ch`` (row ``b``, first token at flat index ``o``) into the host ``inputs``; returns its
        request's slot."""
        r = ch.request
        assert r.slot is not None  # scheduled requests hold a slot
        known = r.token_slice(ch.start, ch.num_tokens)
        inputs.tokens[o:o + len(known)] = known
        if len(known) < ch.num_tokens:  # a decode of a pending token: the step in flight samples it
            if pending is None or len(known) != ch.num_tokens - 1 or r.request_id not in pending:
                raise RuntimeError(f"request {r.request_id}: tokens {ch.start}..{ch.start + ch.num_tokens}"
                                   f" are not known and no step in flight samples them")
            inputs.from_prev[o + ch.num_tokens - 1] = pending[r.request_id]
        inputs.positions[o:o + ch.num_tokens] = np.arange(ch.start, ch.start + ch.num_tokens)
        inputs.logit_index[b] = o + ch.num_tokens - 1
        return r.slot

    @staticmethod
    def _sampling(rows: list[tuple[int, Request]], num_rows: int) -> tuple[SamplingMode, SamplingRows]:
        """The mode and sampling rows of the rows that sample (the others are greedy padding: their token is
        dropped). Histories are sent only for the requests that need them: generated tokens with a penalty, the
        prompt's distinct ids with a repetition penalty, stop ids while under ``min_tokens``."""
        params = [r.params for _, r in rows]
        counts = [r.num_generated for _, r in rows]  # pending tokens count: the key is the same as in sync steps
        mode = sampling_mode(params, counts)
        pen = mode.penalties
        if pen and any(r.num_pending and r.params.has_penalties for _, r in rows):
            raise RuntimeError("penalties need every generated token on the host (the engine steps synchronously)")
        return mode, SamplingRows.of(
            params, counts, num_rows, index=[b for b, _ in rows], mode=mode,
            outputs=[r.output_array() if pen and r.params.has_penalties else () for _, r in rows],
            prompts=[r.distinct_prompt_ids if pen and r.params.repetition_penalty != 1 else () for _, r in rows],
            stop_ids=[r.stop_ids or () for _, r in rows])

    # -- device ------------------------------------------------------------------
    def _jit(self, donates: bool):
        return _STEP_DONATING if donates else _STEP

    def _call(self, segments, mode: SamplingMode, cache, inputs: StepInputs, prev_slab=None) -> StepOutput:
        # host arrays go straight in: jit's C++ fast path transfers them (the step has no effects)
        prev_slab = self._zero_slab if prev_slab is None else self._commit(prev_slab)
        sampled, exported, slab = self._jit(cache.donates)(self.graphdef, self.params, cache, inputs, prev_slab,
                                                           segments=segments, mode=mode, attn=self.attn)
        self.pool.adopt(exported)
        widths = tuple(np.shape(x) for x in jax.tree.leaves(inputs.sampling) if np.ndim(x) == 2)
        self._shapes.add((segments, mode, widths))
        return StepOutput(sampled, slab)

    def dispatch(self, step: StepLayout, prev: StepOutput | None = None) -> StepOutput:
        """Run the step asynchronously; returns its ``StepOutput`` (device arrays).

        ``prev`` (async scheduling): the step still in flight; the tokens ``step.inputs.from_prev`` points at are
        taken from its token slab on the device (a data dependency: this step waits for it there, whatever the
        backend's ordering).
        """
        if prev is None and step.takes_prev:
            raise ValueError("the step takes tokens from the previous step's: pass prev")
        cache = self.pool.cache(step.slots, step.starts, step.counts)
        return self._call(step.segments, step.mode, cache, step.inputs, None if prev is None else prev.token_slab)

    # -- shapes ------------------------------------------------------------------
    def step_shapes(self) -> list[StepShape]:
        """Every step shape the bucketing can produce (packed: one per token bucket)."""
        c = self.config
        if c.packed_steps:
            return [self.packed_shape(n) for n in token_buckets(max(c.token_budget, c.max_batch),
                                                                  c.min_token_bucket)]
        decode = sorted({bucket(n, c.max_batch, c.min_decode_bucket) for n in range(1, c.max_batch + 1)})
        rows = sorted({bucket(n, c.max_prefill_rows) for n in range(1, c.max_prefill_rows + 1)})
        chunk = sorted({bucket(n, c.chunk_size, c.min_prefill_bucket) for n in range(1, c.chunk_size + 1)})
        layouts: list[StepShape] = [((0, d, 1),) for d in decode]
        for d in [0, *decode]:
            layouts += [((0, d, 1), (d, d + p, t))[1 if d == 0 else 0:] for p in rows for t in chunk]
        return layouts

    @property
    def num_compiled(self) -> int:
        """Distinct step shapes (row groups, sampling mode, token-history widths) compiled so far."""
        return len(self._shapes)

    def warmup(self, modes=("greedy",), *, compile_threads: int = 1) -> float:
        """Compile every step shape (``step_shapes`` x ``modes``) now, so timed runs never compile; returns seconds.

        ``modes`` are ``SamplingMode``s or kind names (``"greedy"``, ``"sample"``, ``"filter"``). A mode with
        penalties or a ban is compiled at the narrowest token-history width (``sampler.ID_FLOOR``); longer
        histories compile their power-of-two width when first met.

        Shapes are lowered one by one, compiled on ``compile_threads`` threads
        (XLA compiles outside the GIL), then run once each with padding rows
        only, which finds the compiled executables in jax's cache.
        """
        t0 = time.perf_counter()
        alloc = self.pool.allocate(1)  # the jnp reference reads token 0 even at length 0: keep it backed
        if alloc.slot is None:
            raise RuntimeError(f"warmup could not take a slot: {alloc.result}")
        slot = alloc.slot
        try:
            jobs = [(segments, SamplingMode.of(mode)) for segments in self.step_shapes() for mode in modes]

            def cache_for(segments):
                zeros = np.zeros(shape_dims(segments)[0], np.int32)
                return self.pool.cache(np.full(zeros.shape, slot, np.int32), zeros, zeros)  # nothing is written

            if compile_threads > 1 and len(jobs) > 1:
                lowered = []
                for sg, m in jobs:
                    cache = cache_for(sg)
                    lowered.append(self._jit(cache.donates).lower(self.graphdef, self.params, cache,
                                                                  StepInputs.padding(sg, m), self._zero_slab,
                                                                  segments=sg, mode=m, attn=self.attn))
                with concurrent.futures.ThreadPoolExecutor(compile_threads) as ex:
                    list(ex.map(lambda low: low.compile(), lowered))
            for segments, mode in jobs:
                jax.block_until_ready(self._call(segments, mode, cache_for(segments),
                                                 StepInputs.padding(segments, mode)).sampled)
        finally:
            self.pool.free(slot)
        return time.perf_counter() - t0
