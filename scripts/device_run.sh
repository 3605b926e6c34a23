#!/usr/bin/env bash
# One device-machine session: build, then the named steps; logs and result files go to $OUT.
#   bash scripts/device_run.sh tests bench-alloc bench-attention-quick
# Steps: tests (whole suite: GPU + CPU), gpu-tests (marker gpu only; in two calls: gpu-tests-core = the cache,
#        FFI and kernel GPU tests, gpu-tests-rest = the others), demo, generate,
#        bench-alloc, bench-alloc-quick, bench-attention, bench-attention-quick,
#        bench-generate, bench-generate-quick, bench-serving, bench-serving-quick, bench-serving-long,
#        long-run, sanitize, sanitize-kernels (memcheck of our Pallas kernels only, attention GPU tests),
#        sanitize-engine (memcheck of the small engine GPU test), sanitize-model (memcheck of the 3 slowest model
#        GPU tests, our kernels instrumented, warm compilation cache), engine-tests (engine/paged/reliability tests),
#        tune-prefill (prefill tile sweep at the benchmark's shapes), bench-prefix(-quick) (issue 20's prefix caching),
#        bench-tp, bench-tp-70b (issue 19, two GPUs: kind nvidia-h200-x2),
#        bench-zero-mapping (what a read-only zero mapping of a whole reservation costs on CUDA),
#        bench-serving-layouts (ShareGPT-like, 256 requests, B <= 128: both vAttention layouts, the interleaved one
#        without deferred reclamation, paged16, static),
#        bench-serving-tight (the same at an 8 GiB KV budget, B <= 256),
#        bench-serving-packed (the 24 GiB run: packed steps, the row-group engine before them, async, paged16),
#        headline-sharegpt, headline-long, headline-tight (issue 16's headline: one workload each, every call
#        rewrites benchmarks/results/headline_<device>.json from the workloads run so far; benchmarks/headline.py),
#        bench-serving-2k (512 requests, B <= 256, a 2048-token step budget: packed sync and async, paged16),
#        bench-serving-async (the 24 GiB run: vattention synchronous and asynchronous scheduling, paged16; roofline
#        and device idle fraction), bench-serving-online (vattention and paged16 at 8 requests/s, Poisson arrivals),
#        bench-server (issue 18: `jax-vattention serve` with the Llama-3-8B shape, 32 layers, --warmup, 8 GiB KV,
#        B <= 128: 128 ShareGPT-like streamed requests at Poisson 4 and 8 req/s, vattention then paged, side by
#        side: TTFT, time between tokens, E2E, tokens/s; about 6 minutes on an H200),
#        bench-server-quick (the same path on the tiny preset, seconds).
#        The bench-server steps need FastAPI/uvicorn, which the device image lacks: run
#        scripts/fetch_device_wheels.sh here first and carry .whl/server (the device tool's carry: [".whl/server"]);
#        the step installs those wheels into /tmp/server-wheels (no index) and puts it on PYTHONPATH.
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/vattn-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
summary() { grep -v -E "^E[0-9]{4}|Source Location|cuda_status.cc|^$" "$1" | tail -"${2:-25}"; }
server_wheels() {  # the carried wheels of scripts/fetch_device_wheels.sh -> /tmp/server-wheels
  if [ ! -f .whl/server/requirements.txt ]; then
    echo "no .whl/server: run scripts/fetch_device_wheels.sh and carry .whl/server" | tee "$OUT/bench_server_pip.log"
    return 1
  fi
  python3 -m pip install -q --upgrade --no-deps --no-index --find-links .whl/server --target /tmp/server-wheels \
    -r .whl/server/requirements.txt > "$OUT/bench_server_pip.log" 2>&1 || { tail -20 "$OUT/bench_server_pip.log"; return 1; }
}
status=0
for step in "$@"; do
  echo "=== $step"
  case "$step" in
    tests) python3 -m pytest -q -ra tests > "$OUT/tests.log" 2>&1 || status=1; summary "$OUT/tests.log" 30 ;;
    gpu-tests) python3 -m pytest -q -ra --durations=12 -m gpu tests > "$OUT/gpu_tests.log" 2>&1 || status=1; summary "$OUT/gpu_tests.log" 30 ;;
    gpu-tests-core) python3 -m pytest -q -ra --durations=8 -m gpu tests/test_gpu.py tests/test_attention.py tests/test_unbacked_reads.py > "$OUT/gpu_tests_core.log" 2>&1 || status=1; summary "$OUT/gpu_tests_core.log" 30 ;;
    gpu-tests-rest) python3 -m pytest -q -ra --durations=8 -m gpu tests --deselect tests/test_gpu.py --deselect tests/test_attention.py --deselect tests/test_unbacked_reads.py > "$OUT/gpu_tests_rest.log" 2>&1 || status=1; summary "$OUT/gpu_tests_rest.log" 30 ;;
    demo) python3 -m jax_vattention_cli demo 2>&1 | tail -20 ;;
    generate) python3 -m jax_vattention_cli generate 2>&1 | tail -20 ;;
    bench-alloc) python3 benchmarks/bench_alloc.py > "$OUT/bench_alloc.log" 2>&1 || status=1; summary "$OUT/bench_alloc.log" ;;
    bench-alloc-quick) python3 benchmarks/bench_alloc.py --quick > "$OUT/bench_alloc.log" 2>&1 || status=1; summary "$OUT/bench_alloc.log" ;;
    bench-attention) python3 benchmarks/bench_attention.py > "$OUT/bench_attention.log" 2>&1 || status=1; summary "$OUT/bench_attention.log" 40 ;;
    bench-attention-quick) python3 benchmarks/bench_attention.py --quick > "$OUT/bench_attention.log" 2>&1 || status=1; summary "$OUT/bench_attention.log" 40 ;;
    bench-generate) python3 benchmarks/bench_generate.py > "$OUT/bench_generate.log" 2>&1 || status=1; summary "$OUT/bench_generate.log" ;;
    bench-generate-quick) python3 benchmarks/bench_generate.py --quick > "$OUT/bench_generate.log" 2>&1 || status=1; summary "$OUT/bench_generate.log" ;;
    bench-serving) python3 benchmarks/bench_serving.py > "$OUT/bench_serving.log" 2>&1 || status=1; summary "$OUT/bench_serving.log" 30 ;;
    bench-serving-quick) python3 benchmarks/bench_serving.py --quick > "$OUT/bench_serving_quick.log" 2>&1 || status=1; summary "$OUT/bench_serving_quick.log" 30 ;;
    bench-serving-long) python3 benchmarks/bench_serving.py --workload long > "$OUT/bench_serving_long.log" 2>&1 || status=1; summary "$OUT/bench_serving_long.log" 30 ;;
    bench-serving-layouts) python3 benchmarks/bench_serving.py --requests 256 --max-batch 128 --budget-tokens 196608 --configs vattention,vattention-no-reclaim,vattention-per-layer,paged16,static > "$OUT/bench_serving_layouts.log" 2>&1 || status=1; summary "$OUT/bench_serving_layouts.log" 30 ;;
    bench-serving-async) python3 benchmarks/bench_serving.py --requests 256 --max-batch 128 --budget-tokens 196608 --configs vattention,vattention-async,paged16 --tag async > "$OUT/bench_serving_async.log" 2>&1 || status=1; summary "$OUT/bench_serving_async.log" 30 ;;
    bench-serving-packed) python3 benchmarks/bench_serving.py --requests 256 --max-batch 128 --budget-tokens 196608 --configs vattention,vattention-groups,vattention-async,paged16 --tag packed > "$OUT/bench_serving_packed.log" 2>&1 || status=1; summary "$OUT/bench_serving_packed.log" 30 ;;
    bench-serving-2k) python3 benchmarks/bench_serving.py --requests 512 --max-batch 256 --budget-tokens 196608 --token-budget 2048 --configs vattention,vattention-async,paged16 --tag 2k > "$OUT/bench_serving_2k.log" 2>&1 || status=1; summary "$OUT/bench_serving_2k.log" 30 ;;
    headline-sharegpt|headline-long|headline-tight) python3 benchmarks/headline.py --workloads "${step#headline-}" > "$OUT/$step.log" 2>&1 || status=1; summary "$OUT/$step.log" 30 ;;
    bench-serving-online) python3 benchmarks/bench_serving.py --requests 256 --max-batch 128 --budget-tokens 196608 --configs vattention,paged16 --request-rate 8 --tag online > "$OUT/bench_serving_online.log" 2>&1 || status=1; summary "$OUT/bench_serving_online.log" 30 ;;
    bench-prefix) python3 benchmarks/bench_prefix.py > "$OUT/bench_prefix.log" 2>&1 || status=1; summary "$OUT/bench_prefix.log" 30 ;;
    bench-prefix-system) python3 benchmarks/bench_prefix.py --workloads system > "$OUT/bench_prefix.log" 2>&1 || status=1; summary "$OUT/bench_prefix.log" 30 ;;
    bench-prefix-small) python3 benchmarks/bench_prefix.py --requests 128 --conversations 32 --turns 3 > "$OUT/bench_prefix.log" 2>&1 || status=1; summary "$OUT/bench_prefix.log" 30 ;;
    bench-tp) python3 benchmarks/bench_tp.py > "$OUT/bench_tp.log" 2>&1 || status=1; summary "$OUT/bench_tp.log" 20 ;;
    bench-tp-70b) python3 benchmarks/bench_tp.py --serve-70b > "$OUT/bench_tp.log" 2>&1 || status=1; summary "$OUT/bench_tp.log" 20 ;;
    bench-prefix-quick) python3 benchmarks/bench_prefix.py --quick > "$OUT/bench_prefix_quick.log" 2>&1 || status=1; summary "$OUT/bench_prefix_quick.log" 30 ;;
    bench-serving-tight) python3 benchmarks/bench_serving.py --requests 256 --max-batch 256 --budget-gib 8 --configs vattention,vattention-no-reclaim,vattention-per-layer,paged16 > "$OUT/bench_serving_tight.log" 2>&1 || status=1; summary "$OUT/bench_serving_tight.log" 30 ;;
    bench-server) { server_wheels && PYTHONPATH=/tmp/server-wheels${PYTHONPATH:+:$PYTHONPATH} python3 benchmarks/bench_server.py --preset llama-3-8b --request-rate 4,8 --requests 128 --kv-cache vattention,paged --kv-budget-gib 8 --max-num-seqs 128 --max-model-len 4096; } > "$OUT/bench_server.log" 2>&1 || status=1; summary "$OUT/bench_server.log" 30 ;;
    bench-server-quick) { server_wheels && PYTHONPATH=/tmp/server-wheels${PYTHONPATH:+:$PYTHONPATH} python3 benchmarks/bench_server.py --quick; } > "$OUT/bench_server_quick.log" 2>&1 || status=1; summary "$OUT/bench_server_quick.log" 20 ;;
    long-run) python3 benchmarks/long_run.py > "$OUT/long_run.log" 2>&1 || status=1; summary "$OUT/long_run.log" 20 ;;
    sanitize) bash scripts/gpu_sanitize.sh > "$OUT/sanitize_run.log" 2>&1 || status=1; summary "$OUT/sanitize_run.log" 20 ;;
    sanitize-kernels) SANITIZER_ARGS="--kernel-name kns=vattn" bash scripts/gpu_sanitize.sh tests/test_attention.py -m gpu > "$OUT/sanitize_kernels_run.log" 2>&1 || status=1; summary "$OUT/sanitize_kernels_run.log" 20 ;;
    sanitize-engine) SANITIZE_WARM_CACHE=1 SANITIZE_TIMEOUT=${SANITIZE_TIMEOUT:-480} SANITIZER_ARGS="--kernel-name regex=vattn|write_kv" bash scripts/gpu_sanitize.sh tests/test_engine_gpu.py::test_small_engine_crossing_pages_for_memcheck > "$OUT/sanitize_engine_run.log" 2>&1 || status=1; summary "$OUT/sanitize_engine_run.log" 20 ;;
    sanitize-model) SANITIZE_WARM_CACHE=1 SANITIZE_TIMEOUT=${SANITIZE_TIMEOUT:-420} SANITIZER_ARGS="--kernel-name regex=vattn|write_kv" bash scripts/gpu_sanitize.sh tests/test_model_gpu.py -m gpu -k "8b_layer_shapes or no_cache_copy_at_scale or cli_generate" > "$OUT/sanitize_model_run.log" 2>&1 || status=1; summary "$OUT/sanitize_model_run.log" 20 ;;
    tune-prefill) python3 benchmarks/bench_attention.py --decode "" --prefill 1x512x4096,4x2048x4096 --tune --no-vmm --part prefill-tune > "$OUT/tune_prefill.log" 2>&1 || status=1; summary "$OUT/tune_prefill.log" 25 ;;
    bench-zero-mapping) python3 benchmarks/bench_zero_mapping.py > "$OUT/bench_zero_mapping.log" 2>&1 || status=1; summary "$OUT/bench_zero_mapping.log" 15 ;;
    engine-tests) python3 -m pytest -q -ra tests/test_engine.py tests/test_paged_cache.py tests/test_engine_reliability.py tests/test_scheduler.py > "$OUT/engine_tests.log" 2>&1 || status=1; summary "$OUT/engine_tests.log" 20 ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
done
exit $status
