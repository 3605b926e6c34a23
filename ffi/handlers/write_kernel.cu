#include <cuda_runtime.h>

#include "write_kernel.h"

namespace vattn {
namespace {

// One block per (token, row); a block copies the row's K and V entry of that
// token (entry_bytes each; consecutive tokens are token_bytes apart in the
// cache). A row whose slot, count or positions fall outside the slot's
// writable range {from, to} is skipped and reported through `error`, so a bad
// index never stores into unmapped memory, nor into pages the slot shares
// read-only (tokens before `from`).
__global__ void write_kv_kernel(WriteKernelArgs a) {
  const int64_t t = blockIdx.x, b = blockIdx.y;
  const int32_t slot = a.slots[b], start = a.starts[b], count = a.counts[b];
  const bool skip = slot < 0;
  const bool valid = skip || (slot < a.max_batch && count >= 0 && count <= a.tokens && start >= 0 &&
                              (count == 0 || start >= a.capacity[2 * slot]) &&
                              int64_t{start} + count <= a.capacity[2 * slot + 1]);
  if (t == 0 && threadIdx.x == 0) {
    a.out_lengths[b] = (!skip && valid) ? start + count : start;
    if (!valid && atomicCAS(a.error, 0, 1) == 0) {
      a.error[1] = static_cast<int32_t>(b);
      a.error[2] = slot;
      a.error[3] = start + count;
    }
  }
  if (skip || !valid || t >= count) return;
  const int64_t src = (b * a.tokens + t) * a.entry_bytes;
  const int64_t dst = int64_t{slot} * a.slot_bytes + (int64_t{start} + t) * a.token_bytes;
  const char* ks = static_cast<const char*>(a.k_new) + src;
  const char* vs = static_cast<const char*>(a.v_new) + src;
  char* kd = static_cast<char*>(a.k_base) + dst;
  char* vd = static_cast<char*>(a.v_base) + dst;
  const int64_t n = a.entry_bytes;
  const bool vec = n % 16 == 0 && (reinterpret_cast<uintptr_t>(ks) | reinterpret_cast<uintptr_t>(vs) |
                                   reinterpret_cast<uintptr_t>(kd) | reinterpret_cast<uintptr_t>(vd)) % 16 == 0;
  if (vec) {
    for (int64_t i = threadIdx.x; i < n / 16; i += blockDim.x) {
      reinterpret_cast<uint4*>(kd)[i] = reinterpret_cast<const uint4*>(ks)[i];
      reinterpret_cast<uint4*>(vd)[i] = reinterpret_cast<const uint4*>(vs)[i];
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      kd[i] = ks[i];
      vd[i] = vs[i];
    }
  }
}

}  // namespace

cudaError_t launch_write_kv(cudaStream_t stream, const WriteKernelArgs& args) {
  if (args.batch == 0 || args.tokens == 0) return cudaSuccess;
  dim3 grid(static_cast<unsigned>(args.tokens), static_cast<unsigned>(args.batch));
  write_kv_kernel<<<grid, 128, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace vattn
