#!/usr/bin/env bash
# GPU tests under NVIDIA compute-sanitizer (issue 6): every device memory access of the CUDA VMM backend, the
# write/grow FFI kernels and the attention kernels is checked (memcheck by default).
#
#   bash scripts/gpu_sanitize.sh                                   # default selection (below)
#   bash scripts/gpu_sanitize.sh tests/test_gpu.py -k grow         # any pytest arguments instead
#
# Default selection: tests/test_gpu.py and tests/test_attention.py, marker gpu, without the negative control
# test_sparse_mapping_detector_sees_a_full_read (it reads unmapped pages on purpose, so memcheck would rightly
# report it). Subprocesses the tests start are checked too (--target-processes all).
#
# Environment:
#   OUT                   the log goes to $OUT/sanitize.log (else a temporary file; its path is printed)
#   PYTHON                interpreter (default: python3)
#   SANITIZER             path of compute-sanitizer (default: PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin, the
#                         nvidia-cuda-sanitizer-api pip package)
#   SANITIZER_TOOL        memcheck (default), initcheck, racecheck or synccheck
#   SANITIZER_API_ERRORS  no (default) | explicit | all: also count CUDA API calls that return an error. Off by
#                         default because the CUDA runtime and XLA probe the driver (cuGetProcAddress for absent
#                         symbols, ...) and get expected errors back, which are not memory errors.
#   SANITIZER_ARGS        extra compute-sanitizer flags, e.g. "--leak-check full"
#   SANITIZE_TIMEOUT      seconds before the sanitized run's process group is killed (default: none).
#   SANITIZE_WARM_CACHE   1: first run the same tests without the sanitizer, filling a persistent JAX
#                         compilation cache (JAX_COMPILATION_CACHE_DIR, default a temporary directory), so that
#                         the sanitized run loads its executables instead of compiling them. XLA compiles very
#                         slowly under the sanitizer (a 2-layer model's forward did not compile in 540 s), which
#                         is what kept the engine and model tests from finishing.
#   JAX_COMPILATION_CACHE_DIR  an existing cache to use (with SANITIZE_WARM_CACHE=1 it is filled first).
#   VATTN_TEST_SEED       the tests' random seed; with a compilation cache it is fixed (random if unset) for the
#                         warm-up and the sanitized run alike, so that both compile the same shapes.
#
# Exit status: 0 clean; 1 tests failed; 99 the sanitizer reported errors; 2 no compute-sanitizer; 3 no
# "ERROR SUMMARY" in the log (the sanitizer did not finish); 4 no test passed (no GPU?).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
TOOL=${SANITIZER_TOOL:-memcheck}
API_ERRORS=${SANITIZER_API_ERRORS:-no}

find_sanitizer() {
  if [[ -n "${SANITIZER:-}" ]]; then echo "$SANITIZER"; return; fi
  local c
  if c=$(command -v compute-sanitizer 2>/dev/null); then echo "$c"; return; fi
  for c in "${CUDA_HOME:-}/bin/compute-sanitizer" "${CUDA_PATH:-}/bin/compute-sanitizer" \
           /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [[ -x "$c" ]]; then echo "$c"; return; fi
  done
  # Newest /usr/local/cuda-X.Y first.
  for c in $(ls -d /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | sort -rV); do
    if [[ -x "$c" ]]; then echo "$c"; return; fi
  done
  # The pip package nvidia-cuda-sanitizer-api-cu12/cu13 ships the binary inside site-packages.
  "$PYTHON" - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
for root in roots:
    for path in sorted(glob.glob(os.path.join(root, "nvidia", "**", "compute-sanitizer"), recursive=True)):
        if os.path.isfile(path) and os.access(path, os.X_OK):
            print(path)
            sys.exit(0)
EOF
}

SAN=$(find_sanitizer | head -1)
if [[ -z "$SAN" || ! -x "$SAN" ]]; then
  echo "gpu_sanitize: compute-sanitizer not found (set SANITIZER=/path/to/compute-sanitizer)" >&2
  exit 2
fi

