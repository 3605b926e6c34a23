"""Helpers for comparing generations: token equality that tells real bugs from near-ties.

Two correct implementations can pick different greedy tokens where the top two
logits are within rounding of each other (batching changes the order of
floating-point sums; bf16 kernels round differently from fp32 references).
``assert_same_greedy`` therefore accepts a divergence only where an
independent fp32 full-sequence forward says the step was a near-tie, and
compares nothing after it (the continuations legitimately differ).
"""

from __future__ import annotations

import numpy as np


def top2_gap(model, tokens, *, with_top: bool = False):
    """Gap between the two largest next-token logits after ``tokens`` (plain causal forward).

    With ``with_top``, returns ``(gap, largest logit)``.
    """
    from .llama import full_logits

    logits = full_logits(model, np.asarray(tokens, np.int32)[None])
    top = np.sort(np.asarray(logits[0, -1], np.float32))[-2:]
    gap = float(top[1] - top[0])
    return (gap, float(top[1])) if with_top else gap


def _bf16_ulp(x: float) -> float:
    """Spacing of bfloat16 numbers at ``x`` (8 significant bits)."""
    return 2.0 ** (np.floor(np.log2(max(abs(x), 1e-30))) - 7)


def _param_dtype(model):
    import jax
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return np.dtype(leaves[0].dtype) if leaves else None


def first_divergence(a, b) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def assert_same_greedy(tokens_a, tokens_b, prompts, model, *, tie_tol: float = 1e-4, what: str = "") -> int:
    """Assert two greedy generations agree up to near-ties; returns how many requests hit a tie.

    A length mismatch without a token mismatch (one stopped, the other did not)
    is a failure.
    """
    ties = 0
    for i, (a, b, p) in enumerate(zip(tokens_a, tokens_b, prompts)):
        j = first_divergence(list(a), list(b))
        if j is None:
            continue
        if j >= min(len(a), len(b)):
            raise AssertionError(f"{what} request {i}: lengths differ ({len(a)} vs {len(b)}) with equal tokens")
        gap, top = top2_gap(model, list(p) + list(a[:j]), with_top=True)
        # A bf16 model's logits are themselves rounded: a gap within two bf16
        # ulps of the top logit is a tie the two paths may break differently.
        tol = tie_tol
        if getattr(model.config, "dtype", None) == "bfloat16" or _param_dtype(model) == np.dtype("bfloat16"):
            tol = max(tie_tol, 2 * _bf16_ulp(top))
        if gap > tol:
            raise AssertionError(
                f"{what} request {i}: token {j} differs ({a[j]} vs {b[j]}) where the top-2 logit gap is {gap:.3g} "
                f"> {tol:.3g} (not a near-tie)\n  a={list(a)}\n  b={list(b)}")
        ties += 1
    return ties


def rel_error(out, ref) -> float:
    """``max|out - ref| / max|ref|`` in fp64."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def greedy_deficits(model, prompts, outputs) -> np.ndarray:
    """How far below the top logit each generated token is, under a cache-free forward (teacher-forced).

    ``prompts`` must share one length and ``outputs`` another. Returns
    ``[n, M]``: 0 where the token is the reference argmax. A correct greedy
    engine stays within rounding of 0; a wrong slot, page or length makes
    its tokens effectively random, far below the top.
    """
    from .llama import full_logits

    seqs = np.asarray([list(p) + list(o[:-1]) for p, o in zip(prompts, outputs)], np.int32)
    p = len(prompts[0])
    logits = np.asarray(full_logits(model, seqs)[:, p - 1:], np.float32)  # [n, M, V]
    got = np.take_along_axis(logits, np.asarray(outputs)[:, :, None], axis=-1)[..., 0]
    return logits.max(-1) - got
