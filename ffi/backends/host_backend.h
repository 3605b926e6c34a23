// Host backend: the exact analogue of CUDA VMM on the CPU, used in CI.
//   physical pages   = regions of one memfd (pages are punched out on destroy)
//   reservation      = private anonymous mmap with MAP_NORESERVE: PROT_NONE
//                      (kFault: touching it faults) or PROT_READ (kZeros: reads
//                      give the kernel's shared zero page and cost nothing,
//                      writes fault)
//   map / unmap      = mmap(MAP_FIXED|MAP_SHARED) of the memfd region / back to
//                      the reservation's anonymous mapping (MAP_FIXED)
#pragma once

#include <cstdint>
#include <vector>

#include "../core/backend.h"

namespace vattn {

class HostBackend final : public MemoryBackend {
 public:
  explicit HostBackend(UnbackedReads unbacked_reads);
  ~HostBackend() override;

  const char* name() const override { return "host"; }
  size_t granularity() const override { return granularity_; }
  UnbackedReads unbacked_reads() const override { return unbacked_reads_; }
  uintptr_t reserve(size_t bytes, size_t page_bytes) override;
  void release(uintptr_t addr, size_t bytes) override;
  PageHandle create_page(size_t bytes) override;
  void destroy_page(PageHandle page, size_t bytes) override;
  void map(uintptr_t addr, size_t bytes, PageHandle page) override;
  void unmap(uintptr_t addr, size_t bytes) override;
  void synchronize() override {}  // host computations read mapped pages synchronously

 private:
  // Protection of reserved memory with no page behind it.
  int hole_prot() const;

  UnbackedReads unbacked_reads_;
  int fd_ = -1;
  size_t granularity_;
  uint64_t file_size_ = 0;
  std::vector<uint64_t> free_offsets_;
};

}  // namespace vattn
