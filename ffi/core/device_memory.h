// Memory calls on a device whose memory the host cannot address (CUDA): the
// FFI handlers use them for their small device tables and to copy FFI
// arguments. Implemented by a backend (the only code that calls memory APIs);
// the handlers own whatever they allocate through it.
//
// `stream` is the platform stream the call is ordered on (a CUstream for CUDA),
// nullptr for the device's default stream. Addresses are device addresses.
#pragma once

#include <cstddef>
#include <cstdint>

namespace vattn {

class DeviceMemory {
 public:
  virtual ~DeviceMemory() = default;

  virtual int device_ordinal() const = 0;
  // Free and total device memory as the driver reports them.
  virtual void memory_info(size_t* free_bytes, size_t* total_bytes) = 0;

  virtual uintptr_t allocate(size_t bytes) = 0;
  // Never throws: called from destructors.
  virtual void deallocate(uintptr_t ptr) noexcept = 0;

  virtual void copy_to_device(void* stream, uintptr_t dst, const void* src, size_t bytes) = 0;
  virtual void copy_to_host(void* stream, void* dst, uintptr_t src, size_t bytes) = 0;
  virtual void copy_on_device(void* stream, uintptr_t dst, uintptr_t src, size_t bytes) = 0;
  virtual void fill_zero(void* stream, uintptr_t dst, size_t bytes) = 0;
  // Waits for the work queued on `stream`; with nullptr, for all work on the device.
  virtual void wait(void* stream) = 0;
};

}  // namespace vattn
