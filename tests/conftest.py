"""Test setup shared by the CPU and GPU suites.

* XLA must not preallocate 75% of the GPU: the vAttention page pool needs that
  memory, so the tests run with XLA_PYTHON_CLIENT_PREALLOCATE=false.
* Tests marked ``gpu`` run on the first CUDA device and are skipped without
  one; every other test runs with the CPU as jax's default device, so the
  host-backend suite means the same thing on a GPU machine.
* ``rng``: fresh random numbers each run; the seed is printed, and
  ``VATTN_TEST_SEED=<seed>`` replays it (``scripts/gpu_sanitize.sh`` sets it so
  that its warm-up run compiles the very shapes the sanitized run uses).
* Speed (the CPU suite is mostly XLA compiling small programs):
  - a persistent JAX compilation cache in the checkout's ignored ``.cache/jax``
    (every executable, however small). A cold cache (CI) gains little: most
    step programs carry their manager's id, so each engine compiles its own.
    Later runs load them. An existing ``JAX_COMPILATION_CACHE_DIR`` wins; set it
    empty to run without the cache;
  - without a CUDA plugin, XLA compiles with ``--xla_backend_optimization_level=0``
    (LLVM -O0: about 30% less CPU for the suite; the optimized HLO, which the
    copy tests inspect in the compiled text, is the same), unless ``XLA_FLAGS`` sets it;
  - ``-n auto`` (pytest-xdist, addopts in pyproject.toml) runs one worker per
    core, at most 4, and no workers where a GPU runs the gpu tests; ``-n 0``
    runs in-process.
  All of it is set in ``os.environ``, so the CLI and other subprocesses the tests
  start (and xdist's workers) get it too.
"""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(Path(__file__).resolve().parents[1] / ".cache" / "jax")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
_CUDA_PLUGIN = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
if not _CUDA_PLUGIN and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import secrets  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# jax reads the environment when it is imported; a plugin may have imported it before this file.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"] or None)
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def _map_count() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """XLA's CPU backend maps each compiled executable's code in several mappings of its own, and jax caches every
    executable for the life of the process. Over a whole suite in one xdist worker they approach the kernel's
    ``vm.max_map_count`` (65530), and then any mmap fails and the worker dies inside XLA (a segfault while writing
    the compilation cache). Past 20000 mappings, drop jax's caches between modules (the persistent compilation
    cache makes a later compile of the same shape a load); 17K mappings of one engine module went down to 0.6K."""
    yield
    if _map_count() > 20000:
        import gc

        jax.clear_caches()
        gc.collect()


def _gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


GPUS = _gpus()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """Workers for ``-n auto``: one per core (at most 4); 0, i.e. in-process, with a GPU or a single core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if GPUS or cores < 2 else min(cores, 4)


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
