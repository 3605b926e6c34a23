// CUDA VMM backend: cuMemAddressReserve / cuMemCreate / cuMemMap+cuMemSetAccess
// / cuMemUnmap on the device's primary context (the one XLA uses).
//
// It also owns two small device tables that the CUDA FFI handlers need:
// per-slot writable capacity (so the write kernel never stores past mapped
// pages) and an error word the kernel sets instead of faulting.
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

#include "../core/backend.h"
#include "cuda_driver.h"

namespace vattn {

class CudaBackend final : public MemoryBackend {
 public:
  explicit CudaBackend(int device_ordinal);
  ~CudaBackend() override;

  const char* name() const override { return "cuda"; }
  size_t granularity() const override { return granularity_; }
  uintptr_t reserve(size_t bytes, size_t alignment) override;
  void release(uintptr_t addr, size_t bytes) override;
  PageHandle create_page(size_t bytes) override;
  void destroy_page(PageHandle page, size_t bytes) override;
  void map(uintptr_t addr, size_t bytes, PageHandle page) override;
  void unmap(uintptr_t addr, size_t bytes) override;
  void synchronize() override;

  int device_ordinal() const { return ordinal_; }
  const CudaDriver& driver() const { return cu_; }
  // Free and total device memory as the driver reports it.
  void mem_info(size_t* free_bytes, size_t* total_bytes);

  // Device tables for the FFI handlers; all calls are stream-ordered on `stream`.
  struct Tables {
    CUdeviceptr capacity = 0;  // int32[max_batch]
    CUdeviceptr error = 0;     // int32[4]: {flag, row, slot, position}
  };
  // Ensures the tables exist and hold capacity version `version`.
  Tables tables(CUstream stream, const std::vector<int32_t>& capacity, uint64_t version);
  uint64_t tables_version() const;
  // Copies the error word to the host and clears it (synchronizes `stream`).
  void take_error(CUstream stream, int32_t out[4]);

 private:
  class ScopedContext;
  const CudaDriver& cu_;
  int ordinal_;
  CUdevice device_ = 0;
  CUcontext ctx_ = nullptr;
  size_t granularity_ = 0;
  mutable std::mutex tables_mu_;
  Tables tables_;
  int64_t tables_size_ = 0;
  uint64_t tables_version_ = 0;
};

}  // namespace vattn
