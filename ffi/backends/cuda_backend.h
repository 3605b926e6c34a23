// CUDA VMM backend: cuMemAddressReserve / cuMemCreate / cuMemMap+cuMemSetAccess
// / cuMemUnmap on the device's primary context (the one XLA uses), plus the
// plain device-memory calls (cuMemAlloc, stream-ordered copies) that the FFI
// handlers make through the DeviceMemory interface. It only wraps those calls:
// whatever the handlers allocate is owned by them (see DeviceWriteGuard).
//
// Unbacked reads (UnbackedReads):
//   kFault: an unbacked page of a reservation is not mapped at all, so any
//           access is an illegal address.
//   kZeros: one physical page of zeros (page_bytes, created and zeroed at the
//           first reserve) is mapped READ-ONLY at every unbacked page of every
//           reservation (one handle mapped at many addresses; access is set
//           per mapping, once per contiguous run of them). map() of a real page first unmaps the zero page at
//           that address; unmap() of a real page maps the zero page back
//           read-only; release() unmaps the zero pages of the range, and the
//           last release frees the zero page. The manager never sees any of it.
//           Caveat: map() unmaps a zero page that device work still running on
//           another stream may be reading (a reader of unbacked memory racing a
//           grow of that very page); the library's own kernels never read there.
// The kZeros bookkeeping (reservations_, the zero page) is not locked here: the
// CacheManager makes every MemoryBackend call under its mutex. DeviceMemory calls
// never touch it.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "../core/backend.h"
#include "../core/device_memory.h"
#include "cuda_driver.h"

namespace vattn {

class CudaBackend final : public MemoryBackend, public DeviceMemory {
 public:
  CudaBackend(int device_ordinal, UnbackedReads unbacked_reads);
  ~CudaBackend() override;

  // MemoryBackend: the cache's virtual memory.
  const char* name() const override { return "cuda"; }
  size_t granularity() const override { return granularity_; }
  UnbackedReads unbacked_reads() const override { return unbacked_reads_; }
  uintptr_t reserve(size_t bytes, size_t page_bytes) override;
  void release(uintptr_t addr, size_t bytes) override;
  PageHandle create_page(size_t bytes) override;
  void destroy_page(PageHandle page, size_t bytes) override;
  void map(uintptr_t addr, size_t bytes, PageHandle page) override;
  // n x cuMemMap, then one cuMemSetAccess over the whole run (see the .cc for why that is legal).
  void map_run(uintptr_t addr, size_t page_bytes, const PageHandle* pages, size_t n) override;
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

  // kZeros bookkeeping: which pages of a reservation hold the zero page now.
  struct Reservation {
    size_t bytes = 0;
    std::vector<uint8_t> zero_mapped;  // per page of zero_page_bytes_
  };
  CUmemAllocationProp page_prop() const;
  // Access of this device to a mapping (access is per mapping; a new one starts inaccessible).
  CUmemAccessDesc access(CUmemAccess_flags flags) const;
  // kZeros (cuda_zero_pages.cc).
  // Creates the zero page (once) and fills it with zeros through a temporary read-write mapping.
  void create_zero_page(size_t page_bytes);
  void destroy_zero_page() noexcept;
  // cuMemMap of the zero page at each of the n pages from ptr, then one cuMemSetAccess(PROT_READ) over
  // them all; on failure nothing of the run stays mapped.
  CUresult map_zero_run(CUdeviceptr ptr, size_t n) const;
  // The reservation holding [addr, addr + bytes) and the index of its first page; throws if none or misaligned.
  Reservation& reservation_of(uintptr_t addr, size_t bytes, size_t* first_page);
  // Unmaps the zero pages in [addr, addr + bytes) (before a real page is mapped there); throws on failure,
  // after mapping back the ones it had already removed.
  void remove_zero_pages(uintptr_t addr, size_t bytes);
  // Maps the zero page back wherever [addr, addr + bytes) has none; never throws: a page the driver
  // refuses stays unmapped (it faults on reads, as in kFault) and is retried at its next unmap.
  void restore_zero_pages(uintptr_t addr, size_t bytes) noexcept;

  const CudaDriver& cu_;
  int ordinal_;
  UnbackedReads unbacked_reads_;
  CUdevice device_ = 0;
  CUcontext ctx_ = nullptr;
  size_t granularity_ = 0;
  bool has_zero_page_ = false;
  CUmemGenericAllocationHandle zero_page_ = 0;
  size_t zero_page_bytes_ = 0;
  std::map<uintptr_t, Reservation> reservations_;  // kZeros only, keyed by base address
};

}  // namespace vattn
