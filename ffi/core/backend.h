// The memory backend interface: the only code allowed to touch a memory API.
//
// It mirrors CUDA virtual memory management one call for one call:
//   reserve  ~ cuMemAddressReserve     release ~ cuMemAddressFree
//   create   ~ cuMemCreate             destroy ~ cuMemRelease
//   map      ~ cuMemMap+cuMemSetAccess unmap   ~ cuMemUnmap
//   map_run  ~ n x cuMemMap + one cuMemSetAccess over the whole run
// so the manager logic that drives it is the same on the GPU and in CI.
// A backend holds no state beyond what those calls need.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "device_memory.h"
#include "error.h"

namespace vattn {

using PageHandle = uint64_t;

// What a read of reserved memory with no page mapped behind it gives. Writes
// there always fault (writes only ever go to mapped pages).
//   kFault: the read faults (SIGSEGV on the host, an illegal address on CUDA):
//           the strict mode that makes a copy or an overread of the cache fatal.
//   kZeros: the read gives zeros (printing or reducing a view is harmless).
// Only the backend implements it; the manager's logic is the same for both.
enum class UnbackedReads { kFault, kZeros };

inline const char* unbacked_reads_name(UnbackedReads mode) {
  return mode == UnbackedReads::kZeros ? "zeros" : "fault";
}

inline UnbackedReads parse_unbacked_reads(const std::string& name) {
  if (name == "zeros") return UnbackedReads::kZeros;
  if (name == "fault") return UnbackedReads::kFault;
  throw Error(ErrorKind::kInvalidArgument, "unbacked_reads must be 'zeros' or 'fault', got '" + name + "'");
}

class MemoryBackend {
 public:
  virtual ~MemoryBackend() = default;

  virtual const char* name() const = 0;
  // Mapping granularity in bytes; page sizes must be a multiple of it.
  virtual size_t granularity() const = 0;

  // What reading reserved memory with no page behind it gives (fixed at construction).
  virtual UnbackedReads unbacked_reads() const = 0;

  // Virtual address range of `bytes` (a multiple of page_bytes), aligned to
  // page_bytes, with no physical memory behind it: reading it faults or gives
  // zeros (unbacked_reads()), writing it faults. Every later map / unmap in
  // the range covers whole pages of page_bytes.
  virtual uintptr_t reserve(size_t bytes, size_t page_bytes) = 0;
  // Called with no page mapped in the range.
  virtual void release(uintptr_t addr, size_t bytes) = 0;

  // Physical memory of `bytes`, not mapped anywhere yet.
  virtual PageHandle create_page(size_t bytes) = 0;
  virtual void destroy_page(PageHandle page, size_t bytes) = 0;

  // Back [addr, addr+bytes) with `page`, readable and writable by the device.
  virtual void map(uintptr_t addr, size_t bytes, PageHandle page) = 0;
  // Back the run of n pages [addr, addr + n*page_bytes) with pages[0..n), page i
  // at addr + i*page_bytes, readable and writable by the device. All or nothing:
  // on failure no page of the run stays mapped and the error propagates. The
  // default maps page by page; a backend whose access setting costs per call
  // (CUDA) overrides it to set access once over the run.
  virtual void map_run(uintptr_t addr, size_t page_bytes, const PageHandle* pages, size_t n) {
    size_t done = 0;
    try {
      for (; done < n; ++done) map(addr + done * page_bytes, page_bytes, pages[done]);
    } catch (...) {
      while (done > 0) {
        --done;
        try {
          unmap(addr + done * page_bytes, page_bytes);
        } catch (...) {
          // Keep unwinding the rest; the first error is the one reported.
        }
      }
      throw;
    }
  }
  // Remove the backing; the range stays reserved and reads again as it did
  // before the map (faults or zeros); writing it faults.
  virtual void unmap(uintptr_t addr, size_t bytes) = 0;

  // Wait until no queued device work can touch the ranges (before unmapping).
  virtual void synchronize() = 0;

  // The device's own memory calls when the host cannot store into the cache
  // (CUDA); nullptr when it can (host). Handlers reach device memory only here.
  virtual DeviceMemory* device_memory() { return nullptr; }

  // Test-only fault injection: the next `n` create_page / map calls fail (in
  // map_run, each page of the run counts as one map call).
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
