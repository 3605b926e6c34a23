// Host backend: the exact analogue of CUDA VMM on the CPU, used in CI.
//   physical pages   = regions of one memfd (pages are punched out on destroy)
//   reservation      = mmap(PROT_NONE) of anonymous memory, so touching it faults
//   map / unmap      = mmap(MAP_FIXED|MAP_SHARED) of the memfd region / back to PROT_NONE
#pragma once

#include <cstdint>
#include <vector>

#include "../core/backend.h"

namespace vattn {

class HostBackend final : public MemoryBackend {
 public:
  HostBackend();
  ~HostBackend() override;

  const char* name() const override { return "host"; }
  size_t granularity() const override { return granularity_; }
  uintptr_t reserve(size_t bytes, size_t alignment) override;
  void release(uintptr_t addr, size_t bytes) override;
  PageHandle create_page(size_t bytes) override;
  void destroy_page(PageHandle page, size_t bytes) override;
  void map(uintptr_t addr, size_t bytes, PageHandle page) override;
  void unmap(uintptr_t addr, size_t bytes) override;
  void synchronize() override {}  // host computations read mapped pages synchronously

 private:
  int fd_ = -1;
  size_t granularity_;
  uint64_t file_size_ = 0;
  std::vector<uint64_t> free_offsets_;
};

}  // namespace vattn
