// Handler-side state of a cache whose memory the host cannot store into (CUDA),
// kept next to its manager in the registry (the backend only wraps memory
// calls; this state belongs to the write path):
//   * a device copy of each slot's writable capacity in tokens, which the write
//     kernel checks every row against, so it never stores into unmapped pages;
//   * the refused-write record int32[4] {flag, row, slot, end}, which the kernel
//     sets instead of storing, and the next grow (or take_device_error) raises.
// Both live in device memory allocated on first use through the backend's
// DeviceMemory. No CUDA headers: streams are opaque here.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>

#include "../core/cache_manager.h"

namespace vattn {

class DeviceWriteGuard {
 public:
  struct Tables {
    uintptr_t capacity = 0;  // int32[max_batch][2] {from, to}: writable tokens per slot
    uintptr_t refused = 0;   // int32[4] {flag, row, slot, end position}
  };
  struct RefusedWrite {
    int32_t flag = 0, row = 0, slot = 0, end = 0;
  };

  // `manager`'s backend must have device memory; the guard keeps the manager
  // (and so the backend) alive until its tables are freed.
  explicit DeviceWriteGuard(std::shared_ptr<CacheManager> manager);
  ~DeviceWriteGuard();
  DeviceWriteGuard(const DeviceWriteGuard&) = delete;
  DeviceWriteGuard& operator=(const DeviceWriteGuard&) = delete;

  DeviceMemory& memory() const { return memory_; }
  // The tables, holding the manager's current writable ranges: uploaded on
  // `stream` whenever the manager's capacity version changed since the last call.
  Tables sync(void* stream);
  // Copies the refused-write record to the host and clears it. Waits for
  // `stream`; with nullptr (a Python thread), for all work on the device.
  RefusedWrite take_refused(void* stream);
  // take_refused, as an Error(kInvalidArgument) naming the refused row.
  void raise_refused(void* stream);

 private:
  void allocate_tables(void* stream);

  std::shared_ptr<CacheManager> manager_;
  DeviceMemory& memory_;
  std::mutex mu_;
  Tables tables_;
  int64_t capacity_entries_ = 0;
  uint64_t uploaded_version_ = 0;  // capacity version on the device; 0: none yet
};

}  // namespace vattn
