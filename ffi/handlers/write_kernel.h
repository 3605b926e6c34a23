// Launcher for the CUDA scatter of new K/V rows into the VMM cache.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace vattn {

struct WriteKernelArgs {
  const void* k_new;           // [B, T, Hkv, D]
  const void* v_new;           // [B, T, Hkv, D]
  const int32_t* slots;        // [B], < 0 skips the row
  const int32_t* starts;       // [B]
  const int32_t* counts;       // [B]
  int32_t* out_lengths;        // [B]
  const int32_t* capacity;     // [max_batch], writable tokens per slot
  int32_t* error;              // [4] {flag, row, slot, end position}
  void* k_base;
  void* v_base;
  int64_t batch, tokens, token_bytes, slot_bytes, max_batch;
};

// Enqueues the write on `stream`; returns the launch error (cudaSuccess when
// there is nothing to launch).
cudaError_t launch_write_kv(cudaStream_t stream, const WriteKernelArgs& args);

}  // namespace vattn
