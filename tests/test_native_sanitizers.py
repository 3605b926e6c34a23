"""The C++ core, host backend and registry under AddressSanitizer and ThreadSanitizer.

Builds tests/native/stress_core.cc with the library sources (no Python, no XLA)
and runs it; any sanitizer report fails the test.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    "tests/native/stress_core.cc",
    "ffi/core/cache_manager.cc",
    "ffi/core/page_mapping.cc",
    "ffi/backends/host_backend.cc",
    "ffi/handlers/registry.cc",
]
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_core_is_sanitizer_clean(sanitizer, tmp_path):
    exe = tmp_path / f"stress_{sanitizer}"
    build = subprocess.run(
        [CXX, "-std=c++17", "-O1", "-g", f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer",
         "-I", str(ROOT / "ffi"), *(str(ROOT / s) for s in SOURCES), "-o", str(exe), "-pthread"],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1", TSAN_OPTIONS="halt_on_error=1")
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-6000:])
    assert "OK" in run.stdout
    assert "WARNING: ThreadSanitizer" not in run.stderr and "ERROR: AddressSanitizer" not in run.stderr
