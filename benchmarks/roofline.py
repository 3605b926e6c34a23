"""The roofline of a serving run (issue 16): each step's floor from the device's measured peaks.

Per step::

    floor = max(FLOPs / GEMM peak, (weight bytes + KV bytes read) / read bandwidth)
    FLOPs = 2 * layer_params * tokens + 2 * head_params * rows

``layer_params``: the weights every token multiplies (q, k, v, o and the MLP of every layer); ``head_params``: the
LM head (vocab x hidden), which the engine runs only on each row's logit token (``rows``), not on every token. The
input embedding is a gather, not a GEMM, and counts in neither; attention's own FLOPs (QK^T, PV) are left out, so
the floor stays a lower bound. ``weight bytes``: every weight a step reads once (the layers with their norms and
biases, the final norm, the LM head; an untied input embedding is only gathered, so it is not). ``KV bytes read``:
for every row, the K and V (all layers, ``num_kv_heads x head_dim``, the cache dtype) of the context its attention
reads, ``start + num_tokens`` tokens (what was cached before the step plus the tokens it writes).

``roofline_fraction`` = sum of the steps' floors / the run's wall time: 1.0 would be every step at the floor with
no time between steps. ``StepRecorder`` collects the per-step work from a running ``LLM`` without touching the
engine: it wraps ``llm.runner.dispatch`` (the ``StepLayout`` of every dispatched step) for the timed part only.

The peaks come from the same process, on its device: ``measure_gemm_flops`` (a jitted bf16 matmul at the shapes
given) and ``measure_read_bandwidth`` (a jitted ``jnp.sum`` of a bf16 array, bytes read over time).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

# Peak shapes: the big square GEMM and the step-like 512 tokens x 4096 hidden x 14336 MLP; on a CPU small
# ones (a smoke run of the same code).
GEMM_SHAPES = ((8192, 8192, 8192), (512, 4096, 14336))
GEMM_SHAPES_CPU = ((512, 512, 512), (128, 1024, 3584))
READ_BYTES, READ_BYTES_CPU = 1 << 30, 64 << 20


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """What one step of a model costs per token, per row and per KV token read."""

    layer_params: int  # matmul weights every token multiplies (all layers)
    head_params: int  # LM head weights, multiplied once per row (its logit token)
    weight_bytes: int  # bytes of the weights one step reads
    kv_bytes_per_token: int  # K and V of one token over all layers

    @classmethod
    def of(cls, cfg: Any, itemsize: int = 2, kv_itemsize: int | None = None) -> ModelCost:
        """From a ``models.ModelConfig`` (weights of ``itemsize`` bytes, the cache of ``kv_itemsize``)."""
        h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        nh, nkv, layers = cfg.num_heads, cfg.num_kv_heads, cfg.num_layers
        matmul = h * d * (2 * nh + 2 * nkv) + 3 * h * i  # q, k, v, o; gate, up, down
        biases = ((d * (nh + 2 * nkv) if cfg.qkv_bias else 0) + (h if getattr(cfg, "o_bias", False) else 0)
                  + (2 * i + h if getattr(cfg, "mlp_bias", False) else 0))
        head = cfg.vocab_size * h  # tied: the embedding matrix, read as the head
        read = layers * (matmul + biases + 2 * h) + h + head  # + each layer's two norms and the final norm
        kv = kv_itemsize if kv_itemsize is not None else itemsize
        return cls(layers * matmul, head, read * itemsize, 2 * layers * nkv * d * kv)


@dataclasses.dataclass(frozen=True)
class Peaks:
    gemm_flops: float  # FLOP/s
    read_bytes_per_s: float


@dataclasses.dataclass(frozen=True)
class StepWork:
    """One dispatched step: ``t`` its dispatch (host ``perf_counter``), real and padded tokens and rows, and the
    KV tokens its rows' attention reads (sum over rows of ``start + num_tokens``)."""

    t: float
    tokens: int
    padded_tokens: int
    rows: int
    padded_rows: int
    kv_tokens: int

    @classmethod
    def of(cls, step: Any, t: float) -> StepWork:
        """From an engine ``StepLayout``: its real rows are ``step.chunks`` ``(row, Chunk)``; the padded token axis
        is ``step.inputs.tokens`` and the padded rows ``step.inputs.logit_index``."""
        return cls.of_chunks(step.chunks, len(step.inputs.tokens), len(step.inputs.logit_index), t)

    @classmethod
    def of_chunks(cls, chunks: Sequence[tuple[int, Any]], padded_tokens: int, padded_rows: int, t: float) -> StepWork:
        tokens = kv = 0
        for _, c in chunks:
            tokens += c.num_tokens
            kv += c.start + c.num_tokens
        return cls(t, tokens, padded_tokens, len(chunks), padded_rows, kv)


