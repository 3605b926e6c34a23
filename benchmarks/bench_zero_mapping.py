"""What a read-only zero mapping of a whole vAttention reservation would cost on a CUDA GPU.

Issue 14 asks whether unbacked cache memory should read as zeros instead of faulting
(so that printing a view cannot kill the process). On the host backend a private
read-only anonymous mapping costs nothing. On CUDA VMM the only way is to map one
physical "zero page" handle into every unbacked 2 MiB page of the reservation, read-only:
one ``cuMemMap`` and one ``cuMemSetAccess`` per page at start-up, and one extra
``cuMemUnmap`` each time ``grow`` replaces a zero page by a real one. This script measures
those three costs with the driver API (cuda-python), next to the cost of a real page
(create + map + access), checks that a zero-mapped range reads back as zeros, and
extrapolates to a Llama-3-8B-shaped reservation.

    python benchmarks/bench_zero_mapping.py [--pages 16384]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402


def check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver error {err}")
    return rest[0] if len(rest) == 1 else rest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=16384, help="2 MiB pages to zero-map (default 16384 = 32 GiB)")
    ap.add_argument("--real-pages", type=int, default=512, help="real pages for the comparison")
    args = ap.parse_args()
    from cuda.bindings import driver as cu

    check(cu.cuInit(0))
    dev = check(cu.cuDeviceGet(0))
    name = check(cu.cuDeviceGetName(256, dev)).decode().rstrip("\x00")
    ctx = check(cu.cuDevicePrimaryCtxRetain(dev))
    check(cu.cuCtxSetCurrent(ctx))
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = 0
    gran = int(check(cu.cuMemGetAllocationGranularity(
        prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM)))
    ro, rw = cu.CUmemAccessDesc(), cu.CUmemAccessDesc()
    for desc, flag in ((ro, cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READ),
                       (rw, cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE)):
        desc.location = prop.location
        desc.flags = flag

    n = args.pages
    base = int(check(cu.cuMemAddressReserve(n * gran, gran, 0, 0)))
    zero = check(cu.cuMemCreate(gran, prop, 0))
    # Zero the physical zero page once through a temporary read-write mapping.
    scratch = int(check(cu.cuMemAddressReserve(gran, gran, 0, 0)))
    check(cu.cuMemMap(scratch, gran, 0, zero, 0))
    check(cu.cuMemSetAccess(scratch, gran, [rw], 1))
    check(cu.cuMemsetD8(scratch, 0, gran))
    check(cu.cuCtxSynchronize())

    t0 = time.perf_counter()
    for i in range(n):
        check(cu.cuMemMap(base + i * gran, gran, 0, zero, 0))
    t_map = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n):
        check(cu.cuMemSetAccess(base + i * gran, gran, [ro], 1))
    t_access = time.perf_counter() - t0
    t0 = time.perf_counter()
    check(cu.cuMemSetAccess(base, n * gran, [ro], 1))  # one call over all of them, if the driver allows it
    t_access_once = time.perf_counter() - t0

    host = np.ones(gran // 4, np.float32)
    probe = [0, n // 2, n - 1]
    zeros_ok = True
    for i in probe:
        check(cu.cuMemcpyDtoH(host.ctypes.data, base + i * gran, gran))
        zeros_ok &= not host.any()

    # Replacing a zero page by a real one (what grow would do): unmap + create + map + set access.
    m = min(args.real_pages, n)
    replace, real = [], []
    handles = []
    for i in range(m):
        t0 = time.perf_counter()
        check(cu.cuMemUnmap(base + i * gran, gran))
        t1 = time.perf_counter()
        h = check(cu.cuMemCreate(gran, prop, 0))
        check(cu.cuMemMap(base + i * gran, gran, 0, h, 0))
        check(cu.cuMemSetAccess(base + i * gran, gran, [rw], 1))
        t2 = time.perf_counter()
        replace.append(t1 - t0)
        real.append(t2 - t1)
        handles.append(h)
    check(cu.cuMemsetD8(base, 7, gran))  # a real page is writable
    check(cu.cuCtxSynchronize())

    # tear down
    for i in range(n):
        check(cu.cuMemUnmap(base + i * gran, gran))
    for h in handles:
        check(cu.cuMemRelease(h))
    check(cu.cuMemUnmap(scratch, gran))
    check(cu.cuMemRelease(zero))
    check(cu.cuMemAddressFree(base, n * gran))
    check(cu.cuMemAddressFree(scratch, gran))

    us = 1e6
    per_map, per_access = t_map / n * us, t_access / n * us
    extra_unmap = statistics.median(replace) * us
    real_page = statistics.median(real) * us
    # Llama-3-8B shape: 32 layers x K/V, 128 slots x 32K tokens x 2 KiB per token per tensor = 32 pages per slot.
    llama_pages = 2 * 32 * 128 * (32768 * 2048 // gran)
    startup_s = llama_pages * (per_map + per_access) / us
    payload = dict(device_name=name, granularity=gran, pages=n, map_us=per_map, set_access_us=per_access,
                   set_access_once_s=t_access_once, zero_reads_ok=bool(zeros_ok), extra_unmap_per_grow_us=extra_unmap,
                   real_page_us=real_page, llama8b_b128_32k_pages=llama_pages, llama8b_startup_s=startup_s)
    table = "\n".join([
        "| what | cost |",
        "|---|---|",
        f"| map the zero page (per 2 MiB page) | {per_map:.1f} µs |",
        f"| set read-only access (per page) | {per_access:.1f} µs |",
        f"| set access once over {n} pages | {t_access_once * 1e3:.1f} ms |",
        f"| zero-mapped pages read back as zeros | {zeros_ok} |",
        f"| extra unmap when grow replaces a zero page | {extra_unmap:.1f} µs (a real page costs {real_page:.1f} µs) |",
        f"| start-up for a Llama-3-8B reservation (B=128, 32K: {llama_pages} pages) | {startup_s:.1f} s |",
    ])
    print(table)
    write_results("zero_mapping", payload, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
