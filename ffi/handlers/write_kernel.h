// Launcher for the CUDA scatter of new K/V rows into the VMM cache, at one
// layer's entries of its (per-layer or interleaved) tensor.
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
  const int32_t* capacity;     // [max_batch][2] {from, to}: a row may write [start, start+count) iff
                               // start + count <= to and (count == 0 or from <= start); from > 0: a shared read-only prefix
  int32_t* error;              // [4] {flag, row, slot, end position}
  void* k_base;                // the layer's K entry at slot 0, token 0 (tensor base + entry offset)
  void* v_base;                // the layer's V entry at slot 0, token 0
  int64_t batch, tokens;
  int64_t entry_bytes;         // bytes copied per token: Hkv * D * itemsize, also the source token stride
  int64_t token_bytes;         // the cache's token stride (entries_per_token * entry_bytes)
  int64_t slot_bytes, max_batch;
};

// Enqueues the write on `stream`; returns the launch error (cudaSuccess when
// there is nothing to launch).
cudaError_t launch_write_kv(cudaStream_t stream, const WriteKernelArgs& args);

}  // namespace vattn
