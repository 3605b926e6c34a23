#include "host_backend.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "../core/error.h"

namespace vattn {
namespace {

[[noreturn]] void fail(const std::string& what) {
  throw Error(ErrorKind::kBackend, "host backend: " + what + " failed: " + std::strerror(errno));
}

}  // namespace

HostBackend::HostBackend(UnbackedReads unbacked_reads)
    : unbacked_reads_(unbacked_reads), granularity_(static_cast<size_t>(sysconf(_SC_PAGESIZE))) {
  fd_ = memfd_create("jax_vattention_pool", MFD_CLOEXEC);
  if (fd_ < 0) fail("memfd_create");
}

HostBackend::~HostBackend() {
  if (fd_ >= 0) close(fd_);
}

int HostBackend::hole_prot() const { return unbacked_reads_ == UnbackedReads::kZeros ? PROT_READ : PROT_NONE; }

uintptr_t HostBackend::reserve(size_t bytes, size_t page_bytes) {
  const size_t alignment = page_bytes, span = bytes + alignment;
  // Private, anonymous, never written (PROT_READ at most): reading it maps the
  // kernel's zero page, so the reservation costs no memory in either mode.
  void* p = mmap(nullptr, span, hole_prot(), MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) fail("mmap reserve of " + std::to_string(bytes) + " bytes");
  const uintptr_t raw = reinterpret_cast<uintptr_t>(p);
  const uintptr_t aligned = (raw + alignment - 1) / alignment * alignment;
  if (aligned > raw) munmap(p, aligned - raw);
  const uintptr_t end = raw + span, used_end = aligned + bytes;
  if (end > used_end) munmap(reinterpret_cast<void*>(used_end), end - used_end);
  return aligned;
}

void HostBackend::release(uintptr_t addr, size_t bytes) {
  if (munmap(reinterpret_cast<void*>(addr), bytes) != 0) fail("munmap");
}

PageHandle HostBackend::create_page(size_t bytes) {
  if (take_create_fault()) throw Error(ErrorKind::kBackend, "host backend: injected create_page failure");
  if (!free_offsets_.empty()) {
    uint64_t off = free_offsets_.back();
    free_offsets_.pop_back();
    return off;
  }
  const uint64_t off = file_size_;
  if (ftruncate(fd_, static_cast<off_t>(off + bytes)) != 0) fail("ftruncate");
  file_size_ = off + bytes;
  return off;
}

void HostBackend::destroy_page(PageHandle page, size_t bytes) {
  // Give the memory back to the kernel; the file offset is reused later.
  if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(page),
                static_cast<off_t>(bytes)) != 0)
    fail("fallocate(PUNCH_HOLE)");
  free_offsets_.push_back(page);
}

void HostBackend::map(uintptr_t addr, size_t bytes, PageHandle page) {
  if (take_map_fault()) throw Error(ErrorKind::kBackend, "host backend: injected map failure");
  void* p = mmap(reinterpret_cast<void*>(addr), bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd_,
                 static_cast<off_t>(page));
  if (p == MAP_FAILED) fail("mmap map");
}

void HostBackend::unmap(uintptr_t addr, size_t bytes) {
  // One call replaces the memfd mapping with the reservation's own kind of hole.
  void* p = mmap(reinterpret_cast<void*>(addr), bytes, hole_prot(),
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) fail("mmap unmap");
}

}  // namespace vattn
