// CUDA VMM backend: cuMemAddressReserve / cuMemCreate / cuMemMap+cuMemSetAccess
// / cuMemUnmap on the device's primary context (the one XLA uses), plus the
// plain device-memory calls (cuMemAlloc, stream-ordered copies) that the FFI
// handlers make through the DeviceMemory interface. It only wraps those calls:
// whatever the handlers allocate is owned by them (see DeviceWriteGuard).
#pragma once

#include <cstdint>

#include "../core/backend.h"
#include "../core/device_memory.h"
#include "cuda_driver.h"

namespace vattn {

class CudaBackend final : public MemoryBackend, public DeviceMemory {
 public:
  explicit CudaBackend(int device_ordinal);
  ~CudaBackend() override;

  // MemoryBackend: the cache's virtual memory.
  const char* name() const override { return "cuda"; }
  size_t granularity() const override { return granularity_; }
  uintptr_t reserve(size_t bytes, size_t alignment) override;
  void release(uintptr_t addr, size_t bytes) override;
  PageHandle create_page(size_t bytes) override;
  void destroy_page(PageHandle page, size_t bytes) override;
  void map(uintptr_t addr, size_t bytes, PageHandle page) override;
  void unmap(uintptr_t addr, size_t bytes) override;
  void synchronize() override;
  DeviceMemory* device_memory() override { return this; }

  // DeviceMemory: ordinary device allocations and copies; `stream` is a CUstream.
  int device_ordinal() const override { return ordinal_; }
  void memory_info(size_t* free_bytes, size_t* total_bytes) override;
  uintptr_t allocate(size_t bytes) override;
  void deallocate(uintptr_t ptr) noexcept override;
  void copy_to_device(void* stream, uintptr_t dst, const void* src, size_t bytes) override;
  void copy_to_host(void* stream, void* dst, uintptr_t src, size_t bytes) override;
  void copy_on_device(void* stream, uintptr_t dst, uintptr_t src, size_t bytes) override;
  void fill_zero(void* stream, uintptr_t dst, size_t bytes) override;
  void wait(void* stream) override;

 private:
  class ScopedContext;
  const CudaDriver& cu_;
  int ordinal_;
  CUdevice device_ = 0;
  CUcontext ctx_ = nullptr;
  size_t granularity_ = 0;
};

}  // namespace vattn
