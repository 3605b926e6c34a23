"""Test setup shared by the CPU and GPU suites.

* XLA must not preallocate 75% of the GPU: the vAttention page pool needs that
  memory, so the tests run with XLA_PYTHON_CLIENT_PREALLOCATE=false.
* Tests marked ``gpu`` run on the first CUDA device and are skipped without
  one; every other test runs with the CPU as jax's default device, so the
  host-backend suite means the same thing on a GPU machine.
* ``rng``: fresh random numbers each run; the seed is printed, and
  ``VATTN_TEST_SEED=<seed>`` replays it (``scripts/gpu_sanitize.sh`` sets it so
  that its warm-up run compiles the very shapes the sanitized run uses).
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import secrets  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


GPUS = _gpus()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not GPUS:
            item.add_marker(skip)


@pytest.fixture
def rng():
    seed = int(os.environ.get("VATTN_TEST_SEED") or secrets.randbits(32))
    print(f"VATTN_TEST_SEED={seed}")
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _default_device(request):
    device = GPUS[0] if "gpu" in request.keywords else jax.devices("cpu")[0]
    with jax.default_device(device):
        yield
        # Tests provoke errors inside side-effecting computations on purpose (and
        # assert them). jax keeps the failed computation's runtime token and would
        # raise it again at interpreter exit; a successful effectful computation on
        # the same device supersedes it.
        jax.block_until_ready(_effect_barrier())


@jax.jit
def _effect_barrier():
    jax.debug.callback(lambda: None)
    return jax.numpy.zeros(())
