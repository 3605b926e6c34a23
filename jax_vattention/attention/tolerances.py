"""The one tolerance table for comparing kernels with the fp32 references.

The kernels keep logits, softmax statistics and accumulators in fp32 but feed
the probabilities to the ``P @ V`` product in the cache dtype (as every flash
kernel does) and round the output to ``q.dtype``. The error is therefore a few
ulps of the storage dtype: bf16 has 8 significant bits (ulp(1) = 2**-7), fp16
has 11 (ulp(1) = 2**-10). A check passes when, elementwise,
``|out - ref| <= atol + rtol * |ref|``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

TOLERANCES = {
    "bfloat16": dict(atol=1e-2, rtol=1e-2),
    "float16": dict(atol=2e-3, rtol=2e-3),
    # fp32 all the way (the sampler's logits processors, fp32 models vs a reference forward): summation order only
    "float32": dict(atol=1e-4, rtol=1e-4),
}


def tolerance(dtype) -> dict:
    return TOLERANCES[jnp.dtype(dtype).name]


def max_violation(out, ref, dtype=None) -> float:
    """max(|out - ref| - rtol*|ref|) / atol; <= 1 means within tolerance."""
    tol = tolerance(dtype or out.dtype)
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    excess = np.abs(out - ref) - tol["rtol"] * np.abs(ref)
    return float(np.max(excess) / tol["atol"]) if excess.size else 0.0


def assert_close(out, ref, dtype=None, what: str = "") -> None:
    tol = tolerance(dtype or out.dtype)
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    if not np.all(np.isfinite(out)):
        raise AssertionError(f"{what}: non-finite values in the kernel output")
    np.testing.assert_allclose(out, ref, err_msg=what, **tol)