if [[ $# -gt 0 ]]; then
  TESTS=("$@")
else
  TESTS=(tests/test_gpu.py tests/test_attention.py -m gpu
         --deselect tests/test_gpu.py::test_sparse_mapping_detector_sees_a_full_read)
fi

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  LOG="$OUT/sanitize.log"
else
  LOG=$(mktemp "${TMPDIR:-/tmp}/gpu_sanitize.XXXXXX.log")
fi
JUNIT="${LOG%.log}.junit.xml"
rm -f "$JUNIT"

# XLA must not preallocate 75% of the GPU (the page pool needs it). Command buffers (CUDA graphs) are turned
# off so that every kernel is an ordinary, instrumented launch.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# One cudaMalloc per XLA buffer instead of XLA's BFC arena, so that memcheck knows each buffer's bounds (inside
# one arena an out-of-bounds access that lands on a neighbouring buffer is invisible to it).
export XLA_PYTHON_CLIENT_ALLOCATOR=${XLA_PYTHON_CLIENT_ALLOCATOR:-platform}
# Autotuning is off too: it launches every candidate GEMM/fusion kernel, each one intercepted by the sanitizer,
# which made a single attention test take minutes; the kernels under test do not depend on it.
export XLA_FLAGS="--xla_gpu_enable_command_buffer= --xla_gpu_autotune_level=0 ${XLA_FLAGS:-}"
export PYTHONUNBUFFERED=1

# shellcheck disable=SC2206
EXTRA=(${SANITIZER_ARGS:-})
CMD=("$SAN" --tool "$TOOL" --error-exitcode 99 --target-processes all --report-api-errors "$API_ERRORS"
     ${EXTRA[@]+"${EXTRA[@]}"} "$PYTHON" -m pytest -q -ra -p no:cacheprovider --junitxml="$JUNIT" "${TESTS[@]}")

if [[ "${SANITIZE_WARM_CACHE:-0}" == 1 || -n "${JAX_COMPILATION_CACHE_DIR:-}" ]]; then
  # A cache filled earlier (e.g. by a warm-up in a previous device call) is used as it is.
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/jax_cache.XXXXXX")}
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
  # The same random inputs in both runs: tests that draw shapes from the seed (e.g. prompt lengths) would
  # otherwise compile new executables under the sanitizer, which is what it is too slow for.
  export VATTN_TEST_SEED=${VATTN_TEST_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
fi
if [[ "${SANITIZE_WARM_CACHE:-0}" == 1 ]]; then
  warm_start=$(date +%s)
  "$PYTHON" -m pytest -q -p no:cacheprovider "${TESTS[@]}" > "${LOG%.log}.warm.log" 2>&1
  warm_rc=$?
  WARM_NOTE="# warm-up run without the sanitizer: exit status $warm_rc after $(( $(date +%s) - warm_start )) s, \
$(find "$JAX_COMPILATION_CACHE_DIR" -type f | wc -l) cache entries in $JAX_COMPILATION_CACHE_DIR"
fi

{
  if [[ -n "${WARM_NOTE:-}" ]]; then echo "$WARM_NOTE"; fi
  if [[ -n "${VATTN_TEST_SEED:-}" ]]; then echo "# VATTN_TEST_SEED=$VATTN_TEST_SEED"; fi
  echo "# $("$SAN" --version 2>/dev/null | tail -1)"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/# GPU: /'
  printf '# '; printf '%q ' "${CMD[@]}"; echo
} | tee "$LOG"
start=$(date +%s)
# The sanitized run gets its own process group, so that a deadline kills all of it: TERM to compute-sanitizer
# alone left the python under it running (holding the output open), and a plain `timeout` never returned.
header=$(wc -l < "$LOG")
setsid "${CMD[@]}" >> "$LOG" 2>&1 &
pid=$!
watchdog=
if [[ -n "${SANITIZE_TIMEOUT:-}" ]]; then
  ( sleep "$SANITIZE_TIMEOUT"; echo "# deadline: ${SANITIZE_TIMEOUT} s, killing the process group" >> "$LOG"
    kill -TERM -- "-$pid" 2>/dev/null; sleep 20; kill -KILL -- "-$pid" 2>/dev/null ) > /dev/null 2>&1 &
  watchdog=$!
fi
tail -n +$((header + 1)) -f --pid="$pid" "$LOG" | grep --line-buffered -v -E "^E[0-9]{4}|Source Location|cuda_status.cc"
wait "$pid"
rc=$?
if [[ -n "$watchdog" ]]; then
  pkill -P "$watchdog" 2>/dev/null; kill "$watchdog" 2>/dev/null  # its sleep too (no stray process)
  if grep -q "^# deadline:" "$LOG"; then rc=124; fi
fi
kill -KILL -- "-$pid" 2>/dev/null  # anything of the group still alive
echo "# exit status $rc after $(( $(date +%s) - start )) s" | tee -a "$LOG"

echo "=== compute-sanitizer ($TOOL) summary; log: $LOG"
summaries=$(grep -E "ERROR SUMMARY: [0-9]+ error" "$LOG" || true)
if [[ -z "$summaries" ]]; then
  echo "gpu_sanitize: no ERROR SUMMARY line in the log (the sanitizer did not finish; exit status $rc)" >&2
  exit 3
fi
echo "$summaries"
errors=$(echo "$summaries" | sed -E 's/.*ERROR SUMMARY: ([0-9]+) error.*/\1/' | awk '{s += $1} END {print s + 0}')
# Tests that ran and passed, from pytest's JUnit report (independent of -q / -qq in the arguments).
counts=$("$PYTHON" - "$JUNIT" <<'EOF' 2>/dev/null
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(n["tests"] - n["failures"] - n["errors"] - n["skipped"], n["failures"] + n["errors"], n["skipped"])
EOF
)
read -r passed failed skipped <<< "${counts:-0 0 0}"
echo "tests: $passed passed, $failed failed, $skipped skipped (JUnit report: $JUNIT)"

if [[ "$errors" -gt 0 || "$rc" -eq 99 ]]; then
  echo "gpu_sanitize: $errors error(s) reported by compute-sanitizer $TOOL" >&2
  exit 99
fi
if [[ "$rc" -eq 124 || "$rc" -eq 137 ]]; then
  echo "gpu_sanitize: timed out after ${SANITIZE_TIMEOUT}s" >&2
  exit 1
fi
if [[ "$rc" -ne 0 ]]; then
  echo "gpu_sanitize: the tests failed under the sanitizer (exit status $rc)" >&2
  exit 1
fi
if [[ "$passed" -eq 0 ]]; then
  echo "gpu_sanitize: no test passed under the sanitizer (no GPU, or everything deselected/skipped?)" >&2
  exit 4
fi
echo "gpu_sanitize: clean ($errors errors)"