def compute_s(cost: ModelCost, peaks: Peaks, tokens, rows):
    """Seconds of the step's GEMMs at the GEMM peak (numpy arrays work elementwise)."""
    return 2.0 * (cost.layer_params * np.asarray(tokens, np.float64)
                  + cost.head_params * np.asarray(rows, np.float64)) / peaks.gemm_flops


def memory_s(cost: ModelCost, peaks: Peaks, kv_tokens):
    """Seconds to read the weights once and the rows' KV at the read bandwidth."""
    return (cost.weight_bytes + cost.kv_bytes_per_token * np.asarray(kv_tokens, np.float64)) / peaks.read_bytes_per_s


def step_floor(cost: ModelCost, peaks: Peaks, tokens, rows, kv_tokens):
    """The step's floor: max(compute, memory) seconds."""
    return np.maximum(compute_s(cost, peaks, tokens, rows), memory_s(cost, peaks, kv_tokens))


def report(steps: Sequence[StepWork], wall_s: float, cost: ModelCost, peaks: Peaks, *,
           idle_s: float | None = None, empty_s: float = 0.0) -> dict:
    """A run's roofline and step-time breakdown from its dispatched steps.

    ``roofline_fraction``: sum of floors (real tokens) / ``wall_s``; ``roofline_fraction_padded`` the same with the
    padded tokens and rows. ``idle_s``: the device's idle time between steps (``EngineStats.device_idle_seconds``),
    when measured;
    ``empty_s``: time the engine had no request at all (online arrivals), counted neither as busy nor as idle.
    """
    if not steps or wall_s <= 0:
        return {}
    tok = np.array([s.tokens for s in steps], np.float64)
    ptok = np.array([s.padded_tokens for s in steps], np.float64)
    rows = np.array([s.rows for s in steps], np.float64)
    prows = np.array([s.padded_rows for s in steps], np.float64)
    kv = np.array([s.kv_tokens for s in steps], np.float64)
    comp, mem = compute_s(cost, peaks, tok, rows), memory_s(cost, peaks, kv)
    floor = np.maximum(comp, mem)
    floor_padded = step_floor(cost, peaks, ptok, prows, kv)
    n = len(steps)
    busy = wall_s - empty_s
    flops = 2.0 * (cost.layer_params * tok.sum() + cost.head_params * rows.sum())
    out = dict(
        roofline_fraction=float(floor.sum() / wall_s), roofline_fraction_padded=float(floor_padded.sum() / wall_s),
        floor_s=float(floor.sum()), floor_padded_s=float(floor_padded.sum()), wall_s=wall_s, steps=n,
        step_ms=1e3 * busy / n, floor_ms=1e3 * float(floor.mean()), compute_bound_steps=float((comp > mem).mean()),
        tokens_per_step=float(tok.mean()), padded_tokens_per_step=float(ptok.mean()),
        padding_fraction=float(ptok.sum() / tok.sum() - 1.0) if tok.sum() else None,
        rows_per_step=float(rows.mean()), padded_rows_per_step=float(prows.mean()),
        kv_tokens_per_step=float(kv.mean()), achieved_tflops=flops / busy / 1e12 if busy > 0 else None,
        achieved_read_GBps=float((cost.weight_bytes * n + cost.kv_bytes_per_token * kv.sum()) / busy / 1e9)
        if busy > 0 else None,
        idle_s=idle_s, idle_fraction=None if idle_s is None or busy <= 0 else max(0.0, idle_s - empty_s) / busy,
        idle_ms_per_step=None if idle_s is None else 1e3 * max(0.0, idle_s - empty_s) / n, empty_s=empty_s)
    return out


