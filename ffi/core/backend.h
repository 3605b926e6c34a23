// The memory backend interface: the only code allowed to touch a memory API.
//
// It mirrors CUDA virtual memory management one call for one call:
//   reserve  ~ cuMemAddressReserve     release ~ cuMemAddressFree
//   create   ~ cuMemCreate             destroy ~ cuMemRelease
//   map      ~ cuMemMap+cuMemSetAccess unmap   ~ cuMemUnmap
// so the manager logic that drives it is the same on the GPU and in CI.
// A backend holds no state beyond what those calls need.
#pragma once

#include <cstddef>
#include <cstdint>

#include "device_memory.h"

namespace vattn {

using PageHandle = uint64_t;

class MemoryBackend {
 public:
  virtual ~MemoryBackend() = default;

  virtual const char* name() const = 0;
  // Mapping granularity in bytes; page sizes must be a multiple of it.
  virtual size_t granularity() const = 0;

  // Virtual address range with no physical memory behind it. Touching it faults.
  virtual uintptr_t reserve(size_t bytes, size_t alignment) = 0;
  virtual void release(uintptr_t addr, size_t bytes) = 0;

  // Physical memory of `bytes`, not mapped anywhere yet.
  virtual PageHandle create_page(size_t bytes) = 0;
  virtual void destroy_page(PageHandle page, size_t bytes) = 0;

  // Back [addr, addr+bytes) with `page`, readable and writable by the device.
  virtual void map(uintptr_t addr, size_t bytes, PageHandle page) = 0;
  // Remove the backing; the range stays reserved and faults again when touched.
  virtual void unmap(uintptr_t addr, size_t bytes) = 0;

  // Wait until no queued device work can touch the ranges (before unmapping).
  virtual void synchronize() = 0;

  // The device's own memory calls when the host cannot store into the cache
  // (CUDA); nullptr when it can (host). Handlers reach device memory only here.
  virtual DeviceMemory* device_memory() { return nullptr; }

  // Test-only fault injection: the next `n` create_page / map calls fail.
  void inject_failures(int create_failures, int map_failures) {
    fail_creates_ = create_failures;
    fail_maps_ = map_failures;
  }

 protected:
  bool take_create_fault() { return fail_creates_ > 0 && fail_creates_-- > 0; }
  bool take_map_fault() { return fail_maps_ > 0 && fail_maps_-- > 0; }

 private:
  int fail_creates_ = 0;
  int fail_maps_ = 0;
};

}  // namespace vattn