class StepRecorder:
    """Records the work of every step ``llm`` dispatches while entered (wraps ``llm.runner.dispatch`` on the
    instance; the engine itself is unchanged). On the step's critical path it only keeps the step's chunk list (its
    ``Chunk``s are frozen) and two lengths; ``steps`` sums them up afterwards."""

    def __init__(self, llm: Any):
        self.llm = llm
        self._raw: list[tuple[float, Any, int, int]] = []

    @property
    def steps(self) -> list[StepWork]:
        return [StepWork.of_chunks(chunks, n_tok, n_rows, t) for t, chunks, n_tok, n_rows in self._raw]

    def __enter__(self) -> StepRecorder:
        runner = self.llm.runner
        self._own = runner.__dict__.get("dispatch")  # an instance attribute already there (else the method)
        dispatch = runner.dispatch
        raw = self._raw

        def recorded(step, *args, **kwargs):
            raw.append((time.perf_counter(), step.chunks, len(step.inputs.tokens), len(step.inputs.logit_index)))
            return dispatch(step, *args, **kwargs)

        runner.dispatch = recorded
        return self

    def __exit__(self, *exc) -> None:
        runner = self.llm.runner
        if self._own is None:
            del runner.dispatch  # back to the class's method
        else:
            runner.dispatch = self._own


# -- peaks, measured on the device this process runs on ------------------------------------------------------------
def _best_per_call(fn, args, calls: int, repeats: int) -> float:
    """Seconds per call of ``fn(*args)`` issued ``calls`` times back to back (asynchronous dispatch keeps the device
    fed), best of ``repeats``, after one warm call."""
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def measure_gemm_flops(m: int, k: int, n: int, *, calls: int = 20, repeats: int = 3) -> float:
    """FLOP/s of a jitted bf16 ``[m, k] @ [k, n]`` (2 m k n FLOPs a call)."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (m, k), jnp.bfloat16)
    b = jax.random.normal(kb, (k, n), jnp.bfloat16)
    t = _best_per_call(jax.jit(jnp.matmul), (a, b), calls, repeats)
    del a, b
    return 2.0 * m * k * n / t


def measure_read_bandwidth(nbytes: int, *, calls: int = 20, repeats: int = 3) -> float:
    """Bytes/s read by a jitted ``jnp.sum`` (f32 accumulation) over a bf16 array of ``nbytes``."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    t = _best_per_call(jax.jit(lambda v: jnp.sum(v, dtype=jnp.float32)), (x,), calls, repeats)
    del x
    return nbytes / t


def measure_peaks(platform: str) -> dict:
    """Both peaks on this process's device: every GEMM shape's FLOP/s (the floor uses the largest) and the read
    bandwidth. JSON-ready; ``Peaks(**{k: d[k] for k in ("gemm_flops", "read_bytes_per_s")})`` rebuilds them."""
    cpu = platform == "cpu"
    shapes = GEMM_SHAPES_CPU if cpu else GEMM_SHAPES
    nbytes = READ_BYTES_CPU if cpu else READ_BYTES
    calls = 3 if cpu else 20
    gemm = {f"{m}x{k}x{n}": measure_gemm_flops(m, k, n, calls=calls) for m, k, n in shapes}
    read = measure_read_bandwidth(nbytes, calls=calls)
    return dict(gemm_flops=max(gemm.values()), gemm_flops_by_shape=gemm, read_bytes_per_s=read,
                gemm_method="jitted bf16 jnp.matmul [m, k] @ [k, n], calls back to back, best of 3; "
                            "the floor uses the fastest shape",
                read_method=f"jitted jnp.sum (f32 accumulation) over a bf16 array of {nbytes / (1 << 20):.0f} MiB, "
                            "bytes read / time, calls back to back, best of 3")


def peaks_of(d: dict) -> Peaks:
    return Peaks(float(d["gemm_flops"]), float(d["read_bytes_per_s"]))
